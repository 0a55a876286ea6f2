"""Blender never waits on the backend, and its timer cannot die.

Every operator and the tick run against a backend that is frozen (SIGSTOP) or gone (SIGKILL)
while every way of waiting - a blocking request, a poll with a timeout, a sleep, the blocking
stop, a process wait - is replaced by a trap. A trap raises BaseException, which no `except
Exception` in the add-on can swallow, and records what was called: the test proves that none
of them waited, without timing anything. (How long they take is measured by
scripts/bench_stall.py, reported in docs/PERFORMANCE.md.)"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
import threading
import time

import pytest

bpy = pytest.importorskip("bpy")

from .conftest import EXAMPLE, MODULE, submodule  # noqa: E402
from .support import draw, labels_in, tick_until  # noqa: E402

pytestmark = [
    pytest.mark.bpy,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals in tests"),
]

PANELS = ("main", "texture", "variations", "batch", "advanced", "import", "queue", "history")
PANELS += ("backend",)


class Waited(BaseException):
    """The add-on called something that waits."""


def pause(seconds: float) -> None:
    threading.Event().wait(seconds)  # the test's own pause: time.sleep is a trap


def fast_supervisors(ctrl) -> None:
    """Short heartbeat and shutdown-ladder waits, so a frozen backend is replaced in seconds."""
    make = submodule("launch").make_supervisor

    def factory(config):
        sup = make(dataclasses.replace(config, heartbeat_timeout=1.5))
        sup.policy.shutdown_wait = sup.policy.terminate_wait = sup.policy.kill_wait = 0.5
        return sup

    ctrl.supervisor_factory = factory


def install_traps(mp, waits: list[str]) -> None:
    client = sys.modules[f"{MODULE}.backend.wire.client"].Client
    supervisor = sys.modules[f"{MODULE}.backend.supervision.supervisor"].Supervisor
    controller = submodule("controller").Controller
    import subprocess

    import zmq

    def trap(name):
        def called(*args, **kwargs):
            waits.append(name)
            raise Waited(name)

        return called

    for owner, names in (
        (client, ("wait_reply", "request", "wait_for_job")),
        (supervisor, ("stop", "start_and_wait", "wait_ready", "wait_for_job", "_wait_until")),
        (controller, ("_wait_until", "wait_doctor", "shutdown")),
        (subprocess.Popen, ("wait", "communicate")),
    ):
        for name in names:
            mp.setattr(owner, name, trap(f"{owner.__name__}.{name}"))
    mp.setattr(time, "sleep", trap("time.sleep"))
    poll, zpoll = client.poll, zmq.Poller.poll

    def client_poll(self, timeout=0.0):
        if timeout:
            return trap(f"Client.poll({timeout})")()
        return poll(self, 0.0)

    def zmq_poll(self, timeout=None):
        if timeout != 0:
            return trap(f"zmq.Poller.poll({timeout})")()
        return zpoll(self, 0)

    mp.setattr(client, "poll", client_poll)
    mp.setattr(zmq.Poller, "poll", zmq_poll)
    for sup in (ctrl_supervisor(),):
        if sup is not None:
            mp.setattr(sup, "sleep", trap("Supervisor.sleep"))


def ctrl_supervisor():
    ctrl = submodule("runtime").get()
    return ctrl.supervisor if ctrl is not None else None


def run(name: str, **kwargs) -> set:
    """An operator as a button press; a refused poll counts as returning at once."""
    module, _, op = name.partition(".")
    try:
        return getattr(getattr(bpy.ops, module), op)(**kwargs)
    except RuntimeError as exc:
        assert "poll" in str(exc), exc
        return {"REFUSED"}


@pytest.mark.parametrize("fault", ["frozen", "gone"])
def test_no_operator_or_tick_waits_on_a_frozen_or_gone_backend(
    scene, ctrl, monkeypatch, fault, tmp_path
):
    fast_supervisors(ctrl)
    props = scene.trellis2
    props.filepath, props.preset = str(EXAMPLE), "fast"
    (tmp_path / "batch").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "batch" / EXAMPLE.name)
    props.batch_folder = str(tmp_path / "batch")
    assert run("trellis2.backend", action="START") == {"FINISHED"}  # blocking: background
    assert run("trellis2.generate", mode="BLOCKING") == {"FINISHED"}
    done = ctrl.history_blocking()[0]
    model = bpy.context.view_layer.objects.active  # the imported mesh: Texture's target
    pid = ctrl.status()["pid"]
    os.kill(pid, signal.SIGSTOP if fault == "frozen" else signal.SIGKILL)

    waits: list[str] = []
    results = {}
    intervals = []
    try:
        with monkeypatch.context() as mp:
            install_traps(mp, waits)
            results["generate"] = run("trellis2.generate", mode="ASYNC")
            newest = list(ctrl.jobs.values())[-1]
            results["cancel"] = run("trellis2.cancel", job_id=newest.key)
            results["re-export"] = run("trellis2.reexport", job_id=done["job_id"])
            results["new seed"] = run("trellis2.regenerate", job_id=done["job_id"])
            results["refresh history"] = run("trellis2.refresh_history")
            results["history page"] = run("trellis2.history_page", page=0)
            results["delete job"] = run("trellis2.delete_job", job_id=done["job_id"])
            results["clear history"] = run("trellis2.clear_history", days=0)
            results["status"] = run("trellis2.backend", action="STATUS")
            results["doctor"] = run("trellis2.doctor", mode="ASYNC")
            results["texture"] = run("trellis2.texture_mesh", mode="ASYNC")
            results["variations"] = run("trellis2.variations", count=2, mode="ASYNC")
            results["batch"] = run("trellis2.batch", mode="ASYNC")
            model["trellis2_group"] = next(iter(ctrl.groups))  # as if it were a variation
            results["keep"] = run("trellis2.keep_variation")
            results["cancel all"] = run("trellis2.cancel_group")
            results["apply texture"] = run(
                "trellis2.apply_texture", filepath=done["glb_path"], target=model.name
            )
            for panel in PANELS:
                draw(getattr(bpy.types, f"TRELLIS2_PT_{panel}"), bpy.context)
            for _ in range(5):
                intervals.append(submodule("runtime").timer())
            results["stop"] = run("trellis2.backend", action="STOP", mode="ASYNC")
            intervals.append(submodule("runtime").timer())
            results["start"] = run("trellis2.backend", action="START", mode="ASYNC")
            results["restart"] = run("trellis2.backend", action="RESTART", mode="ASYNC")
            deadline = time.monotonic() + 60
            while not (ctrl.state == "ready" and ctrl.status()["pid"] not in (None, pid)):
                assert time.monotonic() < deadline, ctrl.status()
                intervals.append(submodule("runtime").timer())
                pause(0.02)
    finally:
        if fault == "frozen":
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert waits == []
    assert all(r in ({"FINISHED"}, {"CANCELLED"}, {"REFUSED"}) for r in results.values())
    assert all(isinstance(i, float) for i in intervals)
    assert ctrl.tick_errors == []
    assert ctrl.find(newest.key).terminal  # the Generate sent into the fault has an outcome
    assert {"texture", "variations", "batch", "keep", "cancel all"} <= {
        name for name, result in results.items() if result == {"FINISHED"}
    }  # they ran (a refused poll would prove nothing)


def test_the_timer_survives_an_exception_and_reports_it_once(scene, ctrl, monkeypatch):
    runtime = submodule("runtime")
    ctrl.start(wait=True, timeout=60)

    def broken():
        raise KeyError("a bug in the tick")

    monkeypatch.setattr(ctrl, "_reconcile", broken)
    monkeypatch.setattr(ctrl.supervisor, "tick", broken)
    for _ in range(5):
        ctrl._next_reconcile = 0.0
        assert isinstance(runtime.timer(), float)
    assert bpy.app.timers.is_registered(runtime.timer)
    assert len(ctrl.tick_errors) == 2  # one per place, however often it happened
    assert "a bug in the tick" in ctrl.last_error
    log = draw(bpy.types.TRELLIS2_PT_main, bpy.context)
    assert (ctrl.last_error[:140], "ERROR") in labels_in(log)
    assert (ctrl.last_hint[:140], "INFO") in labels_in(log)  # separate from the error

    monkeypatch.setattr(type(ctrl), "tick", lambda self: broken())  # even the whole tick
    assert runtime.timer() == submodule("controller").IDLE_INTERVAL


def test_an_output_folder_gone_unwritable_mid_job_keeps_the_tick_going(scene, ctrl, prefs):
    """Mid-job the output folder becomes a file (nothing can be written under it, also for
    root): the tick keeps running and the job's state is reported."""
    ctrl.configure(
        dataclasses.replace(
            ctrl.config,
            engine="tests.cpu_engines:SlowEngine",
            engine_options={"steps": "60", "step_seconds": "0.05"},
        )
    )
    out = ctrl.config.output_dir
    ctrl.start(wait=True, timeout=60)
    view = ctrl.submit(EXAMPLE.read_bytes(), {"preset": "fast"}, "duck", auto_import=False)
    tick_until(ctrl, lambda: view.state == "running")
    moved = out.with_name(out.name + "-moved")
    out.rename(moved)
    out.write_text("the output folder is a file now")
    try:
        intervals = tick_until(ctrl, lambda: view.terminal, timeout=90)
    finally:
        out.unlink()
        moved.rename(out)
    assert all(isinstance(i, float) for i in intervals) and len(intervals) > 3
    assert bpy.app.timers.is_registered(submodule("runtime").timer)
    assert view.state == "failed" and view.message
    log = draw(bpy.types.TRELLIS2_PT_main, bpy.context)
    assert any(view.message[:100] in text for text, _ in labels_in(log))


def test_no_empty_run_folder_is_left_behind(scene, ctrl, tmp_path):
    ctrl.start(wait=True, timeout=60)
    run_dir = ctrl.run_dir
    assert (run_dir / "connection.json").is_file()
    ctrl.shutdown()
    assert not run_dir.exists()
    stale = run_dir.with_name(f"{submodule('launch').RUN_DIR_PREFIX}999999999")
    stale.mkdir(exist_ok=True)
    submodule("controller").Controller()  # a new session sweeps what ended sessions left
    assert not stale.exists()
    shutil.rmtree(stale, ignore_errors=True)
