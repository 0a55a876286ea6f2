"""Faults with real backend processes: kill -9 in every stage of a job, a full disk (before
and during a job), a hung job, corrupt job folders, and the host (Blender) dying mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backend.checks.glbcheck import validate_glb_file
from backend.errors import BackendError, ErrorCode
from backend.procutil import pid_alive
from backend.store.jobs import JobStore
from backend.supervision.supervisor import BackendSpec, RespawnPolicy, Supervisor, SupervisorEvent
from backend.wire.client import Client
from tests.conftest import png_bytes
from tests.reliability.support import ROOT, WAIT, record, scale

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals, /proc and tmpfs")

SLOW = "tests.cpu_engines:SlowEngine"
ONCE = "tests.reliability.engines:OnceFaultEngine"
STAGES = ("prepare", "shape", "export")


@pytest.fixture
def supervisors():
    made: list[Supervisor] = []

    def make(tmp: Path, engine: str = SLOW, env=None, options=None, **policy) -> Supervisor:
        policy.setdefault("heartbeat_timeout", 3.0)
        policy.setdefault("storm_limit", 100)  # the test kills on purpose, many times
        spec = BackendSpec(
            output_dir=tmp / "out",
            connection_file=tmp / "run" / "backend.json",
            engine=engine,
            engine_options=options or {"steps": "6", "step_seconds": "0.05"},
            env=env or {},
            min_free_disk_mb=1,
            heartbeat_interval=0.2,
        )
        sup = Supervisor(spec, RespawnPolicy(**policy))
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.stop(timeout=15)


def _tick_until(sup: Supervisor, seen: list, predicate, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        for item in sup.tick():
            seen.append(item)
            if predicate(item):
                return item
        if predicate(None):
            return None
        assert time.monotonic() < deadline, f"timed out; supervisor is {sup.status()}"
        time.sleep(0.005)


def _job_files(out: Path, job_id: str) -> set[str]:
    return {p.name for p in (out / "jobs" / job_id).iterdir()}


def test_kill9_in_every_stage_is_respawned_and_the_job_retried_once(supervisors, tmp_path):
    rounds = scale(1, 5)
    sup = supervisors(tmp_path)
    sup.start_and_wait(WAIT)
    out = sup.spec.output_dir
    seen: list = []
    results = []
    for _ in range(rounds):
        for stage in STAGES:
            victim = sup.pid
            job_id = sup.submit(png_bytes((96, 96)), {"preset": "fast"})

            def in_stage(m, job_id=job_id, stage=stage):
                return (
                    m is not None
                    and getattr(m, "msg_type", "") == "job_progress"
                    and m.content.get("job_id") == job_id
                    and m.content.get("stage") == stage
                )

            _tick_until(sup, seen, in_stage)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            _tick_until(sup, seen, lambda _m, v=victim: sup.pid not in (None, v) and sup.client)
            respawn_s = time.monotonic() - killed_at
            final = sup.wait_for_job(job_id, WAIT)
            assert final["state"] == "done", final
            assert final["recoveries"] == 1 and final["backend_pid"] == sup.pid
            assert not pid_alive(victim)
            files = _job_files(out, job_id)
            assert {"input.png", "request.json", "result.glb", "job.json", "stats.json"} <= files
            assert "result.tmp.glb" not in files and not any(f.startswith(".") for f in files)
            assert validate_glb_file(out / "jobs" / job_id / "result.glb")["triangles"] > 0
            results.append({"stage": stage, "job_id": job_id, "respawn_s": round(respawn_s, 2)})
    seen.extend(sup.tick())
    respawns = [e for e in seen if isinstance(e, SupervisorEvent) and e.kind == "respawn"]
    retried = [e.job_id for e in seen if isinstance(e, SupervisorEvent) and e.kind == "job_retried"]
    assert [e.data["cause"] for e in respawns] == ["crash"] * len(results)
    assert retried == [r["job_id"] for r in results]  # each retried exactly once
    records, warnings = JobStore(out).list()
    assert sorted(r.id for r in records) == sorted(r["job_id"] for r in results)  # none lost
    assert all(r.state.value == "done" for r in records) and warnings == []
    done_events = [m for m in seen if getattr(m, "msg_type", "") == "job_done"]
    assert len({m.content["job_id"] for m in done_events}) == len(done_events)  # no duplicates
    record(
        "kill9",
        {
            "kills": len(results),
            "per_stage": {s: sum(1 for r in results if r["stage"] == s) for s in STAGES},
            "detected": len(respawns),
            "retried_once": len(retried),
            "jobs_done": sum(1 for r in records if r.state.value == "done"),
            "jobs_lost": 0,
            "respawn_seconds_max": max(r["respawn_s"] for r in results),
            "respawn_seconds_mean": round(sum(r["respawn_s"] for r in results) / len(results), 2),
        },
    )


def test_a_hung_job_trips_the_watchdog_and_runs_again_on_a_fresh_backend(supervisors, tmp_path):
    marker = tmp_path / "hung-once"
    env = {"REL_FAULT_STAGE": "shape", "REL_FAULT_MODE": "hang", "REL_FAULT_MARKER": str(marker)}
    sup = supervisors(tmp_path, engine=ONCE, env=env, job_watchdog=1.5)
    sup.start_and_wait(WAIT)
    hung = sup.pid
    job_id = sup.submit(png_bytes((96, 96)))
    began = time.monotonic()
    final = sup.wait_for_job(job_id, WAIT)
    seconds = time.monotonic() - began
    events = [e for e in sup.tick() if isinstance(e, SupervisorEvent)]
    causes = [e.data["cause"] for e in events if e.kind == "respawn"]
    assert marker.exists()  # the first run did hang
    assert final["state"] == "done" and final["recoveries"] == 1, final
    assert causes == ["watchdog"]
    assert not pid_alive(hung) and sup.pid != hung
    record(
        "watchdog",
        {
            "watchdog_s": 1.5,
            "respawns": causes,
            "job_state": final["state"],
            "recoveries": final["recoveries"],
            "seconds_to_done": round(seconds, 2),
        },
    )


# -- disk full ----------------------------------------------------------------------------------


def _fill(path: Path, leave: int) -> None:
    """Fill the filesystem of `path` until only about `leave` bytes are free."""
    import shutil

    free = shutil.disk_usage(path.parent).free
    with open(path, "wb") as f:
        f.write(b"\x00" * max(0, free - leave))


def test_a_full_disk_refuses_jobs_before_they_start(backend_proc, small_disk):
    import shutil

    b = backend_proc(SLOW, output_dir=small_disk / "out", min_free_disk_mb=4)
    filler = small_disk / "filler.bin"
    _fill(filler, 2 << 20)
    free = shutil.disk_usage(small_disk).free
    refused = 0
    for _ in range(scale(5, 50)):
        with pytest.raises(BackendError) as err:
            b.client.generate(png_bytes((64, 64)))
        assert err.value.code is ErrorCode.DISK_FULL and err.value.retryable and err.value.hint
        refused += 1
    assert b.client.jobs()["jobs"] == []  # nothing queued, no folder
    filler.unlink()  # space again: the same request works
    job_id = b.client.generate(png_bytes((64, 64)))
    assert b.client.wait_for_job(job_id, WAIT)["event"] == "job_done"
    assert b.stop() == 0
    record("disk_full_before", {"free_bytes": free, "threshold_mb": 4, "refused": refused})


def test_a_disk_that_fills_during_export_fails_the_job_without_a_partial_glb(
    backend_proc, small_disk, tmp_path
):
    marker = tmp_path / "filled-once"
    env = {
        "REL_FAULT_STAGE": "export",
        "REL_FAULT_MODE": "fill",
        "REL_FAULT_MARKER": str(marker),
        "REL_FAULT_BYTES": str(64 << 20),
    }
    out = small_disk / "out"
    b = backend_proc(ONCE, output_dir=out, min_free_disk_mb=1, env=env)
    job_id = b.client.generate(png_bytes((64, 64)))
    final = b.client.wait_for_job(job_id, WAIT)
    assert marker.exists()
    assert final["event"] == "job_failed", final
    assert final["code"] == "disk_full" and final["retryable"] and final.get("hint"), final
    assert "No space left" in final["message"]
    record_on_disk = b.client.job(job_id)
    files = set(record_on_disk["files"])
    assert record_on_disk["job"]["state"] == "failed"
    assert "result.glb" not in files and "result.tmp.glb" not in files, files
    assert not [f for f in files if f.startswith(".")], files  # no temp files left
    assert b.client.ping()["pong"] is True and b.alive()
    again = b.client.generate(png_bytes((64, 64)))  # the space came back: work goes on
    assert b.client.wait_for_job(again, WAIT)["event"] == "job_done"
    assert b.stop() == 0
    record(
        "disk_full_during_export",
        {"job_state": "failed", "code": final["code"], "partial_glb": False, "temp_files": 0},
    )


# -- corrupt history ----------------------------------------------------------------------------


def _record(job_id: str, **changes) -> dict:
    base = {"id": job_id, "kind": "generate", "state": "done", "engine": "slow", "params": {}}
    return {**base, **changes}


def test_corrupt_job_folders_are_skipped_with_a_warning(backend_proc, tmp_path):
    out = tmp_path / "shared-out"
    b = backend_proc(SLOW, "--queue-depth", "20", output_dir=out)
    good = [b.client.generate(png_bytes((64, 64))) for _ in range(3)]
    for job_id in good:
        assert b.client.wait_for_job(job_id, WAIT)["event"] == "job_done"
    assert b.stop() == 0
    jobs = out / "jobs"
    corrupt = {
        "20000101-000000-00000a": lambda p: (p / "job.json").write_bytes(b'{"id": "trunc'),
        "20000101-000000-00000b": lambda p: None,  # no job.json at all
        "20000101-000000-00000c": lambda p: (p / "job.json").write_text(
            json.dumps({"id": "20000101-000000-00000c", "state": "exploded"})
        ),
        "20000101-000000-00000d": lambda p: (p / "job.json").mkdir(),
        "20000101-000000-00000e": lambda p: (p / "job.json").write_bytes(os.urandom(512)),
        "20000101-000000-00000f": lambda p: (p / "job.json").write_text("[1, 2, 3]"),
        "20000101-000000-000010": lambda p: (p / "job.json").write_text(
            json.dumps({"id": "20000101-000000-000010", "state": "running", "kind": 5})
        ),
        # Loadable-looking records a server would trip over: a foreign id (a running job
        # whose id escapes the store) and fields of the wrong type.
        "20000101-000000-000011": lambda p: (p / "job.json").write_text(
            json.dumps(_record("../../escape", state="running"))
        ),
        "20000101-000000-000012": lambda p: (p / "job.json").write_text(
            json.dumps(_record("20000101-000000-000012", params="fast", kind=5))
        ),
        "20000101-000000-000013": lambda p: (p / "job.json").write_text(
            json.dumps(_record("20000101-000000-000013", result=[1], error="x"))
        ),
    }
    for name, damage in corrupt.items():
        (jobs / name).mkdir()
        damage(jobs / name)
    (jobs / "not-a-job").mkdir()
    (jobs / "stray.txt").write_text("x")
    # A fresh backend starts (recovering over the damage) and lists the history.
    b2 = backend_proc(SLOW, output_dir=out)
    listed = b2.client.jobs(limit=100)
    assert sorted(j["job_id"] for j in listed["jobs"]) == sorted(good)
    skipped = [w for w in listed["warnings"] if w.startswith("skipped ")]
    broken = {name for name in corrupt if any(name in w for w in skipped)}
    assert broken == set(corrupt)  # each one skipped, each with its warning
    assert b2.alive() and b2.client.ping()["pong"] is True
    for name in corrupt:
        with pytest.raises(BackendError) as err:
            b2.client.job(name)
        assert err.value.code is ErrorCode.NOT_FOUND
    job_id = b2.client.generate(png_bytes((64, 64)))
    assert b2.client.wait_for_job(job_id, WAIT)["event"] == "job_done"
    assert b2.stop() == 0
    record(
        "corrupt_history",
        {
            "corrupt_folders": len(corrupt),
            "skipped_with_warning": len(broken),
            "good_jobs_listed": len(listed["jobs"]),
            "warnings": listed["warnings"],
        },
    )


# -- the host process dies -----------------------------------------------------------------------

HOST = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from backend.supervision.supervisor import BackendSpec, RespawnPolicy, Supervisor
    from tests.conftest import png_bytes
    tmp = Path({tmp!r})
    spec = BackendSpec(output_dir=tmp / "out", connection_file=tmp / "run" / "b.json",
                       engine="tests.cpu_engines:SlowEngine", min_free_disk_mb=1,
                       engine_options={{"steps": "200", "step_seconds": "0.05"}},
                       heartbeat_interval=0.2)
    sup = Supervisor(spec, RespawnPolicy(heartbeat_timeout=3.0))
    sup.start_and_wait(60)
    job = sup.submit(png_bytes((64, 64)))
    while sup.status()["current_job"] != job:
        sup.tick(); time.sleep(0.01)
    (tmp / "host.json").write_text(json.dumps({{"backend": sup.pid, "job": job}}))
    while True:
        sup.tick(); time.sleep(0.05)
    """
)


