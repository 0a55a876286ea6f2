"""The history is complete and manageable (every job reachable by pages or search, one job
deleted or old ones cleared with the space they use shown, re-exports labelled), and a
`blender -b` script drives cancel, the queue, re-export and new seed as docs/BLENDER.md says."""

from __future__ import annotations

import dataclasses

import pytest

bpy = pytest.importorskip("bpy")

from .conftest import EXAMPLE, submodule  # noqa: E402
from .support import draw, labels_in, operators_in, tick_until  # noqa: E402

pytestmark = pytest.mark.bpy
NAMES = ("duck", "mug", "robot")


def texts(log) -> list[str]:
    return [text for text, _ in labels_in(log)]


def three_jobs(ctrl) -> list:
    ctrl.start(wait=True, timeout=60)
    image = EXAMPLE.read_bytes()
    views = [
        ctrl.submit(image, {"preset": "fast", "seed": i}, name, f"{name}.png", auto_import=False)
        for i, name in enumerate(NAMES)
    ]
    ctrl.wait_idle(120)
    assert [v.state for v in views] == ["done"] * 3
    return views


def history_settled(ctrl) -> bool:
    return not ctrl.history.stale and ctrl.history.request is None


def test_every_job_is_reachable_by_pages_and_by_search(scene, ctrl):
    ctrl.history.page_size = 2
    views = three_jobs(ctrl)
    first = ctrl.history_blocking()
    assert len(first) == 2 and ctrl.history.total == 3 and ctrl.history.pages == 2
    log = draw(bpy.types.TRELLIS2_PT_history, bpy.context)
    assert "Page 1 of 2 (3 jobs)" in texts(log) and "trellis2.history_page" in operators_in(log)
    assert bpy.ops.trellis2.history_page(page=1) == {"FINISHED"}
    tick_until(ctrl, lambda: history_settled(ctrl))
    second = ctrl.history.entries
    assert len(second) == 1
    assert {e["job_id"] for e in first + second} == {v.job_id for v in views}

    scene.trellis2.history_query = "MUG"  # the search field asks the backend
    tick_until(ctrl, lambda: history_settled(ctrl))
    assert [e["name"] for e in ctrl.history.entries] == ["mug"] and ctrl.history.page == 0
    scene.trellis2.history_query = "no such thing"
    tick_until(ctrl, lambda: history_settled(ctrl))
    assert "No jobs match" in texts(draw(bpy.types.TRELLIS2_PT_history, bpy.context))


def test_delete_a_job_and_clear_old_ones_seeing_the_space_they_use(scene, ctrl):
    three_jobs(ctrl)
    entries = ctrl.history_blocking()
    sizes = {e["job_id"]: e["bytes"] for e in entries}
    assert all(size > 0 for size in sizes.values())
    fmt = submodule("wording").format_bytes
    log = draw(bpy.types.TRELLIS2_PT_history, bpy.context)
    assert f"{fmt(entries[0]['bytes'])} on disk" in texts(log)
    assert "trellis2.delete_job" in operators_in(log)

    victim = entries[-1]["job_id"]
    assert bpy.ops.trellis2.delete_job(job_id=victim) == {"FINISHED"}
    tick_until(ctrl, lambda: ctrl.history.total == 2 and history_settled(ctrl))
    assert victim not in {e["job_id"] for e in ctrl.history.entries}
    assert ctrl.history.notice == f"Deleted 1 job(s), {fmt(sizes[victim])} freed"

    scene.trellis2.history_days = 0  # every finished job is "older than 0 days"
    tick_until(ctrl, lambda: ctrl.history.prune is not None and history_settled(ctrl))
    remaining = sum(size for job_id, size in sizes.items() if job_id != victim)
    assert ctrl.history.prune["count"] == 2 and ctrl.history.prune["bytes"] == remaining
    log = draw(bpy.types.TRELLIS2_PT_history, bpy.context)
    clear = [
        kw for name, args, kw in log if name == "operator" and args[0].endswith("clear_history")
    ]
    assert clear[0]["text"] == f"Clear 2 ({fmt(remaining)})"
    assert bpy.ops.trellis2.clear_history(days=0) == {"FINISHED"}
    tick_until(ctrl, lambda: ctrl.history.total == 0 and history_settled(ctrl))
    assert "No jobs yet" in texts(draw(bpy.types.TRELLIS2_PT_history, bpy.context))


def test_the_history_says_where_it_comes_from_when_no_backend_runs(scene, ctrl):
    found = texts(draw(bpy.types.TRELLIS2_PT_history, bpy.context))
    assert "The backend keeps the history: start it to list jobs" in found


