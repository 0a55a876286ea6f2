"""Requests as futures: `Client.request_async`, `Supervisor.request_nowait`, `begin_stop` walked
by the tick, and the supervisor's failure paths the add-on depends on (an impossible output
folder, an engine that fails to load, the respawn policy looking at the error kind). Every wait
here is a bounded tick loop in the test; the code under test never sleeps (sleep raises)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import zmq

from backend.errors import BackendError, ErrorCode
from backend.procutil import pid_alive
from backend.supervision.lifecycle import CLEAN_FAILURES, Cause, after_job
from backend.supervision.supervisor import BackendSpec, RespawnPolicy, Supervisor, SupervisorState
from backend.wire import protocol
from backend.wire.client import Client, ClientTimeout, Pending
from tests.addon_engines import LOAD_HINT, LOAD_MESSAGE
from tests.conftest import png_bytes

SLOW = "tests.cpu_engines:SlowEngine"
WAIT = 30.0

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals in tests")


def no_sleep(seconds: float) -> None:
    raise AssertionError(f"the code under test slept {seconds} s")


# -- the client --------------------------------------------------------------------------------


class SilentBackend:
    """Sockets bound like a backend's that never answer: a frozen backend, seen from a client."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.shell = self.ctx.socket(zmq.ROUTER)
        self.iopub = self.ctx.socket(zmq.PUB)
        self.info = protocol.ConnectionInfo(
            shell_port=self.shell.bind_to_random_port("tcp://127.0.0.1"),
            iopub_port=self.iopub.bind_to_random_port("tcp://127.0.0.1"),
            key=protocol.new_key(),
            session="silent",
            pid=os.getpid(),
        )

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def silent():
    backend = SilentBackend()
    yield backend
    backend.close()


def test_request_async_returns_at_once_and_poll_resolves_it(make_server):
    s = make_server()
    pending = s.client.request_async("ping")
    assert not pending.done and s.client.pending_requests == 1
    deadline = time.monotonic() + WAIT
    while not pending.done and time.monotonic() < deadline:
        assert all(m.parent_id != pending.msg_id for m in s.client.poll(0.05))  # reply consumed
    assert pending.ok and pending.result()["pong"] is True
    assert s.client.pending_requests == 0

    missing = s.client.request_async("cancel", {"job_id": "20990101-000000-abcdef"})
    while not missing.done and time.monotonic() < deadline:
        s.client.poll(0.05)
    assert missing.error is not None and missing.error.code is ErrorCode.NOT_FOUND
    with pytest.raises(BackendError):
        missing.result()


def test_generate_future_resolves_although_its_queued_event_shares_the_parent(make_server):
    s = make_server(engine_options={"steps": "1", "step_seconds": "0.01"})
    pending = s.client.request_async("generate", {"params": {"preset": "fast"}}, [png_bytes()])
    seen = []
    deadline = time.monotonic() + WAIT
    while not pending.done and time.monotonic() < deadline:
        seen.extend(s.client.poll(0.05))
    job_id = pending.result()["job_id"]
    while not any(m.msg_type == "job_queued" for m in seen) and time.monotonic() < deadline:
        seen.extend(s.client.poll(0.05))
    queued = next(m for m in seen if m.msg_type == "job_queued")
    assert queued.content["job_id"] == job_id and queued.parent_id == pending.msg_id


def test_a_silent_backend_fails_the_future_at_its_deadline_and_close_fails_the_rest(silent):
    now = [100.0]
    client = Client(silent.info, clock=lambda: now[0])
    try:
        ping = client.request_async("ping", timeout=2.0)
        status = client.request_async("status", timeout=60.0)
        assert client.poll(0) == [] and not ping.done
        now[0] += 2.5
        client.poll(0)
        assert isinstance(ping.error, ClientTimeout) and "ping" in ping.error.message
        assert not status.done
    finally:
        client.close()
    assert status.error is not None and status.error.code is ErrorCode.BACKEND_DIED
    late = client.request_async("ping")
    assert late.done and late.error.code is ErrorCode.BACKEND_DIED


def test_pending_helpers():
    answered = Pending.answered("job", {"ok": True, "job": {}})
    assert answered.ok and answered.result() == {"ok": True, "job": {}}
    refused = Pending.answered("job", {"ok": False, "error": {"code": "busy", "message": "full"}})
    assert refused.error.code is ErrorCode.BUSY and refused.error.message == "full"
    waiting = Pending("ping", "id", sent=0.0, timeout=1.0)
    with pytest.raises(RuntimeError):
        waiting.result()


# -- the supervisor -----------------------------------------------------------------------------


@pytest.fixture
def supervisors(tmp_path):
    made: list[Supervisor] = []

    def make(engine=SLOW, options=None, output_dir=None, **policy) -> Supervisor:
        policy.setdefault("heartbeat_timeout", 4.0)
        spec = BackendSpec(
            output_dir=output_dir or tmp_path / "out",
            connection_file=tmp_path / "run" / f"backend{len(made)}.json",
            engine=engine,
            engine_options=options or {},
            min_free_disk_mb=1,
        )
        sup = Supervisor(spec, RespawnPolicy(**policy), sleep=no_sleep)
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.sleep = time.sleep
        sup.stop(timeout=15)


def tick_until(sup: Supervisor, predicate, timeout: float = WAIT) -> list:
    events = []
    deadline = time.monotonic() + timeout
    while not predicate():
        events.extend(sup.tick())
        assert time.monotonic() < deadline, f"timed out: {sup.status()}"
        time.sleep(0.01)
    return events


