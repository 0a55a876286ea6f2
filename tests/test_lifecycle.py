"""The supervisor's pure decisions: state table, respawn policy, storm guard, shutdown ladder.
Driven by a fake clock (plain numbers); nothing here sleeps or spawns."""

from __future__ import annotations

import signal

import pytest

from backend.supervision.lifecycle import (
    CAUSES,
    TRANSITIONS,
    Cause,
    LadderWalk,
    Lifecycle,
    Rung,
    SupervisorState,
    TransitionError,
    Trigger,
    after_job,
    classify_exit,
    liveness,
    paused,
    rung_for,
    shutdown_ladder,
    storm,
)

S, T = SupervisorState, Trigger


def test_a_normal_life_walks_the_table():
    lc = Lifecycle(now=0.0)
    assert lc.state is S.STOPPED
    for step, (trigger, expected) in enumerate(
        [
            (T.START, S.STARTING),
            (T.CONNECTED, S.LOADING),
            (T.LOADED, S.READY),
            (T.JOB_STARTED, S.BUSY),
            (T.JOB_ENDED, S.READY),
            (T.RESPAWN, S.RESTARTING),
            (T.START, S.STARTING),
            (T.LOADED, S.READY),
            (T.STOP, S.STOPPED),
        ]
    ):
        lc.fire(trigger, f"step {step}", now=float(step))
        assert lc.state is expected
        assert lc.reason == f"step {step}"
    assert [t.target for t in lc.history][-2:] == [S.READY, S.STOPPED]


def test_illegal_trigger_names_state_and_trigger():
    lc = Lifecycle(now=0.0)
    with pytest.raises(TransitionError) as info:
        lc.fire(T.JOB_STARTED, "no backend", now=1.0)
    assert "job_started" in str(info.value) and "stopped" in str(info.value)
    assert lc.state is S.STOPPED  # unchanged


def test_dead_is_sticky_except_start_and_stop():
    leaving = {trigger for (state, trigger) in TRANSITIONS if state is S.DEAD}
    assert leaving == {T.START, T.STOP}
    lc = Lifecycle(now=0.0)
    lc.fire(T.START, "go", 0.0)
    lc.fire(T.GIVE_UP, "engine failed", 1.0)
    assert lc.state is S.DEAD and lc.reason == "engine failed"
    for trigger in (T.LOADED, T.RESPAWN, T.JOB_STARTED):
        with pytest.raises(TransitionError):
            lc.fire(trigger, "x", 2.0)


def test_every_live_state_can_respawn_give_up_and_stop():
    for state in (S.STARTING, S.LOADING, S.READY, S.BUSY):
        for trigger in (T.RESPAWN, T.GIVE_UP, T.STOP):
            assert (state, trigger) in TRANSITIONS


def test_a_standby_takeover_goes_from_restarting_to_ready():
    assert TRANSITIONS[(S.RESTARTING, T.LOADED)] is S.READY


@pytest.mark.parametrize(
    "code, cause, words",
    [
        (75, Cause.POISONED, "poisoned"),
        (-signal.SIGKILL, Cause.CRASH, "SIGKILL"),
        (-signal.SIGSEGV, Cause.CRASH, "SIGSEGV"),
        (1, Cause.CRASH, "code 1"),
        (0, Cause.CRASH, "code 0"),  # nobody asked it to stop
    ],
)
def test_classify_exit(code, cause, words):
    got, text = classify_exit(code, poisoned_code=75)
    assert got is cause and words in text


def test_crashes_count_towards_the_storm_and_policy_restarts_do_not():
    unplanned = {c for c, rule in CAUSES.items() if not rule.planned}
    assert unplanned == {Cause.CRASH, Cause.POISONED, Cause.MISSED_HEARTBEATS, Cause.WATCHDOG}
    assert CAUSES[Cause.MISSED_HEARTBEATS].first_rung is Rung.TERMINATE  # cannot answer
    assert CAUSES[Cause.USER].first_rung is Rung.REQUEST


def test_liveness_heartbeat_and_watchdog():
    kwargs = {"heartbeat_timeout": 5.0, "job_watchdog": 60.0}
    assert liveness(now=104.9, last_seen=100.0, job_started_at=None, **kwargs) is None
    cause, text = liveness(now=105.1, last_seen=100.0, job_started_at=None, **kwargs)
    assert cause is Cause.MISSED_HEARTBEATS and "5.1 s" in text
    assert liveness(now=159.0, last_seen=158.5, job_started_at=100.0, **kwargs) is None
    cause, _ = liveness(now=161.0, last_seen=160.5, job_started_at=100.0, **kwargs)
    assert cause is Cause.WATCHDOG
    no_watchdog = {"heartbeat_timeout": 5.0, "job_watchdog": None}
    assert liveness(now=1e6, last_seen=1e6, job_started_at=0.0, **no_watchdog) is None


def test_a_job_may_keep_the_backend_silent_longer():
    """Native calls in a job hold the GIL, so heartbeats pause; idle silence stays short."""
    kwargs = {"heartbeat_timeout": 5.0, "job_watchdog": 600.0, "busy_heartbeat_timeout": 120.0}
    assert liveness(now=160.0, last_seen=100.0, job_started_at=90.0, **kwargs) is None
    cause, text = liveness(now=221.0, last_seen=100.0, job_started_at=90.0, **kwargs)
    assert cause is Cause.MISSED_HEARTBEATS and "121.0 s" in text
    cause, _ = liveness(now=106.0, last_seen=100.0, job_started_at=None, **kwargs)
    assert cause is Cause.MISSED_HEARTBEATS


