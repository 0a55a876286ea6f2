"""The job views' table (blender_addon/views.py), driven with events only: no backend, no
scene. Every row does what it says; every pair with no row (a late or unknown event, anything
on an ended job) leaves the view exactly as it was."""

from __future__ import annotations

import dataclasses

import pytest

bpy = pytest.importorskip("bpy")

from .conftest import submodule  # noqa: E402

pytestmark = pytest.mark.bpy
NOW = 1234.5


@pytest.fixture(scope="module")
def v(addon):
    return submodule("views")


def make(v, state: str, **flags):
    """A view in `state` of a job the backend has (flags override)."""
    fields = dict(key="job-1", name="duck", job_id="j1", state=state, on_backend=True)
    fields.update(auto_import=False, message="before", label="before", position=3)
    fields.update(flags)
    return v.JobView(**fields)


# For each refined event: the event the controller sends and the flags that make it so.
def raw(v, event: str) -> tuple[str, dict, bool]:
    """(event sent, view flags, importing) that reach the table's `event`."""
    if event == v.REFUSED_CANCELLED:
        return v.REFUSED, {"cancel_requested": True}, True
    if event == v.CANCEL_UNSENT:
        return v.CANCEL, {"on_backend": False}, True
    if event == v.JOB_DONE_IMPORT:
        return v.JOB_DONE, {"auto_import": True}, True
    return event, {}, True


CONTENT = {
    "message": "it broke",
    "hint": "try again",
    "label": "Waiting for the next backend",
    "position": 2,
    "kind": "texture",
    "stage": "shape",
    "fraction": 0.5,
    "level": 2,
    "reason": "out_of_memory",
    "path": "/cache/result.glb",
    "size": 2_000_000,
    "final_params": {"seed": 7},
    "oom_quality_degradation_level": 1,
}


def test_every_state_has_a_row_list_and_every_row_a_known_target(v):
    assert set(v.TRANSITIONS) == set(v.STATES)
    for state, table in v.TRANSITIONS.items():
        for event, (target, _, actions) in table.items():
            assert target in v.STATES, (state, event)
            assert set(actions) <= {v.SEND_CANCEL, v.UNQUEUE, v.DOWNLOAD, v.STOP_DOWNLOAD, v.IMPORT}
    for state in v.TERMINAL:  # sticky: only an import's failure annotates a done job
        assert set(v.TRANSITIONS[state]) <= {v.IMPORT_FAILED}
        assert all(row[0] == state for row in v.TRANSITIONS[state].values())


@pytest.mark.parametrize("cancelled", [False, True], ids=["plain", "cancel_requested"])
def test_each_row_moves_the_view_and_names_its_actions(v, cancelled):
    for state, table in v.TRANSITIONS.items():
        for event, (target, _, actions) in table.items():
            sent, flags, importing = raw(v, event)
            if cancelled and event in (v.CANCEL_UNSENT, v.JOB_DONE_IMPORT):
                continue  # a cancelled job is never "unsent" here nor imported
            if cancelled:
                flags = {**flags, "cancel_requested": True}
            if event == v.REFUSED and cancelled:
                continue  # that is REFUSED_CANCELLED's row
            view = make(v, state, **flags)
            got = v.step(view, sent, dict(CONTENT), now=NOW, importing=importing)
            assert view.state == target, (state, event)
            expected = [a for a in actions if a != v.SEND_CANCEL or view.cancel_requested]
            ends = target in v.TERMINAL and state not in v.TERMINAL
            assert list(got) == ([v.ENDED] if ends else []) + expected, (state, event)
            if ends:
                assert view.finished == NOW and view.position is None
                assert view.label == ("Done" if target == v.DONE else target.capitalize())


