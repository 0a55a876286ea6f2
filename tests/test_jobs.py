"""The on-disk job store: atomic writes, lifecycle table, history that survives restarts."""

from __future__ import annotations

import json

import pytest

from backend.errors import BackendError, ErrorCode
from backend.jobs import JobState, JobStore


def test_job_folder_holds_inputs_and_request(tmp_path):
    store = JobStore(tmp_path)
    record = store.create(
        "generate",
        "preview",
        {"seed": 1},
        image=b"PNGDATA",
        image_ext="png",
        filename="mug.png",
        thumbnail=b"THUMB",
    )
    folder = store.folder(record.id)
    assert (folder / "input.png").read_bytes() == b"PNGDATA"
    assert (folder / "thumbnail.png").read_bytes() == b"THUMB"
    request = json.loads((folder / "request.json").read_text())
    assert request["params"] == {"seed": 1} and request["filename"] == "mug.png"
    assert store.get(record.id).state is JobState.QUEUED
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files


def test_lifecycle_follows_the_table_and_terminal_states_are_sticky(tmp_path):
    store = JobStore(tmp_path)
    job = store.create("generate", "preview", {})
    assert store.transition(job.id, "start").state is JobState.RUNNING
    done = store.transition(job.id, "finish", result={"glb_path": "x"})
    assert done.state is JobState.DONE and done.finished is not None
    for event in ("start", "fail", "cancel", "requeue", "finish"):
        with pytest.raises(BackendError):
            store.transition(job.id, event)
    assert store.get(job.id).state is JobState.DONE


def test_history_survives_a_new_store_instance(tmp_path):
    first = JobStore(tmp_path)
    ids = [first.create("generate", "preview", {"seed": i}).id for i in range(3)]
    first.transition(ids[0], "start")
    records, warnings = JobStore(tmp_path).list()
    assert [r.id for r in records] == ids[::-1]  # newest first
    assert warnings == []
    assert [r.id for r in JobStore(tmp_path).unfinished()] == ids  # oldest first


def test_corrupt_job_folder_is_skipped_with_a_warning(tmp_path):
    store = JobStore(tmp_path)
    good = store.create("generate", "preview", {})
    bad = store.create("generate", "preview", {})
    (store.folder(bad.id) / "job.json").write_text("{ truncated")
    (store.jobs_dir / "not-a-job").mkdir()
    records, warnings = store.list()
    assert [r.id for r in records] == [good.id]
    assert len(warnings) == 1 and bad.id in warnings[0]


@pytest.mark.parametrize(
    "job_id",
    [
        "../../etc",
        "..",
        "/etc/passwd",
        "20260101-000000-zzzzzz",
        "20260101-000000-abcdef/../x",
        "",
        5,
    ],
)
def test_ids_cannot_escape_the_store(tmp_path, job_id):
    store = JobStore(tmp_path)
    with pytest.raises(BackendError) as err:
        store.get(job_id)
    assert err.value.code is ErrorCode.NOT_FOUND


def test_log_excerpt_is_bounded(tmp_path):
    from backend.jobs import LOG_EXCERPT_BYTES

    store = JobStore(tmp_path)
    job = store.create("generate", "preview", {})
    for i in range(2000):
        store.append_log(job.id, f"line {i} " + "x" * 40)
    text = store.log_excerpt(job.id)
    assert len(text.encode()) <= LOG_EXCERPT_BYTES
    assert "line 1999" in text


def test_disk_full_while_creating_a_job_is_a_typed_error(tmp_path, monkeypatch):
    import errno

    from backend import jobs

    store = JobStore(tmp_path)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobs, "atomic_write_bytes", full)
    with pytest.raises(BackendError) as err:
        store.create("generate", "preview", {}, image=b"x")
    assert err.value.code is ErrorCode.DISK_FULL
    assert list(store.jobs_dir.iterdir()) == []  # nothing half-written is left