def test_request_nowait_without_a_backend_fails_at_once(supervisors):
    sup = supervisors()
    pending = sup.request_nowait("jobs", {"limit": 5})
    assert pending.done and pending.error.code is ErrorCode.ENGINE_UNAVAILABLE


def test_requests_resolve_in_the_tick_and_begin_stop_is_walked_by_it(supervisors):
    sup = supervisors(options={"steps": "400", "step_seconds": "0.02"})
    sup.start()
    tick_until(sup, lambda: sup.state is SupervisorState.READY)
    pid = sup.pid
    job = sup.request_nowait("generate", {"params": {"preset": "fast"}}, [png_bytes()])
    tick_until(sup, lambda: job.done)
    job_id = job.result()["job_id"]
    tick_until(sup, lambda: sup.state is SupervisorState.BUSY)
    listing = sup.request_nowait("jobs", {"limit": 5})
    tick_until(sup, lambda: listing.done)
    assert [j["job_id"] for j in listing.result()["jobs"]] == [job_id]

    sup.begin_stop()  # returns while the backend still runs its job
    assert sup.state is SupervisorState.STOPPED and sup.stopping and pid_alive(pid)
    tick_until(sup, lambda: not sup.stopping)
    assert not pid_alive(pid) and sup.last_shutdown["rung"] == "request"
    cancel = sup.cancel_nowait(job_id)  # no backend: its `cancel` command runs meanwhile
    assert not cancel.done and sup.stopping  # the add-on ticks a stopping supervisor on
    tick_until(sup, lambda: cancel.done)
    assert cancel.ok and cancel.result()["state"] == "cancelled"
    assert not sup.stopping


@posix_only
def test_a_frozen_backend_fails_its_futures_while_every_tick_returns(supervisors):
    sup = supervisors(engine="preview", heartbeat_timeout=1.5, terminate_wait=0.5)
    sup.start()
    tick_until(sup, lambda: sup.state is SupervisorState.READY)
    frozen = sup.pid
    os.kill(frozen, signal.SIGSTOP)
    try:
        pending = sup.request_nowait("jobs", {"limit": 1}, timeout=60.0)
        tick_until(sup, lambda: pending.done)  # the respawn closes its connection
        assert pending.error.code is ErrorCode.BACKEND_DIED
        tick_until(sup, lambda: sup.state is SupervisorState.READY and sup.pid != frozen)
    finally:
        if pid_alive(frozen):
            os.kill(frozen, signal.SIGKILL)


def test_an_output_folder_under_a_file_goes_dead_with_the_reason_not_starting(
    supervisors, tmp_path
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    sup = supervisors(output_dir=blocker / "out")
    sup.start()  # must not raise, must not stay "starting" with no process
    assert sup.state is SupervisorState.DEAD and sup.pid is None
    assert str(blocker) in sup.state_reason and sup.last_error.hint


def test_an_engine_that_fails_to_load_gives_its_reason_and_fix_once(supervisors):
    sup = supervisors(engine="tests.addon_engines:FailLoadEngine")
    sup.start()
    tick_until(sup, lambda: sup.state is SupervisorState.DEAD)
    assert sup.state_reason == f"the engine failed to load: {LOAD_MESSAGE}"
    assert sup.last_error.message == sup.state_reason
    assert sup.last_error.hint == LOAD_HINT


@pytest.mark.parametrize(
    ("code", "respawns"), [("empty_alpha", False), ("bad_image", False), ("engine_error", True)]
)
def test_only_failures_that_can_leave_the_gpu_dirty_respawn(supervisors, code, respawns):
    sup = supervisors(engine="tests.addon_engines:FailJobEngine", options={"code": code})
    sup.start()
    tick_until(sup, lambda: sup.state is SupervisorState.READY)
    first = sup.pid
    job = sup.request_nowait("generate", {"params": {"preset": "fast"}}, [png_bytes()])
    events: list = []
    deadline = time.monotonic() + WAIT
    while not any(getattr(e, "msg_type", "") == "job_failed" for e in events):
        events.extend(sup.tick())
        assert time.monotonic() < deadline, sup.status()
        time.sleep(0.01)
    assert job.ok
    events += tick_until(sup, lambda: sup.state is SupervisorState.READY)
    respawned = [e for e in events if getattr(e, "kind", "") == "respawn"]
    assert bool(respawned) is respawns
    assert (sup.pid != first) is respawns


# -- the policy, as a table ---------------------------------------------------------------------


def _after(outcome="failed", code=None, **changes):
    kwargs = dict(
        outcome=outcome,
        degraded=False,
        jobs_on_backend=1,
        after_failure=True,
        after_degraded=False,
        every_n_jobs=None,
        fresh_per_job=False,
        error_code=code,
    )
    kwargs.update(changes)
    return after_job(**kwargs)


@pytest.mark.parametrize("code", sorted(CLEAN_FAILURES))
def test_clean_failures_keep_the_backend(code):
    assert _after(code=code) is None
    assert _after(code=code, every_n_jobs=1)[0] is Cause.EVERY_N_JOBS  # other rules still apply
    assert _after(code=code, fresh_per_job=True)[0] is Cause.FRESH_PER_JOB


@pytest.mark.parametrize(
    "code", [None, "out_of_memory", "gpu_poisoned", "internal", "invalid_mesh"]
)
def test_other_failures_replace_the_backend(code):
    cause, reason = _after(code=code)
    assert cause is Cause.AFTER_FAILURE and (code or "no error code") in reason


def test_the_clean_list_names_real_error_codes():
    assert {c.value for c in ErrorCode} >= CLEAN_FAILURES
