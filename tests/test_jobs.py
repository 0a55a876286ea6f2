"""The on-disk job store: atomic writes, lifecycle table, history that survives restarts."""

from __future__ import annotations

import json

import pytest

from backend.errors import BackendError, ErrorCode
from backend.store.jobs import JobState, JobStore


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
    "field, value",
    [
        ("created", "yesterday"),
        ("created", None),
        ("created", float("nan")),
        ("started", "noon"),
        ("finished", float("inf")),
        ("attempts", "x"),
        ("recoveries", -1),
        ("recoveries", True),
        ("level", [1]),
        ("backend_pid", 1.5),
        ("parent", 7),
        ("extra", []),
        ("result", {"seconds": float("nan")}),  # no client could decode it
    ],
)
def test_a_record_edited_to_wrong_types_is_a_corrupt_folder_not_a_crash(tmp_path, field, value):
    """Sorting, paging and sending records trust their types: a record another program
    edited is skipped with a warning, and the listing (which a starting backend reads to
    recover its queue) still works."""
    store = JobStore(tmp_path)
    good = store.create("generate", "preview", {})
    bad = store.create("generate", "preview", {})
    path = store.folder(bad.id) / "job.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))  # writes NaN and Infinity as Python does
    records, warnings = JobStore(tmp_path).list()
    assert [r.id for r in records] == [good.id]
    assert len(warnings) == 1 and bad.id in warnings[0]
    with pytest.raises(BackendError) as err:
        store.get(bad.id)
    assert err.value.code is ErrorCode.NOT_FOUND


