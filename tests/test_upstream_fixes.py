"""Workarounds for faults of the real TRELLIS.2 code (engines/upstream_fixes.py), on CPU."""

from __future__ import annotations

import sys
import types

from backend.engines import upstream_fixes
from backend.pipeline import gpu


def test_torch_cache_is_released_before_each_cumesh_step_and_cumesh_is_left_as_it_was(
    monkeypatch,
):
    calls: list[str] = []

    class CuMesh:  # CuMesh's Python class: these steps allocate with cudaMalloc
        def init(self, *args):
            calls.append("init")

        def simplify(self, *args):
            calls.append("simplify")

        def uv_unwrap(self, *args):
            calls.append("uv_unwrap")

        def fill_holes(self):
            calls.append("fill_holes")

    originals = dict(vars(CuMesh))
    monkeypatch.setitem(sys.modules, "cumesh", types.SimpleNamespace(CuMesh=CuMesh))
    monkeypatch.setattr(gpu, "release_cache", lambda: calls.append("release"))
    with upstream_fixes.cache_released_for_cumesh():
        mesh = CuMesh()
        mesh.init()
        mesh.fill_holes()
        mesh.simplify(10)
        mesh.uv_unwrap()
    assert calls == ["release", "init", "fill_holes", "release", "simplify", "release", "uv_unwrap"]
    assert dict(vars(CuMesh)) == originals  # restored: nothing else sees the wrapper
    calls.clear()
    CuMesh().simplify(1)
    assert calls == ["simplify"]


def test_without_cumesh_the_export_runs_unchanged(monkeypatch):
    monkeypatch.setitem(sys.modules, "cumesh", None)  # import fails
    with upstream_fixes.cache_released_for_cumesh():
        pass


def test_the_voxeliser_is_always_asked_for_no_timings():
    seen = []
    convert = types.SimpleNamespace(
        mesh_to_flexible_dual_grid=lambda *a, **k: seen.append(k.get("timing")) or "ok"
    )
    upstream_fixes.quiet_voxeliser(convert)
    quiet = convert.mesh_to_flexible_dual_grid
    upstream_fixes.quiet_voxeliser(convert)  # a second texturing pipeline: wrapped once
    assert convert.mesh_to_flexible_dual_grid is quiet
    assert convert.mesh_to_flexible_dual_grid(1, 2, grid_size=8, timing=True) == "ok"
    assert seen == [False]
