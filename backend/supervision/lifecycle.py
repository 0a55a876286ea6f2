"""The supervisor's decisions, sans I/O: its state machine, respawn policy, restart-storm guard
and shutdown ladder, as data and pure functions of (history, now, limits) with no clock of
their own, so tests drive them with a fake clock. `supervisor.py` is the I/O shell around them.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from .. import settings
from ..errors import ErrorCode


class SupervisorState(str, Enum):
    STOPPED = "stopped"  # nothing running, nothing wanted
    STARTING = "starting"  # process spawned, waiting for its connection file and `hello`
    LOADING = "loading"  # connected; the engine is loading
    READY = "ready"  # idle, accepting jobs
    BUSY = "busy"  # a job is running
    RESTARTING = "restarting"  # the old backend is going away; a new one comes next
    DEAD = "dead"  # gave up (start failure, engine failure, restart storm); sticky


class Trigger(str, Enum):
    START = "start"  # spawn a backend (first start, manual restart from dead/stopped)
    CONNECTED = "connected"  # hello answered; engine still loading
    LOADED = "loaded"  # engine loaded, backend idle
    JOB_STARTED = "job_started"
    JOB_ENDED = "job_ended"
    RESPAWN = "respawn"  # a cause (crash, policy, user...) wants a fresh backend
    GIVE_UP = "give_up"
    STOP = "stop"


S, T = SupervisorState, Trigger
_LIVE = (S.STARTING, S.LOADING, S.READY, S.BUSY)

# (state, trigger) -> next state. DEAD is sticky: only a manual START or STOP leaves it.
TRANSITIONS: dict[tuple[SupervisorState, Trigger], SupervisorState] = {
    (S.STOPPED, T.START): S.STARTING,
    (S.STOPPED, T.STOP): S.STOPPED,
    (S.STARTING, T.CONNECTED): S.LOADING,
    (S.STARTING, T.LOADED): S.READY,
    (S.LOADING, T.LOADED): S.READY,
    (S.READY, T.JOB_STARTED): S.BUSY,
    (S.READY, T.JOB_ENDED): S.READY,
    (S.READY, T.LOADED): S.READY,
    (S.BUSY, T.JOB_STARTED): S.BUSY,
    (S.BUSY, T.JOB_ENDED): S.READY,
    (S.BUSY, T.LOADED): S.BUSY,
    (S.RESTARTING, T.START): S.STARTING,
    (S.RESTARTING, T.LOADED): S.READY,  # a warm standby took over
    (S.DEAD, T.START): S.STARTING,
    (S.DEAD, T.STOP): S.STOPPED,
    **{(state, T.RESPAWN): S.RESTARTING for state in _LIVE},
    **{(state, T.GIVE_UP): S.DEAD for state in (*_LIVE, S.RESTARTING)},
    **{(state, T.STOP): S.STOPPED for state in (*_LIVE, S.RESTARTING)},
}


class TransitionError(RuntimeError):
    """A trigger that the current state does not accept: a bug in the supervisor."""

    def __init__(self, state: SupervisorState, trigger: Trigger):
        super().__init__(f"supervisor cannot handle {trigger.value!r} while {state.value!r}")
        self.state = state
        self.trigger = trigger


@dataclass(frozen=True)
class Transition:
    at: float
    source: SupervisorState
    target: SupervisorState
    trigger: Trigger
    reason: str


class Lifecycle:
    """The current state, the reason for the last transition, and a short history."""

    HISTORY = 50

    def __init__(self, now: float):
        self.state = SupervisorState.STOPPED
        self.reason = "not started"
        self.since = now
        self.history: list[Transition] = []

    def can(self, trigger: Trigger) -> bool:
        return (self.state, trigger) in TRANSITIONS

    def fire(self, trigger: Trigger, reason: str, now: float) -> bool:
        """Apply a trigger; returns whether the state changed. Raises TransitionError."""
        target = TRANSITIONS.get((self.state, trigger))
        if target is None:
            raise TransitionError(self.state, trigger)
        changed = target is not self.state
        self.history.append(Transition(now, self.state, target, trigger, reason))
        del self.history[: -self.HISTORY]
        if changed:
            self.since = now
        self.state, self.reason = target, reason
        return changed


# -- why a backend goes away ---------------------------------------------------------------


class Rung(str, Enum):
    """Shutdown ladder rungs, gentlest first."""

    REQUEST = "request"  # `shutdown` request: the backend requeues its job and exits
    TERMINATE = "terminate"  # SIGTERM (TerminateProcess on Windows)
    KILL = "kill"  # SIGKILL to the process group (TerminateProcess on Windows)


class Cause(str, Enum):
    CRASH = "crash"
    POISONED = "poisoned"
    MISSED_HEARTBEATS = "missed_heartbeats"
    WATCHDOG = "watchdog"
    USER = "user"
    AFTER_FAILURE = "after_failure"
    AFTER_DEGRADED = "after_degraded"
    EVERY_N_JOBS = "every_n_jobs"
    FRESH_PER_JOB = "fresh_per_job"


@dataclass(frozen=True)
class CauseRule:
    planned: bool  # planned restarts do not count towards the storm guard
    first_rung: Rung | None  # where the shutdown ladder starts (None: the process is gone)


# A hung backend cannot answer a shutdown request (and a hung job would hold it for the
# server's whole grace period), so those start at terminate.
CAUSES: dict[Cause, CauseRule] = {
    Cause.CRASH: CauseRule(planned=False, first_rung=None),
    Cause.POISONED: CauseRule(planned=False, first_rung=None),
    Cause.MISSED_HEARTBEATS: CauseRule(planned=False, first_rung=Rung.TERMINATE),
    Cause.WATCHDOG: CauseRule(planned=False, first_rung=Rung.TERMINATE),
    Cause.USER: CauseRule(planned=True, first_rung=Rung.REQUEST),
    Cause.AFTER_FAILURE: CauseRule(planned=True, first_rung=Rung.REQUEST),
    Cause.AFTER_DEGRADED: CauseRule(planned=True, first_rung=Rung.REQUEST),
    Cause.EVERY_N_JOBS: CauseRule(planned=True, first_rung=Rung.REQUEST),
    Cause.FRESH_PER_JOB: CauseRule(planned=True, first_rung=Rung.REQUEST),
}


def rung_for(rung: Rung, stopped: bool) -> Rung:
    """A stopped process (SIGSTOP, T state) answers no request and keeps SIGTERM pending
    until it is continued: it gets SIGKILL at once."""
    return Rung.KILL if stopped else rung


def classify_exit(code: int, poisoned_code: int = settings.EXIT_POISONED) -> tuple[Cause, str]:
    """Why a backend process that nobody asked to stop has exited."""
    if code == poisoned_code:
        return Cause.POISONED, f"the CUDA context was poisoned (exit code {code})"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return Cause.CRASH, f"the backend was killed by {name}"
    if sys.platform == "win32" and code >= 0xC0000000:
        return Cause.CRASH, f"the backend crashed (status 0x{code:08X})"
    return Cause.CRASH, f"the backend exited unexpectedly with code {code}"


def liveness(
    *,
    now: float,
    last_seen: float,
    heartbeat_timeout: float,
    job_started_at: float | None,
    job_watchdog: float | None,
    busy_heartbeat_timeout: float | None = None,
) -> tuple[Cause, str] | None:
    """A backend that is silent too long or runs one job too long must be replaced.

    While a job runs, silence is allowed for `busy_heartbeat_timeout`: CuMesh's bindings
    (remeshing, simplification in TRELLIS.2's export) do not release the GIL, so while one
    runs the control loop cannot send heartbeats, and the export stage took up to 76 s on the
    real code. How long a single call holds the GIL was not measured; a hung job is still
    caught by the job watchdog."""
    silent = now - last_seen
    limit = heartbeat_timeout
    if job_started_at is not None and busy_heartbeat_timeout is not None:
        limit = max(heartbeat_timeout, busy_heartbeat_timeout)
    if silent > limit:
        return Cause.MISSED_HEARTBEATS, f"no heartbeat for {silent:.1f} s"
    if job_started_at is not None and job_watchdog is not None:
        running = now - job_started_at
        if running > job_watchdog:
            return Cause.WATCHDOG, f"a job ran {running:.0f} s (watchdog {job_watchdog:g} s)"
    return None


# Error codes (errors.ErrorCode values) of failures that cannot leave the GPU dirty: the input
# was bad (no subject, an unreadable image, refused settings), nothing was generated from a
# sound run, or the disk refused a write. A backend that failed a job this way is as healthy as
# before, so "after failures" does not replace it. Any other code - and a failure without a
# code - may have left memory or the CUDA context dirty.
CLEAN_FAILURES = frozenset(
    code.value
    for code in (
        ErrorCode.BAD_IMAGE,
        ErrorCode.IMAGE_TOO_LARGE,
        ErrorCode.EMPTY_ALPHA,
        ErrorCode.NEEDS_TRANSPARENCY,
        ErrorCode.BAD_MESH_INPUT,
        ErrorCode.BAD_PARAMS,
        ErrorCode.EMPTY_STRUCTURE,
        ErrorCode.NOT_FOUND,
        ErrorCode.CANCELLED,
        ErrorCode.DISK_FULL,
        ErrorCode.OUTPUT_UNWRITABLE,
    )
)


def paused(gap: float, heartbeat_timeout: float) -> bool:
    """The supervisor itself did not run for `gap` seconds between two ticks (SIGSTOP, a host
    that slept, a busy host application). Silence it did not watch says nothing about the
    backend: liveness is measured again from the moment it woke."""
    return gap > max(1.0, heartbeat_timeout / 2)


def after_job(
    *,
    outcome: str,
    degraded: bool,
    jobs_on_backend: int,
    after_failure: bool,
    after_degraded: bool,
    every_n_jobs: int | None,
    fresh_per_job: bool,
    error_code: str | None = None,
) -> tuple[Cause, str] | None:
    """Policy: should the backend be replaced after a job ended with `outcome`?
    `jobs_on_backend` counts finished jobs (done or failed) including this one; `error_code`
    is a failed job's code (a clean failure never triggers "after failures")."""
    if outcome not in ("done", "failed"):
        return None  # a cancelled job says nothing about the backend's health
    if fresh_per_job:
        return Cause.FRESH_PER_JOB, "a fresh backend for every job"
    if outcome == "failed" and after_failure and error_code not in CLEAN_FAILURES:
        return Cause.AFTER_FAILURE, f"a job failed ({error_code or 'no error code'})"
    if outcome == "done" and degraded and after_degraded:
        return Cause.AFTER_DEGRADED, "a job finished at reduced quality"
    if every_n_jobs and jobs_on_backend >= every_n_jobs:
        return Cause.EVERY_N_JOBS, f"{jobs_on_backend} jobs on this backend"
    return None


def recent(history: Iterable[float], now: float, window: float) -> list[float]:
    """The restart times that still count: those within `window` seconds before `now`."""
    return [t for t in history if now - t < window]


def storm(history: Sequence[float], now: float, limit: int, window: float) -> str | None:
    """The restart-storm guard: `history` holds earlier automatic restarts; one more is allowed
    unless `limit` of them already happened within `window`. Returns why not, or None."""
    count = len(recent(history, now, window))
    if count >= limit:
        return f"restart storm: {count} automatic restarts within {window:g} s"
    return None


# -- the shutdown ladder -------------------------------------------------------------------


@dataclass(frozen=True)
class LadderStep:
    rung: Rung
    wait: float  # seconds to wait for the process to exit after acting on this rung


def shutdown_ladder(
    request_wait: float,
    terminate_wait: float,
    kill_wait: float,
    start: Rung = Rung.REQUEST,
    budget: float | None = None,
) -> tuple[LadderStep, ...]:
    """The rungs from `start` on; with a `budget`, waits shrink so the whole walk fits it."""
    steps = [
        LadderStep(Rung.REQUEST, request_wait),
        LadderStep(Rung.TERMINATE, terminate_wait),
        LadderStep(Rung.KILL, kill_wait),
    ]
    order = [s.rung for s in steps]
    steps = steps[order.index(start) :]
    total = sum(s.wait for s in steps)
    if budget is not None and total > budget > 0:
        scale = budget / total
        steps = [LadderStep(s.rung, s.wait * scale) for s in steps]
    return tuple(steps)


class LadderWalk:
    """Walks a shutdown ladder one `poll` at a time (never waits itself). Each rung's action is
    returned once for the caller to perform; the walk moves on when its wait has passed.
    `ended_by` records the rung that ended the process (None: it exited on its own)."""

    def __init__(self, steps: Sequence[LadderStep], now: float):
        self.steps = tuple(steps)
        self.index = -1
        self.deadline = now
        self.done = False
        self.ended_by: Rung | None = None
        self.survived = False  # still alive after the last rung's wait
        self.acted: list[Rung] = []  # the rungs acted on, in order

    @property
    def rung(self) -> Rung | None:
        return self.steps[self.index].rung if self.index >= 0 else None

    def jump(self, rung: Rung, now: float) -> None:
        """Act on `rung` now instead of the current one (the caller performs it); the walk
        then waits that rung's wait."""
        for index, step in enumerate(self.steps):
            if step.rung is rung:
                self.index = index
                self.deadline = now + step.wait
                if self.acted:
                    self.acted[-1] = rung
                return

    def poll(self, now: float, exited: bool) -> Rung | None:
        """The rung to act on now, or None. Call again until `done`."""
        if self.done:
            return None
        if exited:
            self.done = True
            self.ended_by = self.rung
            return None
        if now < self.deadline:
            return None
        self.index += 1
        if self.index >= len(self.steps):
            self.done = True
            self.survived = True
            return None
        self.deadline = now + self.steps[self.index].wait
        self.acted.append(self.steps[self.index].rung)
        return self.steps[self.index].rung
