"""Spawns, watches and respawns backend processes for the add-on and scripts (stdlib + pyzmq):
handshake, heartbeat, job watchdog, respawn policy, restart-storm guard, warm standby and the
shutdown ladder. Every decision is made in `lifecycle.py`; this module does the I/O.

`Supervisor.tick()` never blocks, so the add-on can drive it from a `bpy.app.timers` callback;
so do `start()`, `restart()`, `begin_stop()` (the tick walks the ladder) and `request_nowait()`
(a `client.Pending` that the tick resolves). `start_and_wait()`, `wait_for_job()` and `stop()`
block (bounded) for scripts and tests.

It never reads or writes a job folder: jobs are the backend's. What it knows of a backend that
went, it hands to the next one (`backendlogs.Predecessor`), which settles the jobs left
running; a cancel with no backend runs the backend's own `cancel` command.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import subprocess
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from .. import settings
from ..backendlogs import Predecessor, log_tail
from ..errors import BackendError, ErrorCode
from ..procutil import is_stopped
from ..store.ownerlock import BACKEND_LOCK, LOCKED_EXIT_CODE, OWNER_LOCK, OutputLock, OutputLocked
from ..wire import protocol
from ..wire.client import Client, Pending
from . import commands
from .backend_process import (
    BackendProcess,
    BackendSpec,
    StartError,
    is_ours,
    process_group_options,
    read_conn,
    rotate_logs,
    signal_group,
    spawn,
    unlink_quietly,
)
from .lifecycle import (
    CAUSES,
    Cause,
    LadderWalk,
    Lifecycle,
    Rung,
    SupervisorState,
    Trigger,
    after_job,
    classify_exit,
    liveness,
    paused,
    recent,
    rung_for,
    shutdown_ladder,
    storm,
)

__all__ = [
    "BackendSpec",
    "RespawnPolicy",
    "StartError",
    "Supervisor",
    "SupervisorEvent",
    "SupervisorState",
    "log_tail",
    "rotate_logs",
]

log = logging.getLogger(__name__)
# A folder path that cannot become a folder however long we wait: part of it is a file.
IMPOSSIBLE_FOLDER = frozenset({errno.ENOTDIR, errno.EEXIST})

POISONED_EXIT_CODE = settings.EXIT_POISONED
ACTIVATE_TIMEOUT = settings.ACTIVATE_TIMEOUT
STANDBY_MAX_FAILURES = 3
CLAIM_RETRY = 2.0  # seconds between tries to lock an output folder that cannot hold a lock yet
JOB_EVENTS = settings.TERMINAL_EVENTS
CANCEL_OUTPUT = 65_536  # bytes read of the `cancel` command's output (one JSON line)


@dataclass
class RespawnPolicy:
    """When to replace the backend, and how long to wait for it."""

    after_failure: bool = True
    after_degraded: bool = False
    every_n_jobs: int | None = None
    fresh_per_job: bool = False
    standby: bool = False  # keep a warm standby process (engine loaded, no GPU work)
    heartbeat_timeout: float = (
        settings.HEARTBEAT_TIMEOUT
    )  # silence (no heartbeat, no reply) before a respawn
    # ... while a job runs: native calls that hold the GIL silence the backend that long
    busy_heartbeat_timeout: float = settings.BUSY_HEARTBEAT_TIMEOUT
    job_watchdog: float | None = 1800.0  # seconds one job may run before a respawn
    storm_limit: int = 5  # automatic restarts allowed within storm_window
    storm_window: float = 120.0
    start_timeout: float = 120.0  # spawn -> engine loaded
    shutdown_wait: float = 20.0  # after a `shutdown` request (CUDA teardown takes seconds)
    terminate_wait: float = settings.TERMINATE_WAIT  # after SIGTERM
    kill_wait: float = 5.0  # after SIGKILL


@dataclass(frozen=True)
class SupervisorEvent:
    """Something the supervisor did or saw. `msg_type` and `content` mirror protocol.Message,
    so one loop can handle both. `job_retried` names the job the supervisor saw running on a
    backend that died: the next backend settles it (runs it once more, fails it with
    `backend_died` if it already ran again, or ends it cancelled if the user cancelled it)."""

    kind: str  # state | respawn | takeover | standby | job_retried | dead
    reason: str = ""
    state: str | None = None
    job_id: str | None = None
    pid: int | None = None
    session: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def msg_type(self) -> str:
        return self.kind if self.kind in JOB_EVENTS else f"supervisor_{self.kind}"

    @property
    def content(self) -> dict[str, Any]:
        base = {"kind": self.kind, "reason": self.reason, "state": self.state, "pid": self.pid}
        if self.job_id:
            base["job_id"] = self.job_id
        if self.session:
            base["session"] = self.session
        return {**base, **self.data}


# -- the supervisor ---------------------------------------------------------------------------

_IDLE = (SupervisorState.STOPPED, SupervisorState.DEAD)

_SUPERVISORS: weakref.WeakSet[Supervisor] = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    """No orphans: whatever the host process forgot to stop is stopped as Python exits."""
    for supervisor in list(_SUPERVISORS):
        try:
            supervisor.stop(timeout=10.0)
        except Exception:  # atexit must go on to the next supervisor
            log.exception("stopping a supervisor at exit failed")


atexit.register(_stop_all_at_exit)


class Supervisor:
    """Keeps one backend alive (plus an optional warm standby). See docs/SUPERVISOR.md."""

    def __init__(
        self,
        spec: BackendSpec,
        policy: RespawnPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.spec = spec
        self.policy = policy or RespawnPolicy()
        self.clock = clock
        self.sleep = sleep
        self._lc = Lifecycle(clock())
        self._active: BackendProcess | None = None
        self._standby: BackendProcess | None = None
        self._retiring: list[BackendProcess] = []
        self._want_spawn = False
        self._events: deque[Any] = deque(maxlen=10_000)
        self._restarts: list[float] = []  # automatic restarts (the storm guard's history)
        self._restart_count = 0
        self._standby_failures = 0
        self._job: tuple[str, float] | None = None  # (job id, clock() when seen running)
        self._jobs_on_backend = 0
        self._last_log: Path | None = None
        self._last_error: BackendError | None = None
        self.last_shutdown: dict[str, Any] | None = None  # {pid, rung, exit_code, reason}
        # What is known of the last backend that went, for the next one (never written here)
        self._predecessor: Predecessor | None = None
        self._cancels: list[_OfflineCancel] = []  # `cancel` commands run with no backend
        self._outcomes: list[tuple[str, BackendProcess, Pending]] = []  # missed job ends asked
        self._zmq: zmq.Context | None = None  # shared by this supervisor's clients
        # One owner per output folder: this supervisor, for as long as it runs.
        self._owner = OutputLock(spec.output_dir, OWNER_LOCK, "supervisor", spec.connection_file)
        self._next_claim = 0.0
        self._was_ready = False  # a backend was ready since start(): later start crashes respawn
        self._last_tick = clock()
        self._woke_at = 0.0  # when the supervisor last woke from a pause (its own clock)
        _SUPERVISORS.add(self)

    # -- public properties ---------------------------------------------------------------

    @property
    def state(self) -> SupervisorState:
        return self._lc.state

    @property
    def state_reason(self) -> str:
        return self._lc.reason

    @property
    def log_path(self) -> Path | None:
        return self._active.log_path if self._active else self._last_log

    @property
    def pid(self) -> int | None:
        return self._active.pid if self._active else None

    @property
    def session(self) -> str | None:
        return self._active.session if self._active else None

    @property
    def client(self) -> Client | None:
        """The live backend's client (None while none is connected)."""
        b = self._active
        if b is None or b.hello is None or b.activating_since is not None:
            return None
        return b.client

    @property
    def standby_pid(self) -> int | None:
        return self._standby.pid if self._standby else None

    @property
    def last_error(self) -> BackendError | None:
        return self._last_error

    # -- control ---------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn a backend; returns at once (tick() completes the handshake)."""
        if self.state not in (SupervisorState.STOPPED, SupervisorState.DEAD):
            return
        self._last_error = None
        self._restarts.clear()
        self._standby_failures = 0
        self._was_ready = False
        self._fire(Trigger.START, "starting the backend")
        if not self._claim_folder(self.clock()):
            return
        self._want_spawn = True
        self._maybe_spawn(self.clock())

    def start_and_wait(self, timeout: float | None = None) -> None:
        """Start and block until the engine is loaded. Raises StartError (with the log tail)."""
        self.start()
        limit = self.policy.start_timeout + 5.0 if timeout is None else timeout
        self._wait_until(self._is_up, limit)

    def wait_ready(self, timeout: float) -> None:
        """Block (ticking) until a backend is ready, e.g. after restart(). Raises on DEAD."""
        self._wait_until(self._is_up, timeout)

    def restart(self, reason: str = "user") -> None:
        """The user's Restart: a fresh backend (the storm guard starts over). Non-blocking."""
        self._restarts.clear()
        self._standby_failures = 0
        if self.state in (SupervisorState.STOPPED, SupervisorState.DEAD):
            self.start()
        elif self.state is not SupervisorState.RESTARTING:
            self._respawn(Cause.USER, f"restart requested ({reason})", self.clock())

    def begin_stop(self, timeout: float | None = None) -> None:
        """Start the shutdown ladder for every backend and return at once: tick() walks it,
        and `stopping` stays true until every process has gone. `timeout` scales the ladder."""
        now = self.clock()
        self._want_spawn = False
        if self.state is not SupervisorState.STOPPED:
            self._fire(Trigger.STOP, "stopped")
        for b in (self._active, self._standby):
            if b is not None:
                self._retire(b, Rung.REQUEST, now, "supervisor stopping", budget=timeout)
        self._active = self._standby = None
        self._job = None

    @property
    def stopping(self) -> bool:
        """Some backend is still walking its shutdown ladder (or a cancel command runs)."""
        return bool(self._retiring or self._cancels)

    def stop(self, timeout: float | None = None) -> None:
        """Stop every backend through the shutdown ladder; blocks at most about `timeout` s
        (default: the ladder's own waits)."""
        self.begin_stop(timeout)
        limit = timeout if timeout is not None else self._ladder_total() + 1.0
        deadline = self.clock() + limit + 0.5
        while self._retiring:
            self._advance_retiring(self.clock())
            if not self._retiring or self.clock() > deadline:
                break
            self.sleep(0.02)
        for b in self._retiring:  # survived the ladder: nothing more can be done
            log.error("backend pid %s did not exit", b.pid)
            b.close()
        self._retiring.clear()
        while self._cancels and self.clock() <= deadline:  # a cancel command takes a moment
            self._follow_cancels(self.clock())
            if self._cancels:
                self.sleep(0.02)
        for cancel in list(self._cancels):
            cancel.give_up("the supervisor stopped before the cancel command ended")
        self._cancels.clear()
        if self._zmq is not None:  # every client is closed; destroy closes any stray socket
            self._zmq.destroy(linger=0)
            self._zmq = None
        self._owner.release()

    def submit(
        self,
        image: bytes,
        params: dict | None = None,
        filename: str = "image.png",
        idempotency_key: str | None = None,
    ) -> str:
        """Queue a generation on the live backend; returns the job id. Sending it again with
        the same `idempotency_key` (after a timeout, say) returns the same job."""
        client = self._require_client()
        return client.generate(
            image, params, filename, timeout=10.0, idempotency_key=idempotency_key
        )

    def cancel(self, job_id: str) -> None:
        """Cancel a job (blocking, bounded: scripts). With no backend at all, the backend's
        own `cancel` command does it (see cancel_nowait)."""
        client = self.client
        if client is not None:
            client.cancel(job_id, timeout=5.0)
            return
        if self._no_backend():
            pending = self._cancel_offline(job_id)
            while not pending.done:
                self._events.extend(self.tick())
                self.sleep(0.02)
            pending.result()
            return
        self._require_client()  # raises the right error

    def request_nowait(
        self,
        msg_type: str,
        content: dict[str, Any] | None = None,
        buffers: tuple[bytes, ...] | list[bytes] = (),
        timeout: float = 5.0,
    ) -> Pending:
        """Send a request to the live backend and return at once; tick() resolves the Pending
        (its deadline, or the backend going away, fails it). Without a live backend the
        Pending has already failed with the reason."""
        try:
            client = self._require_client()
        except BackendError as exc:
            return Pending.failed(msg_type, exc)
        return client.request_async(msg_type, content, buffers, timeout)

    def cancel_nowait(self, job_id: str) -> Pending:
        """cancel() without waiting. With no backend at all (stopped or dead, nothing going
        away) the backend's own `python -m backend cancel` runs as a short child process, and
        a later tick answers the Pending with its reply: the job ends cancelled at once rather
        than when a backend next starts, and this process never touches the job store."""
        if self.client is None and self._no_backend():
            return self._cancel_offline(job_id)
        return self.request_nowait("cancel", {"job_id": job_id}, timeout=5.0)

    def _no_backend(self) -> bool:
        """No backend runs or is going away: a job can change only by a `cancel` command."""
        return self.state in (SupervisorState.STOPPED, SupervisorState.DEAD) and not self._retiring

    def _cancel_offline(self, job_id: str) -> Pending:
        """Start `python -m backend cancel` for one job; tick() answers the Pending."""
        pending = Pending("cancel", sent=self.clock(), timeout=settings.OFFLINE_CANCEL_TIMEOUT)
        spec = self.spec
        try:
            proc = subprocess.Popen(
                commands.cancel_command(spec.python, output_dir=spec.output_dir, job_id=job_id),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=commands.backend_environment(spec.extra_pythonpath, spec.env),
                cwd=str(settings.EXTENSION_ROOT),
                close_fds=True,
                **process_group_options(),
            )
        except OSError as exc:
            pending.fail(
                BackendError(
                    ErrorCode.ENGINE_UNAVAILABLE,
                    f"cannot run the backend interpreter {spec.python} to cancel: {exc}",
                    "Check the backend's Python in the preferences.",
                )
            )
            return pending
        self._cancels.append(_OfflineCancel(proc, pending))
        return pending

    def _follow_cancels(self, now: float) -> None:
        for cancel in list(self._cancels):
            if cancel.proc.poll() is not None:
                cancel.finish()
            elif now > cancel.pending.deadline:
                cancel.give_up(
                    f"the cancel command did not end within {cancel.pending.timeout:g} s"
                )
            else:
                continue
            self._cancels.remove(cancel)

    def status(self) -> dict[str, Any]:
        b = self._active
        now = self.clock()
        return {
            "state": self.state.value,
            "reason": self.state_reason,
            "since": self._lc.since,
            "pid": self.pid,
            "session": self.session,
            "engine": self.spec.engine,
            "backend": dict(b.last_status) if b else {},
            "heartbeat": dict(b.last_heartbeat) if b else {},
            "current_job": self._job[0] if self._job else None,
            "jobs_on_backend": self._jobs_on_backend,
            "restarts": self._restart_count,
            "recent_restarts": len(recent(self._restarts, now, self.policy.storm_window)),
            "storm_limit": self.policy.storm_limit,
            "log_path": str(self.log_path) if self.log_path else None,
            "connection_file": str(self.spec.connection_file),
            "standby": (
                {"pid": self._standby.pid, "ready": self._standby.loaded} if self._standby else None
            ),
            "last_shutdown": self.last_shutdown,
            "last_error": self._last_error.to_dict() if self._last_error else None,
            "owns_output_dir": self._owner.held,
        }

    def wait_for_job(self, job_id: str, timeout: float) -> dict[str, Any]:
        """Block (ticking, so respawns happen) until the backend says the job has its outcome;
        returns its record (the `job` reply's). With no backend answering, it keeps ticking
        until one does or the time is up. For scripts and tests."""
        deadline = self.clock() + timeout
        next_check = 0.0
        asked: Pending | None = None
        while True:
            self._events.extend(self.tick())
            now = self.clock()
            if asked is None and now >= next_check and self._answers():
                next_check = now + 0.25
                asked = self.request_nowait("job", {"job_id": job_id}, timeout=5.0)
            if asked is not None and asked.done:
                if asked.ok:
                    record = asked.reply.get("job") or {}
                    if record.get("state") in settings.TERMINAL_STATES:
                        return record
                elif asked.error.code is ErrorCode.NOT_FOUND:
                    raise asked.error
                asked = None
            if now > deadline:
                raise BackendError(ErrorCode.BUSY, f"job {job_id} did not finish in {timeout} s")
            self.sleep(0.02)

    # -- the tick ----------------------------------------------------------------------------

    def tick(self) -> list[Any]:
        """Poll everything once without blocking; returns backend messages and
        SupervisorEvents since the last call."""
        now = self.clock()
        gap, self._last_tick = now - self._last_tick, now
        if self._lc.state not in _IDLE and paused(gap, self.policy.heartbeat_timeout):
            # We were not running (SIGSTOP, a sleeping host): the backends' silence meanwhile
            # is ours, not theirs. Liveness is measured again from now.
            log.info("the supervisor did not run for %.1f s; re-checking the backend", gap)
            self._woke_at = now
        if not self._owner.held and self._lc.state not in _IDLE and now >= self._next_claim:
            self._claim_folder(now)
        out: list[Any] = list(self._events)
        self._events.clear()
        for b in list(self._retiring):
            self._drain(b, now, connect=False)  # a going backend's messages are dropped
        self._advance_retiring(now)
        if self._lc.state is SupervisorState.STOPPED and not self._retiring and self._owner.held:
            # A stop walked by the tick (begin_stop) has finished: the folder is free for the
            # next supervisor (the add-on's Restart with new settings makes one).
            self._owner.release()
        active = self._active
        if active is not None:
            out.extend(self._drain(active, now))
            if self._active is active:  # events may have replaced it (policy, failure)
                self._watch_active(active, now)
        standby = self._standby
        if standby is not None:
            self._drain(standby, now)
            if self._standby is standby:
                self._watch_standby(standby, now)
        self._follow_cancels(now)
        self._follow_outcomes(now)
        self._maybe_spawn(now)
        self._maybe_spawn_standby(now)
        out.extend(self._events)
        self._events.clear()
        return out

    # -- spawning ----------------------------------------------------------------------------

    def _spawn(self, role: str, now: float) -> BackendProcess:
        beat = self.spec.heartbeat_interval or min(1.0, self.policy.heartbeat_timeout / 4)
        note = self._predecessor if role == "active" else None  # a standby's comes on activate
        return spawn(self.spec, role, now, beat, self._open_logs(), note)

    def _open_logs(self) -> set[Path]:
        return {
            b.log_path
            for b in (self._active, self._standby, *self._retiring)
            if b is not None and b.log_file is not None
        }

    def _maybe_spawn(self, now: float) -> None:
        """Spawn (or promote the standby) once the previous active backend has gone (and any
        `cancel` command has ended: it holds the folder's backend lock while it writes)."""
        if not self._want_spawn or self._cancels:
            return
        if any(b.role == "active" for b in self._retiring):
            return
        self._want_spawn = False
        sb = self._standby
        if sb is not None and sb.loaded and sb.failed is None and sb.poll_exit() is None:
            self._promote(sb, now)
            return
        if self.state is SupervisorState.RESTARTING:
            self._fire(Trigger.START, f"starting a fresh backend ({self.state_reason})")
        try:
            self._active = self._spawn("active", now)
            self._last_log = self._active.log_path
        except StartError as exc:
            self._give_up(exc.message, now, error=exc)
            return
        except OSError as exc:  # e.g. the log folder cannot be created: never "starting" forever
            where = self.spec.log_dir
            error = StartError(f"cannot prepare the backend's folder {where}: {exc}", None, "")
            error.hint = "Choose an output folder you can write to."
            self._give_up(error.message, now, error=error)
            return
        self._jobs_on_backend = 0

    def _maybe_spawn_standby(self, now: float) -> None:
        if (
            not self.policy.standby
            or self._standby is not None
            or self._standby_failures >= STANDBY_MAX_FAILURES
            or self.state not in (SupervisorState.READY, SupervisorState.BUSY)
        ):
            return
        try:
            self._standby = self._spawn("standby", now)
        except StartError as exc:
            self._standby_failed(None, exc.message, now)

    def _promote(self, sb: BackendProcess, now: float) -> None:
        """Warm standby takeover: activate it; the reply finishes the job (_on_activated)."""
        self._standby = None
        sb.role = "active"
        sb.activating_since = now
        self._active = sb
        self._jobs_on_backend = 0
        note = {"predecessor": self._predecessor.to_dict()} if self._predecessor else None
        if sb.send("activate", now, note) is None:
            self._active = None
            self._retire(sb, Rung.TERMINATE, now, "standby unreachable")
            self._want_spawn = True

    def _on_activated(self, b: BackendProcess, content: dict[str, Any], now: float) -> None:
        if not content.get("ok"):
            error = (content.get("error") or {}).get("message", "activate failed")
            self._active = None
            self._retire(b, Rung.REQUEST, now, f"standby refused to activate: {error}")
            self._want_spawn = True
            return
        b.activating_since = None
        protocol.write_connection_file(self.spec.connection_file, b.info)
        self._last_log = b.log_path
        self._fire(Trigger.LOADED, f"warm standby took over (pid {b.pid})")
        self._emit("takeover", f"standby pid {b.pid} took over", pid=b.pid, session=b.session)

    # -- watching -----------------------------------------------------------------------------

    def _handshake(self, b: BackendProcess, now: float) -> None:
        if b.info is not None:
            return
        info = read_conn(b.conn_path)
        if info is None or not is_ours(info, b):
            return
        b.info = info
        try:
            b.client = Client(info, context=self._context(), clock=self.clock)
        except (zmq.ZMQError, BackendError) as exc:
            log.warning("cannot connect to pid %s: %s", b.pid, exc)
            b.info = None
            return
        b.send("hello", now, {"client": "trellis2-supervisor"})

    def _drain(self, b: BackendProcess, now: float, connect: bool = True) -> list[protocol.Message]:
        if connect:
            self._handshake(b, now)
        if b.client is None:
            return []
        try:
            messages = b.client.poll(0)
        except zmq.ZMQError as exc:
            log.debug("poll of pid %s failed: %s", b.pid, exc)
            return []
        out = []
        for message in messages:
            mine = b.pending.pop(message.parent_id, None) if message.parent_id else None
            if mine is not None and message.msg_type == protocol.reply_type(mine[0]):
                self._on_reply(b, mine[0], message.content, now)
                continue
            if message.msg_type in ("heartbeat", "backend_state"):
                self._on_backend_state(b, message, now)
            if b is self._active and b.activating_since is None:
                self._on_job_event(message, now)
                out.append(message)
        return out

    def _on_reply(self, b: BackendProcess, kind: str, content: dict[str, Any], now: float) -> None:
        if kind == "hello" and content.get("ok"):
            b.hello = content
            b.connected_at = now
            self._backend_state(b, content.get("state", ""), "", now)
        elif kind == "status" and content.get("ok"):
            b.last_status = content
            reason = content.get("reason", "")
            if content.get("state") == "failed" and not reason:  # never leave "failed" unsaid
                reason = (content.get("engine_error") or {}).get("message") or "no reason given"
            self._backend_state(b, content.get("state", ""), reason, now)
        elif kind == "activate" and b is self._active:
            self._on_activated(b, content, now)

    def _on_backend_state(self, b: BackendProcess, message: protocol.Message, now: float) -> None:
        content = message.content
        if message.msg_type == "heartbeat":
            b.last_heartbeat = content
            if b is self._active and b.activating_since is None and b.loaded:
                running = content.get("running") or []
                if running:
                    self._note_job_running(running[0], now)
                elif self._job is not None:  # its end event was missed
                    self._note_job_ended(self._job[0], None, False, now)
                elif self.state is SupervisorState.BUSY:
                    self._fire(Trigger.JOB_ENDED, "idle")
        self._backend_state(b, content.get("state", ""), content.get("reason", ""), now)

    def _backend_state(self, b: BackendProcess, state: str, reason: str, now: float) -> None:
        """React to the backend's own state (from hello, status, heartbeat or an event)."""
        if b.hello is None:
            return
        active = b is self._active and b.activating_since is None
        if state == "failed" and b.failed is None:
            if b.last_status.get("state") != "failed":
                return  # the next `status` reply (soon: polled while loading) has reason and fix
            b.failed = reason
            if active:
                error = StartError(
                    f"the engine failed to load: {reason}", b.log_path, log_tail(b.log_path)
                )
                fix = (b.last_status.get("engine_error") or {}).get("hint")
                if fix:  # the engine's own fix, rather than the log tail
                    error.hint = fix
                self._give_up(error.message, now, error=error, error_from=b)
            elif b is self._standby:
                self._standby_failed(b, f"engine failed to load: {b.failed}", now)
            return
        if state in ("ready", "busy") and not b.loaded:
            b.loaded = True
            b.next_status = now  # fill status() (VRAM, queue) right away
            if b is self._standby:
                self._emit("standby", f"standby pid {b.pid} is ready", pid=b.pid)
        if not active:
            return
        if state in ("starting", "loading") and self.state is SupervisorState.STARTING:
            self._fire(Trigger.CONNECTED, reason or "loading the engine")
        elif b.loaded and self.state in (SupervisorState.STARTING, SupervisorState.LOADING):
            seconds = now - b.spawned_at
            self._was_ready = True
            self._fire(Trigger.LOADED, f"ready ({seconds:.1f} s after spawn, pid {b.pid})")

    def _on_job_event(self, message: protocol.Message, now: float) -> None:
        job_id = message.content.get("job_id")
        if message.msg_type == "job_started" and job_id:
            self._note_job_running(job_id, now)
        elif message.msg_type in JOB_EVENTS and job_id:
            outcome = message.msg_type.removeprefix("job_")
            degraded = bool(message.content.get("degraded"))
            code = message.content.get("code")
            self._note_job_ended(
                job_id, outcome, degraded, now, code if isinstance(code, str) else None
            )

    def _note_job_running(self, job_id: str, now: float) -> None:
        if self._job is not None and self._job[0] != job_id:  # the end event was missed
            self._note_job_ended(self._job[0], None, False, now)
        if self.state not in (SupervisorState.READY, SupervisorState.BUSY):
            return  # the policy just replaced the backend
        if self._job is None or self._job[0] != job_id:
            self._job = (job_id, now)
        if self.state is SupervisorState.READY:
            self._fire(Trigger.JOB_STARTED, f"running job {job_id}")

    def _note_job_ended(
        self,
        job_id: str,
        outcome: str | None,
        degraded: bool,
        now: float,
        error_code: str | None = None,
    ) -> None:
        if self._job is None or self._job[0] != job_id:
            return
        self._job = None
        if outcome is None:  # the event was missed (PUB/SUB drops): ask the backend
            b = self._active
            if b is not None and b.client is not None:
                asked = b.client.request_async("job", {"job_id": job_id}, timeout=5.0)
                self._outcomes.append((job_id, b, asked))
            return
        self._job_ended(job_id, outcome, degraded, now, error_code)

    def _follow_outcomes(self, now: float) -> None:
        """The backend's answers about jobs whose end event was missed."""
        for item in list(self._outcomes):
            job_id, b, asked = item
            if not asked.done:
                continue
            self._outcomes.remove(item)
            if b is not self._active or not asked.ok:
                continue  # gone meanwhile, or no answer: no outcome to act on
            record = asked.reply.get("job") or {}
            if record.get("state") not in settings.TERMINAL_STATES:
                continue  # requeued by a stopping backend: no outcome yet
            code = (record.get("error") or {}).get("code")
            degraded = bool(record.get("level"))
            self._job_ended(job_id, record["state"], degraded, now, code)

    def _job_ended(
        self,
        job_id: str,
        outcome: str,
        degraded: bool,
        now: float,
        error_code: str | None = None,
    ) -> None:
        """One job's outcome on the active backend: count it, then the after-job policy."""
        if outcome in ("done", "failed"):
            self._jobs_on_backend += 1
        if self.state is SupervisorState.BUSY and self._job is None:
            self._fire(Trigger.JOB_ENDED, f"job {job_id} {outcome}")
        p = self.policy
        decision = after_job(
            outcome=outcome,
            degraded=degraded,
            jobs_on_backend=self._jobs_on_backend,
            after_failure=p.after_failure,
            after_degraded=p.after_degraded,
            every_n_jobs=p.every_n_jobs,
            fresh_per_job=p.fresh_per_job,
            error_code=error_code,
        )
        if decision is not None:
            self._respawn(decision[0], decision[1], now)

    def _watch_active(self, b: BackendProcess, now: float) -> None:
        code = b.poll_exit()
        if code is not None:
            cause, text = classify_exit(code, POISONED_EXIT_CODE)
            b.why_gone = text
            if b.activating_since is not None:  # the standby died while taking over
                self._active = None
                self._standby_failures += 1
                self._retire(b, None, now, text)
                self._want_spawn = True
            elif code == LOCKED_EXIT_CODE and not b.loaded:
                owner = OutputLock(self.spec.output_dir, BACKEND_LOCK, "").recorded_owner()
                error = OutputLocked(self.spec.output_dir, owner)
                self._give_up(error.message, now, error=error, error_from=b)
            elif self._was_ready and not b.loaded:
                # A respawned backend that dies while starting counts like any crash, so the
                # storm guard (not the first death) decides when to stop.
                self._respawn(cause, f"the backend exited while starting: {text}", now, b)
            elif not b.loaded or self.state in (SupervisorState.STARTING, SupervisorState.LOADING):
                self._give_up(f"the backend exited while starting: {text}", now, error_from=b)
            else:
                self._respawn(cause, text, now, already_gone=b)
            return
        if b.activating_since is not None:
            if now - b.activating_since > ACTIVATE_TIMEOUT:
                self._active = None
                self._retire(b, Rung.TERMINATE, now, "standby did not answer `activate`")
                self._want_spawn = True
            return
        if not b.loaded and now - b.spawned_at > self.policy.start_timeout:
            limit = self.policy.start_timeout
            self._give_up(f"the backend was not ready within {limit:g} s", now, error_from=b)
            return
        if b.hello is None:
            return
        last_seen = self._last_seen(b)
        verdict = liveness(
            now=now,
            last_seen=last_seen,
            heartbeat_timeout=self.policy.heartbeat_timeout,
            job_started_at=self._job[1] if self._job else None,
            job_watchdog=self.policy.job_watchdog,
            busy_heartbeat_timeout=self.policy.busy_heartbeat_timeout,
        )
        if verdict is not None:
            if b.loaded:
                self._respawn(verdict[0], verdict[1], now)
            else:
                self._give_up(f"the backend hung while loading: {verdict[1]}", now, error_from=b)
            return
        self._poll_status(b, now, last_seen)

    def _last_seen(self, b: BackendProcess) -> float:
        """When the backend was last heard from, or the supervisor last woke from a pause."""
        return max(b.client.last_seen or 0.0, b.connected_at or 0.0, self._woke_at)

    def _poll_status(self, b: BackendProcess, now: float, last_seen: float) -> None:
        """Ask for status often while loading (fast READY), rarely after; ping when quiet."""
        if now >= b.next_status and not b.waiting_for("status"):
            b.next_status = now + (self.spec.status_interval if b.loaded else 0.05)
            b.send("status", now)
        if now - last_seen > self.policy.heartbeat_timeout / 2 and not b.waiting_for("ping"):
            b.send("ping", now)
        for msg_id, (_, sent) in list(b.pending.items()):  # forget what will never come back
            if now - sent > max(30.0, self.policy.heartbeat_timeout * 2):
                del b.pending[msg_id]

    def _watch_standby(self, b: BackendProcess, now: float) -> None:
        code = b.poll_exit()
        if code is not None:
            text = classify_exit(code, POISONED_EXIT_CODE)[1]
            self._standby = None
            self._retire(b, None, now, text)
            self._standby_failed(b, text, now)
            return
        if not b.loaded:
            if now - b.spawned_at > self.policy.start_timeout:
                self._standby_failed(b, "not ready in time", now)
            elif b.hello is not None and now >= b.next_status and not b.waiting_for("status"):
                b.next_status = now + 0.05
                b.send("status", now)
            return
        # Health-checked like the active one: a frozen standby would fail its takeover.
        last_seen = self._last_seen(b)
        verdict = liveness(
            now=now,
            last_seen=last_seen,
            heartbeat_timeout=self.policy.heartbeat_timeout,
            job_started_at=None,
            job_watchdog=None,
        )
        if verdict is not None:
            self._standby_failed(b, verdict[1], now, first=Rung.TERMINATE)
        elif now - last_seen > self.policy.heartbeat_timeout / 2 and not b.waiting_for("ping"):
            b.send("ping", now)

    def _standby_failed(
        self, b: BackendProcess | None, reason: str, now: float, first: Rung = Rung.REQUEST
    ) -> None:
        self._standby_failures += 1
        if b is not None and self._standby is b:
            self._standby = None
            self._retire(b, first, now, reason)
        disabled = self._standby_failures >= STANDBY_MAX_FAILURES
        text = f"standby failed: {reason}" + ("; standby disabled" if disabled else "")
        tail = log_tail(b.log_path) if b is not None else ""
        self._emit("standby", text, pid=b.pid if b else None, data={"log_tail": tail})
        log.warning(text)

    # -- respawn, give up, retire -----------------------------------------------------------

    def _respawn(
        self, cause: Cause, reason: str, now: float, already_gone: BackendProcess | None = None
    ) -> None:
        if not self._lc.can(Trigger.RESPAWN):
            return
        rule = CAUSES[cause]
        if not rule.planned:
            refused = storm(self._restarts, now, self.policy.storm_limit, self.policy.storm_window)
            if refused:
                self._give_up(f"{refused}; the last: {reason}", now, error_from=already_gone)
                return
            self._restarts.append(now)
        self._restart_count += 1
        old = self._active or already_gone
        if old is not None and self._job is not None and not rule.planned:
            old.orphan = self._job[0]  # it died under the job (a planned stop requeues it)
        self._active = None
        self._job = None
        self._fire(Trigger.RESPAWN, reason)  # before retiring: its events carry the new state
        self._emit("respawn", reason, pid=old.pid if old else None, data={"cause": cause.value})
        if old is not None:
            self._retire(old, rule.first_rung, now, reason)
        self._want_spawn = True

    def _give_up(
        self,
        reason: str,
        now: float,
        error: BackendError | None = None,
        error_from: BackendProcess | None = None,
    ) -> None:
        source = error_from or self._active
        tail = log_tail(source.log_path) if source is not None else ""
        if error is None:
            error = StartError(reason, source.log_path if source else self._last_log, tail)
        self._last_error = error
        self._want_spawn = False
        holder = self._active or error_from
        if holder is not None and self._job is not None:
            holder.orphan = self._job[0]
        self._job = None
        if self._lc.can(Trigger.GIVE_UP):  # before retiring: its events carry the new state
            self._fire(Trigger.GIVE_UP, reason)
        for b in (self._active, self._standby, error_from):
            if b is not None:
                self._retire(b, Rung.REQUEST, now, reason)
        self._active = self._standby = None
        data = {"log_tail": tail, "log_path": str(source.log_path) if source else None}
        self._emit("dead", reason, data=data)
        log.error("backend gave up: %s", reason)

    def _retire(
        self,
        b: BackendProcess,
        first: Rung | None,
        now: float,
        reason: str,
        budget: float | None = None,
    ) -> None:
        """Start the shutdown ladder for `b` (non-blocking; _advance_retiring walks it)."""
        if b in self._retiring:
            return
        b.why_gone = b.why_gone or reason
        if b.poll_exit() is None:
            if first is None or (first is Rung.REQUEST and b.client is None):
                first = Rung.TERMINATE  # nothing to ask: it never connected
            p = self.policy
            steps = shutdown_ladder(
                p.shutdown_wait, p.terminate_wait, p.kill_wait, start=first, budget=budget
            )
            b.walk = LadderWalk(steps, now)
        self._retiring.append(b)
        self._advance_retiring(now)

    def _advance_retiring(self, now: float) -> None:
        for b in list(self._retiring):
            exited = b.poll_exit() is not None
            if b.walk is not None:
                rung = b.walk.poll(now, exited)
                if rung is not None:
                    self._act(b, rung, now)
                    exited = b.poll_exit() is not None
                    if exited:
                        b.walk.poll(now, True)
                finished = b.walk.done
            else:
                finished = exited
            if finished:
                self._retiring.remove(b)
                self._finish(b)

    def _act(self, b: BackendProcess, rung: Rung, now: float) -> None:
        stopped = rung_for(rung, is_stopped(b.proc.pid))
        if stopped is not rung and b.walk is not None:
            b.walk.jump(stopped, now)  # SIGTERM would wait pending until a SIGCONT
            rung = stopped
        log.info("stopping backend pid %s: %s (%s)", b.pid, rung.value, b.why_gone)
        try:
            if rung is Rung.REQUEST:
                b.send("shutdown", now, {"reason": b.why_gone[:200]})
            elif rung is Rung.TERMINATE:
                signal_group(b.proc, terminate=True)
            else:
                signal_group(b.proc, terminate=False)
        except OSError as exc:  # already gone
            log.debug("%s of pid %s: %s", rung.value, b.pid, exc)

    def _finish(self, b: BackendProcess) -> None:
        """The process has exited (or survived every rung): clean up after it."""
        code = b.poll_exit()
        rung = b.walk.ended_by if b.walk else None
        survived = bool(b.walk and b.walk.survived)
        self.last_shutdown = {
            "pid": b.pid,
            "role": b.role,
            "rung": rung.value if rung else None,
            "rungs": [r.value for r in b.walk.acted] if b.walk else [],
            "exit_code": code,
            "survived": survived,
            "reason": b.why_gone,
        }
        b.close()
        for path in {self.spec.connection_file, b.conn_path}:
            current = read_conn(path)
            if current is not None and (
                current.session == b.session or (b.info is None and current.pid == b.pid)
            ):
                unlink_quietly(path)
        if b.role == "active" and not survived:
            self._note_gone(b)

    def _note_gone(self, b: BackendProcess) -> None:
        """The active backend has gone. What is known of it goes to the next backend, which
        settles the jobs it left running (the job store is the backend's, and the rule lives
        in one place: `store.jobs.after_backend_died`). A job this supervisor saw running on
        it when it died is announced now (`job_retried`), from what the supervisor saw; when
        no backend comes next, its record stays as it is until one starts."""
        why = b.why_gone or "the backend stopped"
        ran_jobs = b.loaded and b.activating_since is None
        if ran_jobs or self._predecessor is None:
            # One that never ran a job (not loaded yet, or a standby that died while taking
            # over) left none running: the note on the one before it still holds.
            self._predecessor = Predecessor.make(b.pid, why, b.log_path)
        if b.orphan is not None:
            data = {"log_path": str(b.log_path)}
            self._emit("job_retried", why, job_id=b.orphan, pid=b.pid, data=data)
            b.orphan = None

    # -- helpers ----------------------------------------------------------------------------

    def _fire(self, trigger: Trigger, reason: str) -> None:
        if self._lc.fire(trigger, reason, self.clock()):
            self._emit("state", reason, state=self._lc.state.value)

    def _emit(self, kind: str, reason: str, **fields: Any) -> None:
        fields.setdefault("state", self._lc.state.value)
        self._events.append(SupervisorEvent(kind, reason, **fields))

    def _context(self) -> zmq.Context:
        """One ZeroMQ context for all of this supervisor's clients: closing the client of a
        replaced backend then never waits in the tick for a context's I/O thread to end."""
        if self._zmq is None:
            self._zmq = zmq.Context()
        return self._zmq

    def _claim_folder(self, now: float) -> bool:
        """Own the output folder for as long as this supervisor runs. Another owner is fatal
        (dead, with an error naming it); a folder that cannot hold a lock yet (read-only,
        full) is tried again later while the backend refuses jobs with a typed error."""
        try:
            self._owner.acquire()
        except OutputLocked as exc:
            self._give_up(exc.message, now, error=exc)
            return False
        except OSError as exc:
            if exc.errno in IMPOSSIBLE_FOLDER:  # no waiting makes a path through a file work
                self._give_up(
                    f"the output folder {self.spec.output_dir} cannot exist: {exc.strerror}",
                    now,
                    error=BackendError(
                        ErrorCode.OUTPUT_UNWRITABLE,
                        f"the output folder {self.spec.output_dir} cannot exist: {exc.strerror}",
                        "Choose another output folder in the preferences.",
                    ),
                )
                return False
            if self._next_claim == 0.0:
                log.warning("cannot lock the output folder yet: %s", exc)
            self._next_claim = now + CLAIM_RETRY
        return True

    def _require_client(self) -> Client:
        client = self.client
        if client is not None and self.state in (
            SupervisorState.LOADING,
            SupervisorState.READY,
            SupervisorState.BUSY,
        ):
            return client
        if self.state in (SupervisorState.STARTING, SupervisorState.RESTARTING):
            raise BackendError(
                ErrorCode.BUSY,
                f"the backend is {self.state.value}",
                "Try again in a moment.",
            )
        raise BackendError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"the backend is {self.state.value}: {self.state_reason}",
            "Start or restart the backend.",
        )

    def _is_up(self) -> bool:
        return self.state in (SupervisorState.READY, SupervisorState.BUSY)

    def _answers(self) -> bool:
        """A backend that takes requests now."""
        return self.client is not None and self.state in (
            SupervisorState.LOADING,
            SupervisorState.READY,
            SupervisorState.BUSY,
        )

    def _ladder_total(self) -> float:
        p = self.policy
        return p.shutdown_wait + p.terminate_wait + p.kill_wait

    def _wait_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = self.clock() + timeout
        while True:
            self._events.extend(self.tick())
            if done():
                return
            if self.state is SupervisorState.DEAD:
                raise self._last_error or BackendError(ErrorCode.BACKEND_DIED, self.state_reason)
            if self.state is SupervisorState.STOPPED:
                raise BackendError(ErrorCode.SHUTTING_DOWN, "the supervisor was stopped")
            if self.clock() > deadline:
                b = self._active
                raise StartError(
                    f"the backend was not ready within {timeout:g} s ({self.state.value})",
                    b.log_path if b else self._last_log,
                    log_tail(b.log_path) if b else "",
                )
            self.sleep(0.01)


class _OfflineCancel:
    """A `python -m backend cancel` child and the Pending its reply answers."""

    def __init__(self, proc: subprocess.Popen, pending: Pending):
        self.proc = proc
        self.pending = pending

    def finish(self) -> None:
        """The command has exited: its last JSON line is the reply."""
        try:
            output = self.proc.stdout.read(CANCEL_OUTPUT) if self.proc.stdout else b""
        except OSError:
            output = b""
        self._close()
        reply = None
        for line in reversed(output.decode("utf-8", "replace").splitlines()):
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            break
        if isinstance(reply, dict) and reply.get("ok") is True:
            self.pending.resolve(reply)
        elif isinstance(reply, dict) and isinstance(reply.get("error"), dict):
            self.pending.fail(BackendError.from_dict(reply["error"]))
        else:
            tail = " ".join(output.decode("utf-8", "replace").split()[-40:])
            self.give_up(f"the cancel command exited with code {self.proc.returncode}: {tail}")

    def give_up(self, reason: str) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
        self._close()
        self.pending.fail(BackendError(ErrorCode.INTERNAL, reason, "Try the cancel again."))

    def _close(self) -> None:
        if self.proc.stdout is not None:
            try:
                self.proc.stdout.close()
            except OSError:
                pass