@pytest.mark.parametrize(
    "job_id",
    [
        "20260101-000000-abcdef\n",  # `$` would match before a final newline
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
    from backend.store.jobs import LOG_EXCERPT_BYTES

    store = JobStore(tmp_path)
    job = store.create("generate", "preview", {})
    for i in range(2000):
        store.append_log(job.id, f"line {i} " + "x" * 40)
    text = store.log_excerpt(job.id)
    assert len(text.encode()) <= LOG_EXCERPT_BYTES
    assert "line 1999" in text


def test_disk_full_while_creating_a_job_is_a_typed_error(tmp_path, monkeypatch):
    import errno

    from backend import safefs

    store = JobStore(tmp_path)

    def full(operation, path):
        if operation == "write":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(safefs, "fault", full)
    with pytest.raises(BackendError) as err:
        store.create("generate", "preview", {}, image=b"x")
    assert err.value.code is ErrorCode.DISK_FULL
    assert list(store.jobs_dir.iterdir()) == []  # nothing half-written is left


# -- the store as a trust boundary -------------------------------------------------------------


def _fail_writes(monkeypatch, code=None):
    """Every disk change through safefs fails with `code` (None: works again)."""
    import os

    from backend import safefs

    def fault(operation, path):
        if code is not None:
            raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(safefs, "fault", fault)


def test_a_job_that_cannot_be_recorded_still_ends_and_is_written_later(tmp_path, monkeypatch):
    import errno

    store = JobStore(tmp_path)
    job = store.create("generate", "preview", {})
    store.transition(job.id, "start")
    _fail_writes(monkeypatch, errno.ENOSPC)
    with pytest.raises(BackendError) as err:
        store.transition(job.id, "finish")
    assert err.value.code is ErrorCode.DISK_FULL and store.problem is not None
    assert store.get(job.id).state is JobState.RUNNING  # a failed write changes nothing
    assert store.settle(job.id, err.value)
    settled = store.get(job.id)  # kept in memory, seen by get and list
    assert settled.state is JobState.FAILED and settled.error["code"] == "disk_full"
    assert not store.settle(job.id, err.value)  # it has ended: once
    assert store.list()[0][0].state is JobState.FAILED
    on_disk = json.loads((store.folder(job.id) / "job.json").read_text())
    assert on_disk["state"] == "running"
    assert not store.recover()  # still full
    _fail_writes(monkeypatch, None)
    assert store.recover() and store.problem is None and store.pending() == []
    on_disk = json.loads((store.folder(job.id) / "job.json").read_text())
    assert on_disk["state"] == "failed" and on_disk["error"]["code"] == "disk_full"


def test_a_read_only_folder_is_a_typed_error(tmp_path, monkeypatch):
    import errno

    store = JobStore(tmp_path)
    _fail_writes(monkeypatch, errno.EROFS)
    with pytest.raises(BackendError) as err:
        store.create("generate", "preview", {})
    assert err.value.code is ErrorCode.OUTPUT_UNWRITABLE and err.value.retryable
    assert "Read-only file system" in err.value.message
    assert store.problem.code is ErrorCode.OUTPUT_UNWRITABLE


def test_links_in_a_job_folder_are_refused_never_followed(tmp_path):
    store = JobStore(tmp_path / "out")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    job = store.create("generate", "preview", {}, image=b"PNG")
    folder = store.folder(job.id)
    (folder / "log.txt").symlink_to(outside)
    store.append_log(job.id, "a line")  # refused: the link is neither read nor replaced
    assert store.log_excerpt(job.id) == ""
    assert store.read(job.id, "log.txt") is None
    assert "log.txt" not in store.files(job.id) and "input.png" in store.files(job.id)
    with pytest.raises(BackendError) as err:
        store.prepare(job.id)
    assert err.value.code is ErrorCode.OUTPUT_UNWRITABLE and "log.txt" in err.value.message
    assert store.problem is None  # one job's link is not the whole folder's problem
    (folder / "log.txt").unlink()
    (folder / "result.tmp.glb").symlink_to(outside)
    with pytest.raises(BackendError):
        store.prepare(job.id)
    assert outside.read_text() == "secret" and (folder / "result.tmp.glb").is_symlink()


def test_a_job_folder_that_is_a_link_is_not_a_job(tmp_path):
    store = JobStore(tmp_path / "out")
    good = store.create("generate", "preview", {})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    planted = "20990101-000000-abcdef"
    (elsewhere / "job.json").write_text(
        json.dumps(
            {"id": planted, "kind": "generate", "state": "queued", "engine": "x", "params": {}}
        )
    )
    (store.jobs_dir / planted).symlink_to(elsewhere)
    records, warnings = store.list()
    assert [r.id for r in records] == [good.id]
    assert any(planted in w for w in warnings)
    with pytest.raises(BackendError) as err:
        store.get(planted)
    assert err.value.code is ErrorCode.NOT_FOUND
    assert store.unfinished() == [store.get(good.id)]


def test_a_listing_is_newest_first_and_stops_at_its_limit(tmp_path):
    store = JobStore(tmp_path)
    ids = [store.create("generate", "preview", {"seed": i}).id for i in range(5)]
    records, warnings = store.list(3)
    assert [r.id for r in records] == ids[::-1][:3] and warnings == []
    assert [r.id for r in store.list()[0]] == ids[::-1]


def test_a_cancel_request_is_written_for_a_running_job_only(tmp_path):
    store = JobStore(tmp_path)
    job = store.create("generate", "preview", {})
    assert store.request_cancel(job.id)  # queued: nothing to note (cancelled at once instead)
    assert not store.get(job.id).cancel_requested
    store.transition(job.id, "start")
    assert store.request_cancel(job.id) and store.get(job.id).cancel_requested
    store.transition(job.id, "cancel")
    assert not store.request_cancel(job.id)  # ended


def test_one_rule_for_running_a_job_again_and_one_shape_for_its_final_event(tmp_path):
    """A job whose backend died runs once more, then fails; and every finished job's event
    is built from its record in one place (the runner and the studio workers send it)."""
    from backend.store.jobs import JobRecord, JobState, outcome_event

    record = JobRecord(
        id="20260101-000000-abcdef",
        kind="generate",
        state=JobState.RUNNING,
        engine="preview",
        params={},
    )
    assert record.may_run_again
    record.recoveries = 1
    assert not record.may_run_again
    record.state, record.level = JobState.DONE, 2
    record.final_params = {"resolution": 768}
    record.result = {"glb_path": "/x/result.glb", "degraded_reason": "why", "seconds": 1.5}
    kind, content = outcome_event(record)
    assert kind == "job_done" and content["degraded"] is True
    assert content["oom_quality_degradation_level"] == 2 and content["warnings"] == []
    assert "worker" not in content
    record.extra["worker"] = "gpu0"
    assert outcome_event(record)[1]["worker"] == "gpu0"
    record.state, record.error = JobState.FAILED, {"code": "engine_error", "message": "m"}
    assert outcome_event(record) == (
        "job_failed",
        {"job_id": record.id, "code": "engine_error", "message": "m"},
    )


def test_the_clients_rebuilt_event_has_the_fields_of_the_one_sent():
    from backend.store.jobs import JobRecord, JobState, outcome_event
    from backend.wire.client import _event_from_record

    record = JobRecord(
        id="20260101-000000-abcdef",
        kind="generate",
        state=JobState.DONE,
        engine="preview",
        params={},
        level=1,
        final_params={"resolution": 512},
        result={"glb_path": "/r.glb", "mesh_stats": {"faces": 3}, "warnings": ["w"], "seconds": 2},
    )
    kind, sent = outcome_event(record)
    rebuilt = _event_from_record(record.to_wire())
    assert rebuilt.pop("event") == kind and rebuilt == sent