def test_a_script_drives_cancel_the_queue_reexport_and_new_seed(scene, ctrl, monkeypatch):
    """docs/BLENDER.md, "Scripts and blender -b", step by step."""
    props = scene.trellis2
    props.source, props.filepath, props.preset = "FILE", str(EXAMPLE), "fast"
    assert bpy.ops.trellis2.generate() == {"FINISHED"}  # blocks in background mode
    job_id = bpy.context.object["trellis2_job"]  # the imported model names its job

    # Queue two, cancel the one that runs, wait for the other. (A slow engine, so that the
    # first one still runs when it is cancelled.)
    slow = dataclasses.replace(
        ctrl.config,
        engine="tests.cpu_engines:SlowEngine",
        engine_options={"steps": "40", "step_seconds": "0.05"},
    )
    with monkeypatch.context() as mp:
        mp.setattr(submodule("operators"), "backend_config", lambda prefs: slow)
        bpy.ops.trellis2.backend(action="RESTART")  # new settings: blocks until ready
        before = set(ctrl.jobs)
        bpy.ops.trellis2.generate(mode="ASYNC")
        bpy.ops.trellis2.generate(mode="ASYNC")
        first, second = (ctrl.jobs[k] for k in ctrl.jobs if k not in before)
        tick_until(ctrl, lambda: first.state == "running")
        assert bpy.ops.trellis2.cancel() == {"FINISHED"}  # no job_id: the one running now
        assert bpy.ops.trellis2.wait() == {"FINISHED"}
        assert (first.state, second.state) == ("cancelled", "done")
        assert not ctrl.active_jobs()

    bpy.ops.trellis2.backend(action="RESTART")  # the preferences' settings again
    assert bpy.ops.trellis2.reexport(job_id=job_id) == {"FINISHED"}
    assert bpy.ops.trellis2.wait() == {"FINISHED"}
    reexport = list(ctrl.jobs.values())[-1]
    assert reexport.kind == "reexport" and reexport.state == "done", reexport.message
    assert reexport.imported

    assert bpy.ops.trellis2.regenerate(job_id=job_id) == {"FINISHED"}  # new seed
    assert bpy.ops.trellis2.wait() == {"FINISHED"}
    again = list(ctrl.jobs.values())[-1]
    assert again.state == "done" and again.seed == props.last_seed and again.name == "duck_on_grey"


# -- the history's rules, without a backend (blender_addon/history.py) -------------------------


class Reply:
    def __init__(self, reply=None, error=None):
        self.ok, self.reply, self.error = error is None, reply or {}, error


def test_a_job_reply_is_an_entry_named_by_its_job_id(addon):
    history = submodule("history")
    record = {"job_id": "j7", "kind": "generate", "state": "done", "filename": "duck.png"}
    record["result"] = {"glb_path": "/store/j7/result.glb"}
    entry = history.job_entry(
        {"job": record, "folder": "/store/j7", "files": {"input.png": 10, "result.glb": 20}}
    )
    assert entry["job_id"] == "j7" and entry["name"] == "duck" and entry["input"] == "input.png"


def test_the_page_search_and_clean_up_rules(addon):
    h = submodule("history").HistoryView(total=20, page_size=8)
    assert h.pages == 3
    h.stale = False
    h.turn_to(9)
    assert h.page == 2 and h.stale
    assert h.listing() == {"limit": 8, "offset": 16} and not h.stale
    h.search("  duck ")
    assert (h.query, h.page, h.stale) == ("duck", 0, True)
    assert h.listing()["query"] == "duck"
    assert h.prune_preview() == {"older_than_days": 30, "dry_run": True}
    h.on_prune_preview(Reply({"count": 2, "bytes": 5}))
    assert h.prune_preview() is None
    h.set_prune_days(7)
    assert h.prune is None and h.prune_preview()["older_than_days"] == 7
    assert submodule("history").delete_request("j1") == {"job_id": "j1"}
    assert submodule("history").delete_request(older_than_days=3) == {"older_than_days": 3}


def test_a_gateway_listing_is_one_page_and_an_emptied_page_steps_back(addon):
    h = submodule("history").HistoryView()
    assert h.on_listing(Reply({"jobs": [{"job_id": "a", "filename": "a.png"}]}))
    assert h.total == 1 and h.loaded and h.entries[0]["name"] == "a"
    h.page, h.stale = 2, False
    assert not h.on_listing(Reply({"jobs": [], "total": 9, "offset": 16}))
    assert h.page == 1 and h.stale  # deletes emptied the page: the last one is asked for
