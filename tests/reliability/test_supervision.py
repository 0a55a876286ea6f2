"""The supervisor attacked as a shared resource and a process that can freeze: two supervisors
on one output folder, a paused supervisor, a stopped backend or standby, crashes while a
respawned backend starts, a cancel before a crash, relative and non-UTF-8 paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.errors import BackendError, ErrorCode
from backend.procutil import pid_alive
from backend.store.jobs import JobStore
from backend.store.ownerlock import LOCKED_EXIT_CODE, OutputLocked
from backend.supervision.supervisor import BackendSpec, RespawnPolicy, Supervisor, SupervisorEvent
from backend.wire import protocol
from backend.wire.client import Client
from tests.conftest import png_bytes
from tests.reliability.support import ROOT, WAIT, record

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals and /proc")

SLOW = "tests.cpu_engines:SlowEngine"


class Cli:
    """`python -m backend supervise` as its own process (a stand-in for a Blender instance)."""

    def __init__(self, tmp: Path, *args: str, cwd: Path = ROOT, conn: str | bytes | None = None):
        self.conn = conn if conn is not None else str(tmp / "run" / "a.json")
        self.stderr = tmp / f"cli-{time.monotonic_ns()}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        command = [sys.executable, "-m", "backend", "supervise", "--connection-file", self.conn]
        with open(self.stderr, "wb") as sink:
            self.proc = subprocess.Popen([*command, *args], cwd=cwd, env=env, stderr=sink)
        self.path = Path(cwd) / os.fsdecode(self.conn)

    def backend(self, not_pid: int | None = None) -> protocol.ConnectionInfo:
        """The live backend in the connection file (a new one when `not_pid` is given)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                info = protocol.read_connection_file(self.path)
                if info.pid != not_pid and pid_alive(info.pid) and "state: ready" in self.log():
                    return info
            except BackendError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"no live backend in {self.path}:\n{self.log()}")

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def clis():
    made: list[Cli] = []

    def make(*args, **kwargs) -> Cli:
        made.append(Cli(*args, **kwargs))
        return made[-1]

    yield make
    for cli in made:
        cli.stop()


@pytest.fixture
def supervisors():
    made: list[Supervisor] = []

    def make(tmp: Path, name: str = "b", engine: str = SLOW, options=None, **policy):
        policy.setdefault("heartbeat_timeout", 3.0)
        spec = BackendSpec(
            output_dir=tmp / "out",
            connection_file=tmp / "run" / f"{name}.json",
            engine=engine,
            engine_options=options or {"steps": "6", "step_seconds": "0.05"},
            min_free_disk_mb=1,
            heartbeat_interval=0.2,
        )
        made.append(Supervisor(spec, RespawnPolicy(**policy)))
        return made[-1]

    yield make
    for sup in made:
        sup.stop(timeout=15)


