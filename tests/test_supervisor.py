"""The supervisor against real backend subprocesses (preview engine or the SlowEngine, whose
env knobs make a backend crash or hang mid-stage). Loopback only; every wait is bounded."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.errors import BackendError
from backend.procutil import pid_alive
from backend.store.jobs import JobStore
from backend.supervision.supervisor import (
    BackendSpec,
    RespawnPolicy,
    StartError,
    Supervisor,
    SupervisorEvent,
    SupervisorState,
    rotate_logs,
)
from backend.wire import protocol
from backend.wire.client import Client
from tests.conftest import ROOT, png_bytes

SLOW = "tests.cpu_engines:SlowEngine"
WAIT = 30.0  # generous: CI has two slow cores

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals in tests")


class Harness:
    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.supervisors: list[Supervisor] = []
        self.events: list = []

    def make(self, engine: str = SLOW, env=None, options=None, **policy) -> Supervisor:
        policy.setdefault("heartbeat_timeout", 4.0)
        spec = BackendSpec(
            output_dir=self.tmp_path / "out",
            connection_file=self.tmp_path / "run" / "backend.json",
            engine=engine,
            engine_options=options or {},
            env=env or {},
            min_free_disk_mb=1,
        )
        sup = Supervisor(spec, RespawnPolicy(**policy))
        self.supervisors.append(sup)
        return sup

    def tick_until(self, sup: Supervisor, predicate, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.events.extend(sup.tick())
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; supervisor is {sup.status()}")
            time.sleep(0.01)

    def sup_events(self, kind: str, sup: Supervisor | None = None) -> list[SupervisorEvent]:
        if sup is not None:  # events produced inside blocking calls come with the next tick
            self.events.extend(sup.tick())
        return [e for e in self.events if isinstance(e, SupervisorEvent) and e.kind == kind]

    def backend_pids(self) -> set[int]:
        """Every backend ever spawned here: logs are named backend-<stamp>-<pid>.log."""
        logs = (self.tmp_path / "out" / "logs").glob("backend-*.log")
        return {int(m.group(1)) for p in logs if (m := re.search(r"-(\d+)\.log$", p.name))}


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    yield h
    for sup in h.supervisors:
        sup.stop(timeout=15)
    orphans = [pid for pid in h.backend_pids() if pid_alive(pid)]
    for pid in orphans:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not orphans, f"backend processes outlived their supervisor: {orphans}"


def assert_connection_file_is_live(sup: Supervisor) -> protocol.ConnectionInfo:
    info = protocol.read_connection_file(sup.spec.connection_file)
    assert info.pid == sup.pid and pid_alive(info.pid)
    assert info.session == sup.session
    with Client(info) as client:
        assert client.hello(timeout=10)["session"] == info.session
    return info


def only_job(sup: Supervisor) -> dict:
    records, _ = JobStore(sup.spec.output_dir).list()
    assert len(records) == 1, [r.id for r in records]
    return records[0].to_dict()


def test_kill9_mid_job_is_detected_respawned_and_the_job_retried_once(harness):
    sup = harness.make(options={"steps": "4", "step_seconds": "0.15"})
    sup.start_and_wait(WAIT)
    first = sup.pid
    job_id = sup.submit(png_bytes())
    harness.tick_until(sup, lambda: sup.state is SupervisorState.BUSY)
    os.kill(first, signal.SIGKILL)
    harness.tick_until(sup, lambda: sup.pid not in (None, first) and sup.client is not None)

    record = sup.wait_for_job(job_id, WAIT)
    assert record["state"] == "done"
    assert record["recoveries"] == 1
    assert record["backend_pid"] == sup.pid  # finished on the fresh backend
    assert only_job(sup)["id"] == job_id  # one job, one outcome, no duplicate
    respawn = harness.sup_events("respawn", sup)
    assert [e.data["cause"] for e in respawn] == ["crash"]  # seen as a process exit
    assert "SIGKILL" in respawn[0].reason
    assert [e.job_id for e in harness.sup_events("job_retried")] == [job_id]
    # Written by the fresh backend from the supervisor's note (the supervisor writes no job
    # folder): who died, why, and the last lines of its log.
    log_text = JobStore(sup.spec.output_dir).log_excerpt(job_id)
    assert f"backend pid {first} went away during this job: the backend was killed by SIGKILL" in (
        log_text
    )
    assert "--- last lines of backend-" in log_text and "serving engine slow" in log_text
    assert "running it again" in log_text
    assert sup.last_shutdown["exit_code"] == -signal.SIGKILL
    assert not pid_alive(first)
    assert_connection_file_is_live(sup)


def test_backend_that_exits_at_start_gives_an_error_with_the_log_tail(harness):
    sup = harness.make(engine="tests.cpu_engines:NoSuchEngine")
    with pytest.raises(StartError) as info:
        sup.start_and_wait(WAIT)
    error = info.value
    assert "exited while starting" in error.message
    assert "NoSuchEngine" in error.log_tail and "NoSuchEngine" in error.hint
    assert error.log_path is not None and error.log_path.exists()
    assert sup.state is SupervisorState.DEAD
    assert "exited while starting" in sup.state_reason
    assert sup.status()["last_error"]["message"] == error.message
    assert not sup.spec.connection_file.exists()
    with pytest.raises(BackendError):
        sup.submit(png_bytes())


def test_a_job_that_kills_its_backend_twice_fails_with_the_log_tail(harness):
    env = {"SLOW_ENGINE_EXIT_AT": "shape", "SLOW_ENGINE_EXIT_CODE": "75"}
    # Its first stage lasts 1.5 s: the supervisor sees a job run only once it has subscribed
    # to the new backend, which starts the job it recovers at once (0.25 s missed it once in
    # a loaded CI run).
    sup = harness.make(env=env, options={"steps": "3", "step_seconds": "0.5"})
    sup.start_and_wait(WAIT)
    job_id = sup.submit(png_bytes())
    record = sup.wait_for_job(job_id, WAIT)

    assert record["state"] == "failed"
    assert record["error"]["code"] == "backend_died"
    assert "poisoned" in record["error"]["message"]
    assert "serving engine slow" in record["error"]["log_tail"]  # the dead backend's last words
    assert only_job(sup)["recoveries"] == 1
    causes = [e.data["cause"] for e in harness.sup_events("respawn", sup)]
    assert causes == ["poisoned", "poisoned"]
    # The supervisor announced each death of the job from what it saw; the third backend
    # failed it (the recovery rule lives in the backend only).
    assert [e.job_id for e in harness.sup_events("job_retried")] == [job_id, job_id]
    assert harness.sup_events("job_retried")[0].msg_type == "supervisor_job_retried"
    log_text = JobStore(sup.spec.output_dir).log_excerpt(job_id)
    assert log_text.count("went away during this job") == 2
    assert "failed: backend died again" in log_text
    harness.tick_until(sup, lambda: sup.state is SupervisorState.READY)  # the third one idles
    assert_connection_file_is_live(sup)


def test_with_no_backend_next_a_job_stays_as_it_was_and_a_cancel_ends_it(harness):
    """A backend that dies with no successor (the storm guard gives up at once): the
    supervisor announces the job it saw running and leaves its record alone (the next backend
    recovers it). A cancel meanwhile runs the backend's own `cancel` command, answered by a
    later tick, and the job ends cancelled at once: a later backend never runs it."""
    sup = harness.make(options={"steps": "40", "step_seconds": "0.1"}, storm_limit=0)
    sup.start_and_wait(WAIT)
    victim = sup.pid
    running = sup.submit(png_bytes())
    queued = sup.submit(png_bytes())
    harness.tick_until(sup, lambda: sup.status()["current_job"] == running)
    os.kill(victim, signal.SIGKILL)
    harness.tick_until(sup, lambda: sup.state is SupervisorState.DEAD)
    assert "restart storm" in sup.state_reason
    assert [e.job_id for e in harness.sup_events("job_retried", sup)] == [running]
    store = JobStore(sup.spec.output_dir)
    assert store.get(running).state.value == "running"  # left for the next backend
    assert "went away" not in store.log_excerpt(running)  # the supervisor wrote nothing

    pending = sup.cancel_nowait(running)
    assert not pending.done  # the command runs; the tick answers
    harness.tick_until(sup, lambda: pending.done)
    assert pending.result() == {"ok": True, "job_id": running, "state": "cancelled"}
    sup.cancel(queued)  # the blocking form, for scripts
    for job_id in (running, queued):
        assert store.get(job_id).state.value == "cancelled"
        assert "cancelled while no backend was running" in store.log_excerpt(job_id)
    gone = sup.cancel_nowait("20260101-000000-abcdef")
    harness.tick_until(sup, lambda: gone.done)
    assert gone.error is not None and gone.error.code.value == "not_found"

    sup.start_and_wait(WAIT)  # the next backend: nothing left to run
    assert sup.wait_for_job(running, WAIT)["state"] == "cancelled"
    assert sup.wait_for_job(queued, WAIT)["state"] == "cancelled"
    assert store.log_excerpt(running).count("started on") == 1


def test_a_warm_standby_gets_the_note_on_the_backend_it_replaces(harness):
    """A standby was spawned before the death: the note travels in its `activate`."""
    sup = harness.make(options={"steps": "6", "step_seconds": "0.1"}, standby=True)
    sup.start_and_wait(WAIT)
    harness.tick_until(sup, lambda: (sup.status()["standby"] or {}).get("ready"))
    victim, standby = sup.pid, sup.standby_pid
    job_id = sup.submit(png_bytes())
    harness.tick_until(sup, lambda: sup.status()["current_job"] == job_id)
    os.kill(victim, signal.SIGKILL)
    record = sup.wait_for_job(job_id, WAIT)
    assert record["state"] == "done" and record["backend_pid"] == standby
    assert record["recoveries"] == 1
    text = JobStore(sup.spec.output_dir).log_excerpt(job_id)
    assert f"backend pid {victim} went away during this job: the backend was killed by SIGKILL" in (
        text
    )
    assert "serving engine slow" in text  # its log's last lines


def test_a_hung_job_trips_the_watchdog_then_fails(harness):
    sup = harness.make(env={"SLOW_ENGINE_HANG_AT": "shape"}, job_watchdog=1.0)
    sup.start_and_wait(WAIT)
    job_id = sup.submit(png_bytes())
    record = sup.wait_for_job(job_id, WAIT)
    assert record["state"] == "failed" and record["error"]["code"] == "backend_died"
    causes = [e.data["cause"] for e in harness.sup_events("respawn", sup)]
    assert causes == ["watchdog", "watchdog"]
    assert sup.last_shutdown["rung"] == "terminate"  # a hung job is not asked politely


def test_a_frozen_backend_misses_heartbeats_and_the_ladder_kills_it(harness):
    sup = harness.make(engine="preview", heartbeat_timeout=1.5, terminate_wait=0.5)
    sup.start_and_wait(WAIT)
    frozen = sup.pid
    os.kill(frozen, signal.SIGSTOP)  # alive but silent; SIGTERM stays pending
    try:
        harness.tick_until(sup, lambda: sup.pid not in (None, frozen))
    finally:
        if pid_alive(frozen):
            os.kill(frozen, signal.SIGCONT)
    assert harness.sup_events("respawn")[0].data["cause"] == "missed_heartbeats"
    assert sup.last_shutdown["pid"] == frozen and sup.last_shutdown["rung"] == "kill"
    harness.tick_until(sup, lambda: sup.state is SupervisorState.READY)
    assert_connection_file_is_live(sup)


def test_restart_storm_goes_dead_and_a_manual_restart_resets_it(harness):
    sup = harness.make(engine="preview", storm_limit=2, storm_window=120.0)
    sup.start_and_wait(WAIT)
    for _ in range(3):
        victim = sup.pid
        os.kill(victim, signal.SIGKILL)
        harness.tick_until(sup, lambda v=victim: sup.pid != v or sup.state.value == "dead")
        if sup.state is not SupervisorState.DEAD:
            harness.tick_until(sup, lambda: sup.state is SupervisorState.READY)
    assert sup.state is SupervisorState.DEAD
    assert "restart storm" in sup.state_reason
    assert len(harness.sup_events("respawn")) == 2
    assert not sup.spec.connection_file.exists()  # it would describe a dead backend

    sup.restart()
    sup.wait_ready(WAIT)
    assert sup.status()["recent_restarts"] == 0
    victim = sup.pid
    os.kill(victim, signal.SIGKILL)  # the guard starts over: this one is respawned
    harness.tick_until(sup, lambda: sup.pid not in (None, victim))
    sup.wait_ready(WAIT)
    assert_connection_file_is_live(sup)


def test_stop_leaves_no_process_and_no_connection_file(harness):
    sup = harness.make(engine="preview", standby=True)
    sup.start_and_wait(WAIT)
    harness.tick_until(sup, lambda: sup.status()["standby"] and sup.status()["standby"]["ready"])
    pids = {sup.pid, sup.standby_pid}
    sup.stop(timeout=15)
    assert sup.state is SupervisorState.STOPPED
    assert not any(pid_alive(pid) for pid in pids)
    assert sup.last_shutdown["rung"] == "request"  # asked politely, and it listened
    assert not sup.spec.connection_file.exists()
    assert not sup.spec.standby_connection_file.exists()
    assert harness.backend_pids() == pids


def test_warm_standby_takes_over_for_every_job(harness):
    sup = harness.make(fresh_per_job=True, standby=True)
    sup.start_and_wait(WAIT)
    ran_on = []
    for _ in range(2):
        harness.tick_until(sup, lambda: (sup.status()["standby"] or {}).get("ready"))
        standby = sup.standby_pid
        job_id = sup.submit(png_bytes())
        record = sup.wait_for_job(job_id, WAIT)
        assert record["state"] == "done"
        ran_on.append(record["backend_pid"])
        harness.tick_until(sup, lambda s=standby: sup.pid == s and sup.client is not None)
        info = assert_connection_file_is_live(sup)  # rewritten with the standby's content
        assert info.pid == standby
    assert len(set(ran_on)) == 2
    assert len(harness.sup_events("takeover", sup)) == 2
    assert all(e.data["cause"] == "fresh_per_job" for e in harness.sup_events("respawn"))
    assert not any(pid_alive(pid) for pid in ran_on)


def _wait_for_file_pid(path: Path, not_pid: int | None, timeout: float = WAIT) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = protocol.read_connection_file(path)
            if info.pid != not_pid and pid_alive(info.pid):
                return info.pid
        except BackendError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no live backend in {path}")


def test_cli_rewrites_the_connection_file_and_its_backend_dies_with_it(tmp_path):
    conn = tmp_path / "run" / "backend.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "backend", "supervise", "--connection-file", str(conn)]
    command += ["--output-dir", str(tmp_path / "out"), "--min-free-disk-mb", "1"]
    cli_log = tmp_path / "cli.log"
    with open(cli_log, "wb") as sink:
        cli = subprocess.Popen(command, cwd=ROOT, env=env, stderr=sink)
    backends = []
    try:
        backends.append(_wait_for_file_pid(conn, None))
        deadline = time.monotonic() + WAIT  # a death while starting is fatal: wait for ready
        while "state: ready" not in cli_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(backends[0], signal.SIGKILL)
        backends.append(_wait_for_file_pid(conn, backends[0]))
        info = protocol.read_connection_file(conn)
        with Client(info) as client:
            assert client.hello(timeout=10)["session"] == info.session  # new session

        cli.send_signal(signal.SIGKILL)  # no atexit, no ladder: the backend must notice alone
        cli.wait(timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while pid_alive(backends[1]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(backends[1])
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        for pid in backends:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_cli_stops_its_backend_on_sigterm(tmp_path):
    conn = tmp_path / "run" / "backend.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "backend", "supervise", "--connection-file", str(conn)]
    command += ["--output-dir", str(tmp_path / "out"), "--min-free-disk-mb", "1"]
    cli = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        pid = _wait_for_file_pid(conn, None)
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=WAIT) == 0
        assert not pid_alive(pid)
        assert not conn.exists()
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()


def test_log_rotation_keeps_the_newest(tmp_path):
    for i in range(6):
        path = tmp_path / f"backend-2026010{i}-000000-{100 + i}.log"
        path.write_text("x")
        os.utime(path, (1000 + i, 1000 + i))
    (tmp_path / "other.log").write_text("not ours")
    removed = rotate_logs(tmp_path, keep=3)
    assert sorted(p.name for p in removed) == [
        f"backend-2026010{i}-000000-{100 + i}.log" for i in range(3)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "backend-20260103-000000-103.log",
        "backend-20260104-000000-104.log",
        "backend-20260105-000000-105.log",
        "other.log",
    ]