def test_cancel_sends_a_cancel_only_for_the_job_it_asked_for(v):
    for state in (v.SUBMITTING, v.QUEUED, v.RUNNING, v.WAITING):
        view = make(v, state)
        assert v.step(view, v.CANCEL, now=NOW) == (v.SEND_CANCEL,)
        assert view.cancel_requested and view.label == "Cancelling" and view.state == state
    view = make(v, v.QUEUED)
    assert v.step(view, v.JOB_STARTED, {}, now=NOW) == ()  # nobody cancelled it
    view.cancel_requested = True
    assert v.step(view, v.JOB_QUEUED, {}, now=NOW) == (v.SEND_CANCEL,)  # a new backend took it


@pytest.mark.parametrize("event", ["job_paused", "", "supervisor_state", "heartbeat"])
def test_an_unknown_event_changes_no_view(v, event):
    for state in v.STATES:
        view = make(v, state)
        before = dataclasses.replace(view)
        assert v.step(view, event, dict(CONTENT), now=NOW) is None
        assert view == before


def test_a_late_event_leaves_the_view_as_it_was(v):
    """Every pair the table has no row for, with every combination of the flags that refine."""
    checked = 0
    for state in v.STATES:
        for event in v.EVENTS:
            for cancel in (False, True):
                for on_backend in (False, True):
                    for auto_import in (False, True):
                        flags = dict(cancel_requested=cancel, on_backend=on_backend)
                        view = make(v, state, auto_import=auto_import, **flags)
                        refined = v._refine(view, event, True)
                        if refined in v.TRANSITIONS[state]:
                            continue
                        before = dataclasses.replace(view)
                        assert v.step(view, event, dict(CONTENT), now=NOW) is None, (state, event)
                        assert view == before, (state, event)
                        checked += 1
    assert checked > 100  # most pairs are not rows: the table is small on purpose


def test_ended_jobs_are_sticky(v):
    for state in v.TERMINAL:
        for event in v.EVENTS:
            if state == v.DONE and event == v.IMPORT_FAILED:
                continue
            view = make(v, state, finished=1.0)
            before = dataclasses.replace(view)
            assert v.step(view, event, dict(CONTENT), now=NOW) is None
            assert view == before, (state, event)


def test_what_the_rows_write(v):
    view = make(v, v.SUBMITTING)
    v.step(view, v.ACCEPTED, {"job_id": "j1", "position": 4}, now=NOW)
    assert (view.state, view.label, view.position) == ("queued", "", 4)
    v.step(view, v.JOB_PROGRESS, {"stage": "shape", "label": "Shape", "fraction": 0.25}, now=NOW)
    assert (view.state, view.stage, view.label, view.fraction) == (
        "running",
        "shape",
        "Shape",
        0.25,
    )
    died = {"reason": "job_process_died", "message": "its job process 7 was killed by SIGKILL"}
    v.step(view, v.JOB_RETRY, died, now=NOW)
    assert view.level == 0 and view.message == f"running again: {died['message']}"
    v.step(view, v.JOB_RETRY, {"level": 3, "reason": "out_of_memory"}, now=NOW)
    assert view.level == 3 and view.message.startswith("retrying at quality level 3")
    v.step(view, v.JOB_DONE, {"final_params": {"seed": 9}}, now=NOW, importing=False)
    assert (view.state, view.fraction, view.label, view.seed) == ("done", 1.0, "Done", 9)
    assert view.message.startswith("retrying")  # an ending with no words keeps the last ones


def test_a_result_is_downloaded_then_imported(v):
    view = make(v, v.RUNNING, auto_import=True)
    assert v.step(view, v.JOB_DONE, {"oom_quality_degradation_level": 2}, now=NOW) == (v.DOWNLOAD,)
    assert (view.state, view.level, view.label) == ("downloading", 2, "Downloading the result")
    assert v.step(view, v.JOB_DONE, {}, now=NOW) is None  # the event and a `job` check: one
    v.step(view, v.FILE_PROGRESS, {"fraction": 0.5, "size": 2_000_000}, now=NOW)
    assert view.fraction == 0.5 and view.label == "Downloading the result (2.0 MB)"
    assert v.step(view, v.FILE_ARRIVED, {"path": "/c/r.glb"}, now=NOW) == (v.ENDED, v.IMPORT)
    assert (view.state, view.glb_path) == ("done", "/c/r.glb")
    v.step(view, v.IMPORT_FAILED, {"message": "no\nroom"}, now=NOW)
    assert (view.state, view.message) == ("done", "import failed: no")