def _policy(**overrides):
    base = {
        "after_failure": True,
        "after_degraded": False,
        "every_n_jobs": None,
        "fresh_per_job": False,
    }
    return {**base, **overrides}


@pytest.mark.parametrize(
    "outcome, degraded, n, policy, expected",
    [
        ("done", False, 1, _policy(), None),
        ("failed", False, 1, _policy(), Cause.AFTER_FAILURE),
        ("failed", False, 1, _policy(after_failure=False), None),
        ("done", True, 1, _policy(), None),
        ("done", True, 1, _policy(after_degraded=True), Cause.AFTER_DEGRADED),
        ("done", False, 2, _policy(every_n_jobs=3), None),
        ("done", False, 3, _policy(every_n_jobs=3), Cause.EVERY_N_JOBS),
        ("done", False, 1, _policy(fresh_per_job=True), Cause.FRESH_PER_JOB),
        ("cancelled", False, 9, _policy(fresh_per_job=True, every_n_jobs=1), None),
    ],
)
def test_after_job_policy(outcome, degraded, n, policy, expected):
    decision = after_job(outcome=outcome, degraded=degraded, jobs_on_backend=n, **policy)
    assert (decision[0] if decision else None) is expected


def test_storm_guard_allows_limit_restarts_within_the_window():
    history: list[float] = []
    now = 1000.0
    for _ in range(5):  # five restarts 10 s apart are allowed
        assert storm(history, now, limit=5, window=120.0) is None
        history.append(now)
        now += 10.0
    refusal = storm(history, now, limit=5, window=120.0)
    assert refusal is not None and "5 automatic restarts within 120 s" in refusal
    # once the oldest restarts leave the window, restarting is allowed again
    assert storm(history, history[0] + 120.0, limit=5, window=120.0) is None


def test_storm_guard_ignores_old_restarts():
    assert storm([0.0, 1.0, 2.0, 3.0, 4.0], now=500.0, limit=5, window=120.0) is None


def test_ladder_rungs_start_and_budget():
    full = shutdown_ladder(20.0, 10.0, 5.0)
    assert [s.rung for s in full] == [Rung.REQUEST, Rung.TERMINATE, Rung.KILL]
    assert [s.rung for s in shutdown_ladder(20.0, 10.0, 5.0, start=Rung.TERMINATE)] == [
        Rung.TERMINATE,
        Rung.KILL,
    ]
    squeezed = shutdown_ladder(20.0, 10.0, 5.0, budget=7.0)
    assert sum(s.wait for s in squeezed) == pytest.approx(7.0)
    assert squeezed[0].wait > squeezed[1].wait > squeezed[2].wait


def test_ladder_walk_records_the_rung_that_ended_the_process():
    walk = LadderWalk(shutdown_ladder(20.0, 10.0, 5.0), now=0.0)
    assert walk.poll(0.0, exited=False) is Rung.REQUEST
    assert walk.poll(19.9, exited=False) is None  # still waiting for the request
    assert walk.poll(20.0, exited=False) is Rung.TERMINATE
    assert walk.poll(25.0, exited=True) is None
    assert walk.done and walk.ended_by is Rung.TERMINATE and not walk.survived


def test_ladder_walk_that_the_process_survives():
    walk = LadderWalk(shutdown_ladder(1.0, 1.0, 1.0, start=Rung.TERMINATE), now=0.0)
    actions = [walk.poll(t, exited=False) for t in (0.0, 0.5, 1.0, 1.5, 2.0)]
    assert actions == [Rung.TERMINATE, None, Rung.KILL, None, None]
    assert walk.done and walk.survived and walk.ended_by is None


def test_ladder_walk_when_the_process_is_already_gone():
    walk = LadderWalk(shutdown_ladder(1.0, 1.0, 1.0), now=0.0)
    assert walk.poll(0.0, exited=True) is None
    assert walk.done and walk.ended_by is None


def test_a_stopped_process_goes_straight_to_kill():
    assert rung_for(Rung.TERMINATE, stopped=True) is Rung.KILL
    assert rung_for(Rung.REQUEST, stopped=True) is Rung.KILL
    assert rung_for(Rung.TERMINATE, stopped=False) is Rung.TERMINATE
    walk = LadderWalk(shutdown_ladder(20.0, 10.0, 5.0, start=Rung.TERMINATE), now=0.0)
    assert walk.poll(0.0, exited=False) is Rung.TERMINATE
    walk.jump(Rung.KILL, now=0.0)  # the supervisor saw T state: SIGKILL instead of SIGTERM
    assert walk.acted == [Rung.KILL]
    assert walk.poll(4.9, exited=False) is None  # the kill rung's wait, not terminate's 10 s
    assert walk.poll(5.0, exited=True) is None
    assert walk.done and walk.ended_by is Rung.KILL


def test_a_pause_of_the_supervisor_is_told_from_a_tick_gap():
    assert not paused(0.05, heartbeat_timeout=5.0)
    assert not paused(2.0, heartbeat_timeout=5.0)
    assert paused(2.6, heartbeat_timeout=5.0)  # half the timeout without a tick
    assert paused(1.1, heartbeat_timeout=1.0)  # never below a second
    assert not paused(0.9, heartbeat_timeout=1.0)
