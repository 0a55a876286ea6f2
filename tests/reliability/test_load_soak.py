"""Load and soak: several clients submit jobs to one backend process faster than it runs them.
The queue limit answers `busy` (clients retry), nothing deadlocks, every accepted job ends
exactly once, and the backend's memory does not grow."""

from __future__ import annotations

import threading
import time
from collections import Counter

from backend.errors import BackendError, ErrorCode
from backend.wire.client import TERMINAL_EVENTS, Client
from tests.conftest import png_bytes
from tests.reliability.support import WAIT, record, rss_bytes, scale

CLIENTS = 4
IN_FLIGHT = 3  # per client: 4 x 3 offered > queue depth, so `busy` must happen
QUEUE_DEPTH = 4
RSS_LIMIT = 50 * 2**20


class Worker(threading.Thread):
    """One client: keeps IN_FLIGHT jobs going, retries after `busy`, collects terminal events."""

    def __init__(self, info, index: int, jobs: int, deadline: float):
        super().__init__(name=f"client-{index}", daemon=True)
        self.info = info
        self.index = index
        self.jobs = jobs
        self.deadline = deadline
        self.accepted: list[str] = []
        self.terminal: Counter[str] = Counter()  # job id -> terminal events seen
        self.outcome: dict[str, str] = {}
        self.busy = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _run(self) -> None:
        images = [png_bytes((64 + 8 * (i % 9), 64 + 8 * (i % 7))) for i in range(8)]
        with Client(self.info) as client:
            time.sleep(0.2)  # let SUB connect before the first job starts
            pending: set[str] = set()
            while len(self.accepted) < self.jobs or pending:
                assert time.monotonic() < self.deadline, "load test deadlocked or stalled"
                if len(self.accepted) < self.jobs and len(pending) < IN_FLIGHT:
                    image = images[len(self.accepted) % len(images)]
                    try:
                        job_id = client.generate(image, {"preset": "fast"}, timeout=WAIT)
                    except BackendError as err:
                        assert err.code is ErrorCode.BUSY and err.retryable, err
                        self.busy += 1
                        time.sleep(0.02)
                    else:
                        self.accepted.append(job_id)
                        pending.add(job_id)
                for message in client.poll(0.01):
                    job_id = message.content.get("job_id")
                    if message.msg_type in TERMINAL_EVENTS and job_id in pending | set(
                        self.outcome
                    ):
                        self.terminal[job_id] += 1
                        self.outcome[job_id] = message.msg_type
                        pending.discard(job_id)
                if pending and not client.poll(0):  # PUB/SUB may drop: ask the store
                    for job_id in list(pending)[:1]:
                        state = client.job(job_id, timeout=WAIT)["job"]["state"]
                        if state in ("done", "failed", "cancelled"):
                            self.outcome[job_id] = f"job_{state}"
                            pending.discard(job_id)
            end = time.monotonic() + 0.5  # late duplicates would show up here
            while time.monotonic() < end:
                for message in client.poll(0.05):
                    job_id = message.content.get("job_id")
                    if message.msg_type in TERMINAL_EVENTS and job_id in self.outcome:
                        self.terminal[job_id] += 1


def test_clients_times_jobs_with_the_preview_engine(backend_proc):
    per_client = scale(10, 250)
    b = backend_proc("preview", "--queue-depth", str(QUEUE_DEPTH))
    warm = b.client.generate(png_bytes((96, 96)), {"preset": "fast"})  # imports, caches
    assert b.client.wait_for_job(warm, WAIT)["event"] == "job_done"
    rss_start = rss_bytes(b.pid)
    rss_peak = rss_start
    began = time.monotonic()
    deadline = began + scale(120, 900)
    workers = [Worker(b.info, i, per_client, deadline) for i in range(CLIENTS)]
    for w in workers:
        w.start()
    ping_worst = 0.0
    samples: list[tuple[int, float]] = []
    next_sample = began
    while any(w.is_alive() for w in workers):
        t = time.monotonic()
        assert b.client.ping(timeout=WAIT)["pong"] is True  # the control loop stays responsive
        ping_worst = max(ping_worst, time.monotonic() - t)
        rss_now = rss_bytes(b.pid)
        rss_peak = max(rss_peak, rss_now)
        if time.monotonic() >= next_sample:
            next_sample += 10.0
            samples.append((round(time.monotonic() - began), round(rss_now / 2**20, 1)))
        time.sleep(0.25)
        assert time.monotonic() < deadline + 5, "clients did not finish"
    seconds = time.monotonic() - began
    for w in workers:
        w.join(5)
        assert w.error is None, f"{w.name}: {w.error!r}"
    rss_end = rss_bytes(b.pid)

    accepted = [j for w in workers for j in w.accepted]
    assert len(accepted) == CLIENTS * per_client and len(set(accepted)) == len(accepted)
    duplicates = {j: n for w in workers for j, n in w.terminal.items() if n > 1}
    assert duplicates == {}  # never two outcomes for one job
    outcomes = Counter(o for w in workers for o in w.outcome.values())
    assert sum(outcomes.values()) == len(accepted)
    history = b.client.jobs(limit=10_000)["jobs"]
    on_disk = {j["job_id"]: j["state"] for j in history}
    assert set(on_disk) == set(accepted) | {warm}  # every accepted job has one folder
    assert Counter(on_disk.values()) == Counter({"done": len(accepted) + 1}), Counter(
        on_disk.values()
    )
    status = b.client.status()
    assert status["queue"] == [] and status["running"] == []
    busy = sum(w.busy for w in workers)
    assert busy > 0  # the queue limit was reached and enforced
    growth = rss_end - rss_start
    assert b.stop() == 0
    record(
        "load",
        {
            "clients": CLIENTS,
            "jobs_per_client": per_client,
            "queue_depth": QUEUE_DEPTH,
            "offered_in_flight": CLIENTS * IN_FLIGHT,
            "accepted": len(accepted),
            "busy_replies": busy,
            "outcomes": dict(outcomes),
            "terminal_events_seen": sum(sum(w.terminal.values()) for w in workers),
            "duplicates": 0,
            "lost": 0,
            "seconds": round(seconds, 1),
            "jobs_per_second": round(len(accepted) / seconds, 2),
            "ping_worst_ms": round(ping_worst * 1000, 1),
            "rss_start_mb": round(rss_start / 2**20, 1),
            "rss_end_mb": round(rss_end / 2**20, 1),
            "rss_peak_mb": round(rss_peak / 2**20, 1),
            "rss_growth_mb": round(growth / 2**20, 1),
            "rss_samples_s_mb": samples,
        },
    )
    assert growth < RSS_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB"