def test_the_backend_exits_by_itself_when_its_host_is_killed_mid_job(tmp_path, backend_proc):
    """Blender stand-in: a host process runs the supervisor, starts a job, then is SIGKILLed
    (no atexit, no cleanup). The backend notices its parent is gone and exits; the job is not
    lost: the next backend on the same output folder runs it."""
    script = tmp_path / "host.py"
    script.write_text(HOST.format(root=str(ROOT), tmp=str(tmp_path)))
    host = subprocess.Popen([sys.executable, str(script)], cwd=ROOT)
    try:
        deadline = time.monotonic() + WAIT
        while not (tmp_path / "host.json").exists():
            assert host.poll() is None and time.monotonic() < deadline, "host did not start"
            time.sleep(0.05)
        info = json.loads((tmp_path / "host.json").read_text())
        backend = info["backend"]
        assert pid_alive(backend)
        host.kill()
        host.wait(10)
        killed = time.monotonic()
        while pid_alive(backend) and time.monotonic() - killed < WAIT:
            time.sleep(0.05)
        gone_after = time.monotonic() - killed
    finally:
        if host.poll() is None:
            host.kill()
    assert not pid_alive(backend), "orphan backend outlived its host"
    try:
        os.kill(backend, signal.SIGKILL)  # never leave one behind, even on failure
    except ProcessLookupError:
        pass
    # The job it was running is requeued on disk and a new backend finishes it.
    b = backend_proc(SLOW, output_dir=tmp_path / "out")
    final = b.client.wait_for_job(info["job"], WAIT)
    assert final["event"] == "job_done", final
    records, _ = JobStore(tmp_path / "out").list()
    assert [r.id for r in records] == [info["job"]]
    assert b.stop() == 0
    record(
        "host_killed",
        {"backend_exited_after_s": round(gone_after, 2), "orphans": 0, "job_finished_later": True},
    )


def test_client_without_backend_gets_a_typed_timeout(tmp_path):
    """A client whose backend vanished gets a typed error, never a hang."""
    from backend.wire import protocol

    info = protocol.ConnectionInfo(
        shell_port=1, iopub_port=2, key=protocol.new_key(), session="s", pid=0
    )
    with Client(info) as client, pytest.raises(BackendError) as err:
        client.ping(timeout=0.3)
    assert err.value.code is ErrorCode.BACKEND_DIED