def test_a_job_the_user_cancelled_is_never_imported(v):
    view = make(v, v.RUNNING, auto_import=True, cancel_requested=True)
    assert v.step(view, v.JOB_DONE, {}, now=NOW) == (v.ENDED,)
    view = make(v, v.DOWNLOADING, auto_import=True)
    assert v.step(view, v.CANCEL, now=NOW) == (v.ENDED, v.STOP_DOWNLOAD)
    assert view.state == "done" and view.message.startswith("done; not imported")
    assert v.step(view, v.FILE_ARRIVED, {"path": "/c/r.glb"}, now=NOW) is None
    assert view.glb_path is None


def test_refusals_and_failures_carry_their_words(v):
    view = make(v, v.SUBMITTING, on_backend=False)
    v.step(view, v.REFUSED, {"message": "busy\nmore", "hint": "Wait"}, now=NOW)
    assert (view.state, view.message, view.hint) == ("failed", "busy", "Wait")
    view = make(v, v.SUBMITTING, on_backend=False, cancel_requested=True)
    v.step(view, v.REFUSED, {"message": "busy"}, now=NOW)
    assert (view.state, view.message) == ("cancelled", "cancelled before the backend took it")
    view = make(v, v.WAITING, on_backend=False)
    assert v.step(view, v.CANCEL, now=NOW) == (v.ENDED, v.UNQUEUE)
    assert view.message == "cancelled before it was sent"
    view = make(v, v.QUEUED)
    v.step(view, v.RECORD_GONE, {"message": "no job j1"}, now=NOW)
    assert view.message == "the job's record is gone: no job j1" and "removed" in view.hint
    view = make(v, v.WAITING, on_backend=False)
    v.step(view, v.NOT_SENT, {"message": "gave up", "hint": "Restart"}, now=NOW)
    assert (view.message, view.hint) == ("not sent: gave up", "Restart")


def test_a_parked_job_waits_for_the_next_backend(v):
    view = make(v, v.RUNNING, stage="shape", fraction=0.4)
    v.step(view, v.PARKED, {"label": "Waiting for the next backend"}, now=NOW)
    assert (view.state, view.label, view.stage, view.fraction, view.position) == (
        "waiting",
        "Waiting for the next backend",
        "",
        0.0,
        None,
    )
    v.step(view, v.RECORD_RUNNING, {}, now=NOW)
    assert (view.state, view.label) == ("running", "")


def test_a_record_stands_for_its_event(v):
    assert v.record_event({"job_id": "j1", "state": "queued"}) == (v.RECORD_QUEUED, {})
    assert v.record_event({"job_id": "j1", "state": "running"}) == (v.RECORD_RUNNING, {})
    assert v.record_event({"job_id": "j1", "state": "weird"}) is None
    event, content = v.record_event(
        {"job_id": "j1", "state": "done", "level": 2, "result": {"glb_path": "/r.glb"}}
    )
    assert event == v.JOB_DONE and content["job_id"] == "j1" and content["glb_path"] == "/r.glb"
    event, content = v.record_event(
        {"job_id": "j1", "state": "failed", "error": {"code": "x", "message": "m"}}
    )
    assert (event, content) == (v.JOB_FAILED, {"job_id": "j1", "code": "x", "message": "m"})
    assert v.record_event({"job_id": "j1", "state": "cancelled"}) == (
        v.JOB_CANCELLED,
        {"job_id": "j1"},
    )


def test_events_that_came_first_are_merged_into_the_view_the_reply_names(v):
    view = make(v, v.SUBMITTING, job_id="")
    other = make(v, v.RUNNING, stage="shape", fraction=0.3, label="Shape")
    v.merge(view, other)
    assert (view.state, view.stage, view.fraction, view.label) == ("running", "shape", 0.3, "Shape")
    assert view.key == "job-1" and view.name == "duck"
