"""The add-on's download cache stays within its size: the jobs used least recently go first,
never one being downloaded or just fetched, and a file used again counts as recent."""

from __future__ import annotations

import os
import time

import pytest

bpy = pytest.importorskip("bpy")

from .conftest import submodule  # noqa: E402

pytestmark = pytest.mark.bpy

MIB = 1 << 20


def _job(folder, job_id: str, size: int, age: float) -> None:
    path = folder / job_id
    path.mkdir(parents=True)
    (path / "result.glb").write_bytes(b"\0" * size)
    then = time.time() - age
    os.utime(path / "result.glb", (then, then))


def test_the_cache_keeps_to_its_size_and_drops_the_least_recently_used_jobs(addon, tmp_path):
    downloads = submodule("downloads")
    cache = tmp_path / "cache"
    ids = [f"20260101-00000{i}-abcdef" for i in range(5)]
    for i, job_id in enumerate(ids):  # ids[0] is the oldest
        _job(cache, job_id, 2 * MIB, age=1000 - i * 100)
    d = downloads.Downloads(cache, limit=5 * MIB)
    # using the oldest job's file makes it the most recent one
    assert d.get(ids[0], "result.glb").path
    freed = d.prune(keep={ids[1]})
    left = sorted(p.name for p in cache.iterdir())
    # 10 MiB held, 5 allowed: the least recently used go (ids[1] is kept on request)
    assert freed == 6 * MIB
    assert left == sorted([ids[0], ids[1]]), left
    assert d.cached(ids[2], "result.glb") == ""
    # within the limit nothing more goes
    assert d.prune() == 0 and sorted(p.name for p in cache.iterdir()) == left