def _tick_until(sup: Supervisor, predicate, seen: list | None = None, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        events = sup.tick()
        if seen is not None:
            seen.extend(events)
        assert time.monotonic() < deadline, f"timed out; supervisor is {sup.status()}"
        time.sleep(0.01)


def _state(client: Client, job_id: str) -> str:
    return client.job(job_id)["job"]["state"]


def _wait_state(client: Client, job_id: str, state: str) -> None:
    deadline = time.monotonic() + WAIT
    while _state(client, job_id) != state:
        assert time.monotonic() < deadline, f"job {job_id} never {state}"
        time.sleep(0.02)


# -- one owner ----------------------------------------------------------------------------------


def test_one_owner_per_output_folder_and_no_job_runs_twice(clis, supervisors, tmp_path):
    out = tmp_path / "out"
    engine = ("--engine", SLOW, "--engine-opt", "steps=8", "--engine-opt", "step_seconds=0.1")
    a = clis(tmp_path, "--output-dir", str(out), *engine, "--min-free-disk-mb", "1")
    info = a.backend()
    client = Client(info)
    jobs = [client.generate(png_bytes((64, 64))) for _ in range(3)]

    b = supervisors(tmp_path, "second")  # a second Blender on the same folder
    with pytest.raises(OutputLocked) as err:
        b.start_and_wait(WAIT)
    owner = err.value.to_dict()["owner"]
    assert err.value.code is ErrorCode.OUTPUT_LOCKED and owner["pid"] == a.proc.pid
    assert owner["role"] == "supervisor" and owner["connection_file"] == a.conn
    assert f"pid {a.proc.pid}" in err.value.message and "Connect" in err.value.hint
    assert b.state.value == "dead" and b.pid is None and not b.spec.connection_file.exists()

    alone = subprocess.run(  # a backend without a supervisor is refused too
        [sys.executable, "-m", "backend", "serve", "--connection-file", str(tmp_path / "c.json")]
        + ["--output-dir", str(out), "--engine", "preview"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert alone.returncode == LOCKED_EXIT_CODE, alone.stderr[-2000:]
    assert f"in use by a supervisor (pid {a.proc.pid}" in alone.stderr
    assert not (tmp_path / "c.json").exists()

    _wait_state(client, jobs[0], "running")
    deadline = time.monotonic() + WAIT  # its first run is in its log before the kill
    while "started on" not in client.request("job", {"job_id": jobs[0], "log": True})["log"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(info.pid, signal.SIGKILL)  # the owner's backend dies mid-job: it respawns
    client.close()
    client = Client(a.backend(not_pid=info.pid))
    ends = {job_id: client.wait_for_job(job_id, WAIT) for job_id in jobs}
    assert all(e["event"] == "job_done" for e in ends.values()), ends
    with pytest.raises(OutputLocked):  # still owned
        b.start_and_wait(WAIT)
    store = JobStore(out)
    runs = {job_id: store.log_excerpt(job_id).count("started on") for job_id in jobs}
    assert runs == {jobs[0]: 2, jobs[1]: 1, jobs[2]: 1}  # the crashed one ran again, once
    records = {r.id: r for r in store.list()[0]}
    assert records[jobs[0]].recoveries == 1 and len(records) == 3
    assert client.stats()["aggregate"]["jobs"] == 3  # each counted once
    client.close()
    assert a.stop() == 0
    record(
        "one_owner",
        {
            "second_supervisor": "refused: output_locked, names the owner's pid and file",
            "backend_without_supervisor": f"refused: exit code {LOCKED_EXIT_CODE}",
            "jobs": len(jobs),
            "runs_per_job": sorted(runs.values()),
            "stats_jobs": 3,
        },
    )


# -- frozen processes ---------------------------------------------------------------------------


def test_a_paused_supervisor_rechecks_before_killing_a_healthy_backend(clis, tmp_path):
    out = tmp_path / "out"
    engine = ("--engine", SLOW, "--engine-opt", "steps=30", "--engine-opt", "step_seconds=0.2")
    cli = clis(tmp_path, "--output-dir", str(out), *engine, "--heartbeat-timeout", "2")
    info = cli.backend()
    with Client(info) as client:
        job = client.generate(png_bytes((64, 64)))
        _wait_state(client, job, "running")
        cli.proc.send_signal(signal.SIGSTOP)  # the host sleeps; the backend keeps working
        time.sleep(6.0)  # three heartbeat timeouts without a tick
        cli.proc.send_signal(signal.SIGCONT)
        end = client.wait_for_job(job, WAIT)
    assert end["event"] == "job_done", end
    record_ = JobStore(out).get(job)
    assert record_.recoveries == 0 and record_.backend_pid == info.pid  # never killed
    assert pid_alive(info.pid) and "respawn" not in cli.log(), cli.log()[-3000:]
    assert "re-checking" in cli.log()
    assert cli.stop() == 0
    record("paused_supervisor", {"paused_s": 6.0, "heartbeat_timeout_s": 2, "respawns": 0})


def test_a_supervisor_clock_that_jumps_a_pause_does_not_blame_the_backend(tmp_path):
    """The same decision, made deterministic: the supervisor's own monotonic clock jumps 30 s
    between two ticks (what a SIGSTOP or a sleeping host looks like from inside), right after
    it has read every message. Judging silence over time it was not watching would kill the
    backend on the first tick after waking."""
    offset = [0.0]

    def clock() -> float:
        return time.monotonic() + offset[0]

    spec = BackendSpec(
        output_dir=tmp_path / "out",
        connection_file=tmp_path / "run" / "b.json",
        engine=SLOW,
        engine_options={"steps": "20", "step_seconds": "0.1"},
        min_free_disk_mb=1,
        heartbeat_interval=1.0,
    )
    sup = Supervisor(spec, RespawnPolicy(heartbeat_timeout=3.0), clock=clock)
    seen: list = []
    try:
        sup.start_and_wait(WAIT)
        job = sup.submit(png_bytes((64, 64)))
        _tick_until(sup, lambda: sup.status()["current_job"] == job, seen)
        pid = sup.pid
        seen.extend(sup.tick())  # everything read: nothing new for up to a heartbeat
        offset[0] += 30.0
        seen.extend(sup.tick())  # the first tick after the pause
        assert sup.pid == pid and sup.state.value == "busy", sup.status()
        final = sup.wait_for_job(job, WAIT)
        seen.extend(sup.tick())
    finally:
        sup.stop(timeout=15)
    assert final["state"] == "done" and final["recoveries"] == 0 and final["backend_pid"] == pid
    assert not [e for e in seen if isinstance(e, SupervisorEvent) and e.kind == "respawn"]
    record("paused_supervisor_clock", {"jump_s": 30.0, "heartbeat_timeout_s": 3, "respawns": 0})


def test_a_stopped_backend_gets_sigkill_at_once(supervisors, tmp_path):
    # With a terminate wait longer than the test's bound, only SIGKILL at once can pass.
    sup = supervisors(tmp_path, engine="preview", heartbeat_timeout=1.5, terminate_wait=600)
    sup.start_and_wait(WAIT)
    frozen = sup.pid
    os.kill(frozen, signal.SIGSTOP)
    seen: list = []
    try:
        _tick_until(sup, lambda: sup.pid not in (None, frozen), seen)
    finally:
        if pid_alive(frozen):
            os.kill(frozen, signal.SIGCONT)
    assert sup.last_shutdown["pid"] == frozen and sup.last_shutdown["rungs"] == ["kill"]
    respawns = [e for e in seen if isinstance(e, SupervisorEvent) and e.kind == "respawn"]
    assert [e.data["cause"] for e in respawns] == ["missed_heartbeats"]
    assert not pid_alive(frozen)
    record("stopped_backend", {"rungs": sup.last_shutdown["rungs"], "terminate_wait_s": 600})


def test_a_frozen_standby_is_health_checked_and_replaced(supervisors, tmp_path):
    sup = supervisors(tmp_path, engine="preview", standby=True, heartbeat_timeout=1.5)
    sup.start_and_wait(WAIT)
    _tick_until(sup, lambda: (sup.status()["standby"] or {}).get("ready"))
    frozen, active = sup.standby_pid, sup.pid
    os.kill(frozen, signal.SIGSTOP)
    seen: list = []
    try:
        _tick_until(
            sup,
            lambda: (
                sup.standby_pid not in (None, frozen)
                and (sup.status()["standby"] or {}).get("ready")
            ),
            seen,
        )
    finally:
        if pid_alive(frozen):
            os.kill(frozen, signal.SIGCONT)
    failed = [e for e in seen if isinstance(e, SupervisorEvent) and e.kind == "standby"]
    assert any("no heartbeat" in e.reason for e in failed), [e.reason for e in failed]
    assert not pid_alive(frozen) and sup.pid == active  # the active one was never touched
    job = sup.submit(png_bytes((64, 64)))
    assert sup.wait_for_job(job, WAIT)["state"] == "done"
    record("frozen_standby", {"detected": True, "replaced": True, "active_untouched": True})


# -- storm guard, cancel, paths ------------------------------------------------------------------


def test_crashes_while_a_respawned_backend_starts_count_for_the_storm_guard(supervisors, tmp_path):
    options = {"steps": "4", "step_seconds": "0.1", "load_seconds": "1.5"}
    sup = supervisors(tmp_path, options=options, storm_limit=4, storm_window=120.0)
    sup.start_and_wait(WAIT)
    job = sup.submit(png_bytes((64, 64)))
    _tick_until(sup, lambda: sup.status()["current_job"] == job)
    seen: list = []
    kills = 0
    for _ in range(3):  # the running backend, then two respawned ones while they load
        victim = sup.pid
        os.kill(victim, signal.SIGKILL)
        kills += 1
        _tick_until(sup, lambda v=victim: sup.pid not in (None, v), seen)
        assert sup.state.value != "dead", sup.state_reason
    final = sup.wait_for_job(job, WAIT)
    assert final["state"] == "done", final
    causes = [
        e.data["cause"] for e in seen if isinstance(e, SupervisorEvent) and e.kind == "respawn"
    ]
    assert len(causes) == kills - 1 or len(causes) == kills  # the last respawn may come later
    for _ in range(3):  # beyond the limit the guard stops: dead, with the reason
        victim = sup.pid
        os.kill(victim, signal.SIGKILL)
        _tick_until(sup, lambda v=victim: sup.pid != v or sup.state.value == "dead", seen)
        if sup.state.value == "dead":
            break
    assert sup.state.value == "dead" and "restart storm" in sup.state_reason
    record("storm_guard_at_start", {"kills_during_start": 2, "dead_after": "storm_limit 4"})


def test_a_cancel_survives_the_crash_of_its_backend(supervisors, tmp_path):
    sup = supervisors(tmp_path, options={"steps": "2", "step_seconds": "10"})
    sup.start_and_wait(WAIT)
    job = sup.submit(png_bytes((64, 64)))
    _tick_until(sup, lambda: sup.status()["current_job"] == job)
    sup.cancel(job)  # noticed at the next checkpoint, 10 s away: the crash comes first
    store = JobStore(sup.spec.output_dir)
    _tick_until(sup, lambda: store.get(job).cancel_requested)
    victim = sup.pid
    os.kill(victim, signal.SIGKILL)
    final = sup.wait_for_job(job, WAIT)
    assert final["state"] == "cancelled", final
    _tick_until(sup, lambda: sup.pid not in (None, victim) and sup.client is not None)
    assert store.log_excerpt(job).count("started on") <= 1  # never run again
    assert not (sup.spec.output_dir / "jobs" / job / "result.glb").exists()
    record("cancel_then_crash_supervised", {"state": final["state"], "runs": 1})


def test_relative_and_non_utf8_paths_mean_the_same_folder_everywhere(clis, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    odd = b"out-\xff\xfe-caf\xc3\xa9"  # not UTF-8: a path from a Latin-1 file system
    conn = b"run/conn.json"
    cli = clis(
        tmp_path,
        "--output-dir",
        os.fsdecode(odd),
        "--engine",
        "preview",
        "--min-free-disk-mb",
        "1",
        cwd=work,
        conn=os.fsdecode(conn),
    )
    info = cli.backend()
    with Client(info) as client:
        job = client.generate(png_bytes((64, 64)))
        assert client.wait_for_job(job, WAIT)["event"] == "job_done"
    out = Path(os.fsdecode(os.path.join(os.fsencode(work), odd)))
    assert (work / "run" / "conn.json").exists()  # relative to the supervisor's folder
    assert (out / "jobs" / job / "result.glb").exists()
    assert (out / "logs").is_dir() and not (ROOT / os.fsdecode(odd)).exists()
    assert cli.stop() == 0
    spec = BackendSpec(output_dir=odd, connection_file=conn)  # bytes are decoded, made absolute
    assert spec.output_dir == Path.cwd() / os.fsdecode(odd) and spec.connection_file.is_absolute()
    record("paths", {"relative": "resolved once, in the supervisor", "non_utf8": "handled"})
