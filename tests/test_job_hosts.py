"""Job processes (backend/server/jobhost.py): a backend that runs several jobs at once runs
each in a process of its own. What a user depends on: the jobs run and end as on a thread
(events, records, GLBs, cancel, stop), a job whose process dies runs once more on a new
process and the backend stays up, an engine that cannot load fails the backend typed, and no
job process outlives its backend or writes into the channel by accident."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from backend import settings
from backend.server.jobhost import HostSettings, _Orders
from tests.conftest import png_bytes, wait_gone
from tests.test_server import collect_until

SLOW = "tests.cpu_engines:SlowEngine"
WAIT = 30.0

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signals")


def ready(s, timeout: float = WAIT) -> dict:
    deadline = time.monotonic() + timeout
    while (status := s.client.status())["state"] not in ("ready", "busy", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.02)
    return status


def running(s, count: int, timeout: float = WAIT) -> dict:
    """`status` once `count` jobs run at once."""
    deadline = time.monotonic() + timeout
    while len((status := s.client.status())["running"]) < count:
        assert time.monotonic() < deadline, status
        time.sleep(0.02)
    return status


def ended(s, job_ids, timeout: float = WAIT) -> list[dict]:
    deadline = time.monotonic() + timeout
    records = []
    for job_id in job_ids:
        while (record := s.client.job(job_id)["job"])["state"] not in (
            "done",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline, record
            time.sleep(0.02)
        records.append(record)
    return records


def host_pids(s) -> list[int]:
    return [h["pid"] for h in s.client.status()["job_hosts"]]


def test_jobs_at_once_run_in_processes_of_their_own_with_the_same_outcomes(make_server):
    from backend.checks.glbcheck import validate_glb_file

    s = make_server(SLOW, max_concurrent=2, engine_options={"steps": "6", "step_seconds": "0.05"})
    status = ready(s)
    assert status["max_concurrent"] == 2
    assert [h["ready"] for h in status["job_hosts"]] == [True, True]  # loaded before `ready`
    pids = host_pids(s)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    # Below the backend's priority: the loop and its clients get the CPU first.
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    for pid in pids:
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, mine + settings.JOB_PROCESS_NICE)

    ids = [s.client.generate(png_bytes(), {"preset": "fast"}, f"n{i}.png") for i in range(4)]
    status = running(s, 2)
    deadline = time.monotonic() + WAIT
    while status["current"] is None:  # until a job's first progress came from its host
        assert time.monotonic() < deadline, status
        status = s.client.status()
    assert status["current"]["job_id"] in status["running"]
    on = {h["job_id"] for h in status["job_hosts"]}
    assert on == set(status["running"])
    events = collect_until(s.client, ids[0])
    assert [e.msg_type for e in events][-1] == "job_done"
    assert {"job_started", "job_progress"} <= {e.msg_type for e in events}

    records = ended(s, ids)
    assert [r["state"] for r in records] == ["done"] * 4
    # Each ran in one of the job processes, not in the backend's.
    assert {r["backend_pid"] for r in records} <= set(pids)
    for record in records:
        assert validate_glb_file(record["result"]["glb_path"])["triangles"] > 0
    stats = s.client.stats()["aggregate"]  # the hosts' stats lines, read by the reader
    assert stats["outcomes"]["done"] == 4
    assert host_pids(s) == pids  # the same processes served every job


def test_a_job_whose_process_is_killed_runs_again_and_the_backend_stays_up(make_server):
    s = make_server(SLOW, max_concurrent=2, engine_options={"steps": "20", "step_seconds": "0.05"})
    ready(s)
    victim = s.client.generate(png_bytes(), {"preset": "fast"}, "victim.png")
    other = s.client.generate(png_bytes(), {"preset": "fast"}, "other.png")
    running(s, 2)
    pid = s.client.job(victim)["job"]["backend_pid"]
    os.kill(pid, signal.SIGKILL)
    events = collect_until(s.client, victim)
    kinds = [e.msg_type for e in events]
    assert kinds[-1] == "job_done", events[-1].content
    retry = next(e.content for e in events if e.msg_type == "job_retry")
    assert retry["reason"] == "job_process_died" and str(pid) in retry["message"]
    again = [e.content for e in events if e.msg_type == "job_queued" and "reason" in e.content]
    assert len(again) == 1 and str(pid) in again[0]["reason"]
    assert {"job_id", "kind", "position", "filename"} <= set(again[0])  # as when first queued
    records = ended(s, [victim, other])
    assert [r["state"] for r in records] == ["done", "done"]
    assert records[0]["recoveries"] == 1 and records[1]["recoveries"] == 0
    assert records[0]["backend_pid"] != pid
    log = s.client.request("job", {"job_id": victim, "log": True})["log"]
    assert f"job process {pid} was killed by SIGKILL" in log
    hosts = s.client.status()["job_hosts"]
    assert sum(h["restarts"] for h in hosts) == 1 and pid not in [h["pid"] for h in hosts]
    assert s.client.status()["state"] == "ready"


def test_a_job_that_kills_its_process_twice_fails_typed_and_others_still_run(
    make_server, monkeypatch
):
    monkeypatch.setenv("SLOW_ENGINE_EXIT_AT", "shape")
    s = make_server(SLOW, max_concurrent=2, engine_options={"steps": "2", "step_seconds": "0.01"})
    ready(s)
    job_id = s.client.generate(png_bytes(), {"preset": "fast"}, "crash.png")
    events = collect_until(s.client, job_id)
    failed = events[-1]
    assert failed.msg_type == "job_failed" and failed.content["code"] == "backend_died"
    assert [e.content["reason"] for e in events if e.msg_type == "job_retry"] == [
        "job_process_died"
    ]
    record = s.client.job(job_id)["job"]
    assert record["state"] == "failed" and record["recoveries"] == 1
    # The backend is up and starts new job processes for the next job (which dies too here).
    deadline = time.monotonic() + WAIT
    status = s.client.status()
    while not all(h["pid"] for h in status["job_hosts"]):
        assert time.monotonic() < deadline, status
        time.sleep(0.02)
        status = s.client.status()
    assert status["state"] == "ready" and status["engine_error"] is None


def test_a_job_process_that_died_between_jobs_is_replaced_before_the_next(make_server):
    s = make_server(SLOW, max_concurrent=2, engine_options={"steps": "2", "step_seconds": "0.01"})
    ready(s)
    for pid in host_pids(s):
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid)
    ids = [s.client.generate(png_bytes(), {"preset": "fast"}, f"n{i}.png") for i in range(3)]
    records = ended(s, ids)
    assert [r["state"] for r in records] == ["done"] * 3
    assert [r["recoveries"] for r in records] == [0, 0, 0]  # they never started on a dead one


def test_cancel_reaches_a_job_in_its_process(make_server):
    s = make_server(SLOW, max_concurrent=2, engine_options={"steps": "200", "step_seconds": "0.05"})
    ready(s)
    job_id = s.client.generate(png_bytes(), {"preset": "fast"}, "long.png")
    running(s, 1)
    began = time.monotonic()
    s.client.cancel(job_id)
    events = collect_until(s.client, job_id, timeout=10)
    assert events[-1].msg_type == "job_cancelled"
    assert time.monotonic() - began < 5  # at its next checkpoint, not at the job's end (10 s)
    assert s.client.job(job_id)["job"]["state"] == "cancelled"


def test_a_stop_requeues_the_running_jobs_and_leaves_no_job_process(make_server):
    s = make_server(SLOW, max_concurrent=2, engine_options={"steps": "200", "step_seconds": "0.05"})
    ready(s)
    ids = [s.client.generate(png_bytes(), {"preset": "fast"}, f"n{i}.png") for i in range(3)]
    running(s, 2)
    pids = host_pids(s)
    s.client.shutdown(timeout=5)
    s.thread.join(timeout=30)
    assert s.exit_code == 0
    assert all(wait_gone(pid) for pid in pids)
    from backend.store.jobs import JobStore

    store = JobStore(s.config.output_dir)
    assert [store.get(j).state.value for j in ids] == ["queued"] * 3


def test_an_engine_that_cannot_load_in_its_process_fails_the_backend_typed(
    make_server, monkeypatch
):
    monkeypatch.setenv("SLOW_ENGINE_LOAD_ERROR", "weights missing")
    s = make_server(SLOW, max_concurrent=2)
    status = ready(s)
    assert status["state"] == "failed"
    assert status["engine_error"]["code"] == "engine_unavailable"
    assert "weights missing" in status["engine_error"]["message"]
    assert all(h["pid"] is None for h in status["job_hosts"])


def test_what_an_engine_prints_never_reaches_the_channel(make_server, monkeypatch):
    # A line that looks like the host's own message, printed by a "library" mid-job.
    monkeypatch.setenv("SLOW_ENGINE_PRINT", json.dumps({"t": "ended", "job_id": "x"}))
    s = make_server(SLOW, max_concurrent=2, engine_options={"steps": "2", "step_seconds": "0.01"})
    ready(s)
    ids = [s.client.generate(png_bytes(), {"preset": "fast"}, f"n{i}.png") for i in range(2)]
    assert [r["state"] for r in ended(s, ids)] == ["done", "done"]


def test_one_job_at_a_time_runs_on_a_thread_of_the_backend(make_server):
    s = make_server(SLOW, engine_options={"steps": "2", "step_seconds": "0.01"})
    ready(s)
    assert s.client.status()["job_hosts"] is None
    job_id = s.client.generate(png_bytes(), {"preset": "fast"}, "one.png")
    (record,) = ended(s, [job_id])
    assert record["state"] == "done" and record["backend_pid"] == os.getpid()


def test_host_settings_travel_as_one_line(tmp_path):
    settings = HostSettings(
        output_dir=tmp_path / "out",
        state_dir=tmp_path / "state",
        engine="preview",
        engine_options={"steps": "3"},
        min_free_disk=123,
    )
    line = settings.to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert HostSettings.from_line(line) == settings


def test_orders_pass_runs_cancels_and_the_stop_and_end_with_stdin():
    lines = [
        {"op": "run", "job_id": "a"},
        "not json",
        {"op": "cancel", "job_id": "a"},
        {"op": "unknown"},
        {"op": "interrupt"},
    ]
    data = b"".join((json.dumps(x) if isinstance(x, dict) else x).encode() + b"\n" for x in lines)
    exits: list[int] = []
    orders = _Orders(io.BytesIO(data), exit=exits.append)
    orders._read()
    assert orders.jobs.get_nowait() == "a"
    assert orders.cancelled("a") and not orders.cancelled("b")
    assert orders.interrupted.is_set()
    assert exits == [0]  # stdin ended: the host leaves
    orders.forget("a")
    assert not orders.cancelled("a")


def test_the_job_process_command_is_built_in_one_place():
    from backend.supervision import commands

    command = commands.jobhost_command("python", slot=3, parent_pid=42)
    assert command == ["python", "-m", "backend", "jobhost", "--slot", "3", "--parent-pid", "42"]
    assert Path(command[0]).name == "python"


def test_the_preview_engine_generates_reexports_and_textures_in_job_processes(make_server):
    import trimesh

    from backend.checks.glbcheck import validate_glb_file

    s = make_server("preview", max_concurrent=2)
    ready(s)
    image = png_bytes((256, 256))
    parent = s.client.generate(image, {"preset": "fast"}, "disc.png")
    (done,) = ended(s, [parent])
    assert done["state"] == "done", done.get("error")
    # The re-export reads the cache the first job's process wrote, whichever process runs it.
    again = s.client.reexport(parent, {"texture_size": 512})
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.8)
    buf = io.BytesIO()
    mesh.export(buf, file_type="glb")
    textured = s.client.texture(image, buf.getvalue(), "glb", {"preset": "fast"})
    records = ended(s, [again, textured])
    assert [r["state"] for r in records] == ["done", "done"], [r.get("error") for r in records]
    pids = set(host_pids(s))
    for record in (done, *records):
        assert record["backend_pid"] in pids
        assert validate_glb_file(record["result"]["glb_path"])["triangles"] > 0


def busy_backend_process(tmp: Path, jobs: int):
    """`python -m backend serve --max-concurrent 2` with `jobs` long jobs submitted, two of
    them running: (the backend, the job ids, its job processes' pids)."""
    from tests.reliability.support import BackendProcess

    options = ("--engine-opt", "steps=200", "--engine-opt", "step_seconds=0.05")
    backend = BackendProcess(tmp, SLOW, "--max-concurrent", "2", *options)
    ready(backend)
    ids = [backend.client.generate(png_bytes(), {"preset": "fast"}) for _ in range(jobs)]
    running(backend, 2)
    return backend, ids, host_pids(backend)


def test_a_killed_backend_leaves_no_job_process_and_the_next_runs_its_jobs(tmp_path):
    from tests.reliability.support import BackendProcess

    first, ids, pids = busy_backend_process(tmp_path / "a", 3)
    try:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        assert all(wait_gone(pid) for pid in pids), "a job process outlived its backend"
    finally:
        first.stop()
    # Its jobs: two left running (they run once more), one queued, none lost.
    second = BackendProcess(
        tmp_path / "b", SLOW, "--max-concurrent", "2", output_dir=first.output_dir
    )
    try:
        records = ended(second, ids)
        assert [r["state"] for r in records] == ["done"] * 3
        assert sorted(r["recoveries"] for r in records) == [0, 1, 1]
    finally:
        assert second.stop() == 0


def test_sigterm_requeues_the_jobs_in_job_processes_and_exits_cleanly(tmp_path):
    from backend.store.jobs import JobStore

    backend, ids, pids = busy_backend_process(tmp_path, 2)
    try:
        backend.proc.send_signal(signal.SIGTERM)
        assert backend.proc.wait(20) == 0
        assert not backend.conn.exists()
        assert all(wait_gone(pid) for pid in pids)
        store = JobStore(backend.output_dir)
        assert [store.get(j).state.value for j in ids] == ["queued", "queued"]
    finally:
        backend.stop()


def host_of(s, job_id: str, timeout: float = WAIT) -> dict:
    """The `status.job_hosts` entry running `job_id`, once its record says it started."""
    deadline = time.monotonic() + timeout
    while True:
        hosts = s.client.status()["job_hosts"]
        host = next((h for h in hosts if h["job_id"] == job_id), None)
        if host is not None and s.client.job(job_id)["job"]["state"] == "running":
            return host
        assert time.monotonic() < deadline, hosts
        time.sleep(0.02)


def reaped(pid: int, timeout: float = 10.0) -> bool:
    """True once the process is gone and waited for: no /proc entry, not even a zombie."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def sigkill(pid: int) -> None:
    """Teardown: never leave a stopped process behind (SIGKILL ends it stopped or not); only
    while it is still stopped, so that a pid used again since is left alone."""
    from backend.procutil import is_stopped

    if is_stopped(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_hung_job_process_is_stopped_when_its_job_is_cancelled(make_server):
    grace = 1.0
    s = make_server(
        SLOW,
        max_concurrent=2,
        job_cancel_grace=grace,
        engine_options={"steps": "40", "step_seconds": "0.05"},
    )
    ready(s)
    job_id = s.client.generate(png_bytes(), {"preset": "fast"}, "hung.png")
    host = host_of(s, job_id)
    slot, pid = host["slot"], host["pid"]
    os.kill(pid, signal.SIGSTOP)  # hung: it reads no order and reaches no checkpoint
    try:
        began = time.monotonic()
        assert s.client.cancel(job_id)["state"] == "cancelling"
        events = collect_until(s.client, job_id, timeout=grace + 15)
        took = time.monotonic() - began
        kinds = [e.msg_type for e in events]
        assert kinds[-1] == "job_cancelled", events[-1].content
        assert took < grace + 10
        assert "job_retry" not in kinds  # a cancel, not a death: it never runs again
        assert not any(e.content.get("reason") for e in events if e.msg_type == "job_queued")
        record = s.client.job(job_id)["job"]
        assert record["state"] == "cancelled" and record["error"]["code"] == "cancelled"
        assert record["recoveries"] == 0
        assert reaped(pid), "the stopped job process was not killed and reaped"
        log = s.client.request("job", {"job_id": job_id, "log": True})["log"]
        assert f"job process {pid} did not stop within" in log
        # The slot gets a new process, and the next jobs run to their end.
        deadline = time.monotonic() + WAIT
        while (hosts := s.client.status()["job_hosts"])[slot]["pid"] in (None, pid):
            assert time.monotonic() < deadline, hosts
            time.sleep(0.05)
        assert hosts[slot]["restarts"] == 1
        deadline = time.monotonic() + WAIT
        while not (hosts := s.client.status()["job_hosts"])[slot]["ready"]:
            assert time.monotonic() < deadline, hosts
            time.sleep(0.05)
        ids = [s.client.generate(png_bytes(), {"preset": "fast"}, f"n{i}.png") for i in range(2)]
        records = ended(s, ids)
        assert [(r["state"], r["recoveries"]) for r in records] == [("done", 0)] * 2
        assert {r["backend_pid"] for r in records} <= set(host_pids(s))
        assert pid not in host_pids(s) and s.client.status()["engine_error"] is None
    finally:
        sigkill(pid)


def test_a_job_cancelled_before_its_process_went_is_cancelled_whatever_its_record_says(
    tmp_path,
):
    """The cancel reached the worker before the job process wrote the job `running` (so the
    record has no `cancel_requested`), then the process went: the job is cancelled, never run
    again; a job nobody cancelled runs again as before."""
    from backend.server.loop import ServerConfig
    from backend.server.workers import Backend
    from backend.store.jobs import JobStore

    output_dir = tmp_path / "out"
    store = JobStore(output_dir)
    queued, started, died = (
        store.create("generate", SLOW, {}, image=png_bytes()).id for _ in range(3)
    )
    for job_id in (started, died):
        store.transition(job_id, "start")
    events: list[tuple[str, dict]] = []
    config = ServerConfig(
        connection_file=tmp_path / "c.json", output_dir=output_dir, engine=SLOW, recover=False
    )
    backend = Backend(config, lambda kind, c, parent=None: events.append((kind, c)), "s")
    try:
        backend.activate()
        why = "its job process 1 was killed by SIGKILL"
        backend._lost_with_host(queued, why, cancelled=True)
        backend._lost_with_host(started, why, cancelled=True)
        backend._lost_with_host(died, why)
    finally:
        backend.store.release()
    for job_id in (queued, started):
        record = store.get(job_id)
        assert record.state.value == "cancelled" and record.error["code"] == "cancelled"
        assert record.recoveries == 0
    assert (store.get(died).state.value, store.get(died).recoveries) == ("queued", 1)
    assert backend.queue_snapshot() == [died]
    assert [(k, c["job_id"]) for k, c in events if k in ("job_cancelled", "job_retry")] == [
        ("job_cancelled", queued),
        ("job_cancelled", started),
        ("job_retry", died),
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_shutdown_with_a_hung_job_process_ends_after_its_grace(make_server):
    grace = 1.0
    s = make_server(
        SLOW,
        max_concurrent=2,
        shutdown_grace=grace,
        engine_options={"steps": "200", "step_seconds": "0.05"},
    )
    ready(s)
    job_id = s.client.generate(png_bytes(), {"preset": "fast"}, "hung.png")
    pid = host_of(s, job_id)["pid"]
    pids = host_pids(s)
    os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        s.client.shutdown(timeout=5)
        s.thread.join(timeout=grace + 15)
        assert not s.thread.is_alive() and s.exit_code == 0
        assert time.monotonic() - began < grace + 10
        assert reaped(pid), "the stopped job process was not killed and reaped"
        assert all(wait_gone(p) for p in pids)
        from backend.store.jobs import JobStore

        record = JobStore(s.config.output_dir).get(job_id)
        # It never reached a checkpoint to requeue itself: the next backend runs it once more.
        assert (record.state.value, record.recoveries) == ("running", 0)
    finally:
        sigkill(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_sigterm_with_a_hung_job_process_exits_within_its_grace(tmp_path):
    from backend.store.jobs import JobStore

    backend, ids, pids = busy_backend_process(tmp_path, 2)
    hung = None
    try:
        hung = backend.client.job(ids[0])["job"]["backend_pid"]
        os.kill(hung, signal.SIGSTOP)
        began = time.monotonic()
        backend.proc.send_signal(signal.SIGTERM)
        # Before the supervisor's SIGKILL (TERMINATE_WAIT): the hung job gets SIGNAL_GRACE.
        assert backend.proc.wait(settings.TERMINATE_WAIT) == 0
        took = time.monotonic() - began
        assert settings.SIGNAL_GRACE - 0.5 < took < settings.TERMINATE_WAIT
        assert not backend.conn.exists()
        assert all(wait_gone(pid) for pid in pids), "a job process outlived its backend"
        store = JobStore(backend.output_dir)
        hung_job, other = (store.get(j) for j in ids)
        # The other requeued itself at a checkpoint; the hung one never did, so it is left
        # running for the next backend, which runs it once more as one whose backend died.
        assert (other.state.value, other.recoveries) == ("queued", 0)
        assert (hung_job.state.value, hung_job.recoveries) == ("running", 0)
    finally:
        if hung is not None:
            sigkill(hung)
        backend.stop()
