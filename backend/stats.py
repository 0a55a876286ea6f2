"""JSON-lines stats (one line per attempt, per job, per engine load) and their aggregates."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__

log = logging.getLogger(__name__)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


class StatsLog:
    """Append-only JSON lines. A full disk loses a stats line, never a job."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._lock = threading.Lock()

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"kind": kind, "ts": _iso(self.clock()), "version": __version__, **fields}
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                log.warning("cannot append to stats log %s: %s", self.path, exc)
        return record

    def read(self) -> list[dict[str, Any]]:
        return read_lines(self.path)[0]


def read_lines(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Parse a stats file; returns (records, number of malformed lines skipped)."""
    records: list[dict[str, Any]] = []
    bad = 0
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(value, dict) and isinstance(value.get("kind"), str):
            records.append(value)
        else:
            bad += 1
    return records, bad


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Success rate, time per generation (mean, p50, p95), failures by code, ladder levels,
    retries per job, VRAM peaks and time to ready."""
    records = list(records)
    jobs = [r for r in records if r.get("kind") == "job"]
    attempts = [r for r in records if r.get("kind") == "attempt"]
    ready = [r for r in records if r.get("kind") == "ready"]
    finished = [j for j in jobs if j.get("outcome") in ("done", "failed")]
    done = [j for j in jobs if j.get("outcome") == "done"]
    seconds = [float(j["seconds"]) for j in done if isinstance(j.get("seconds"), (int, float))]
    retries = [max(0, int(j.get("attempts") or 1) - 1) for j in finished]
    peaks = [a["vram_peak"] for a in attempts if isinstance(a.get("vram_peak"), (int, float))]
    ready_s = [float(r["seconds"]) for r in ready if isinstance(r.get("seconds"), (int, float))]
    outcomes = Counter(str(j.get("outcome")) for j in jobs)
    return {
        "jobs": len(jobs),
        "outcomes": dict(outcomes),
        "success_rate": (len(done) / len(finished)) if finished else None,
        "seconds_mean": _mean(seconds),
        "seconds_p50": percentile(seconds, 50),
        "seconds_p95": percentile(seconds, 95),
        "failures_by_code": dict(
            Counter(str(j.get("error_code")) for j in jobs if j.get("outcome") == "failed")
        ),
        "level_distribution": {
            str(k): v for k, v in sorted(Counter(int(j.get("level") or 0) for j in done).items())
        },
        "mean_retries": _mean([float(r) for r in retries]),
        "attempts": len(attempts),
        "oom_attempts": sum(1 for a in attempts if a.get("outcome") == "oom"),
        "vram_peak_max": max(peaks) if peaks else None,
        "vram_peak_mean": _mean([float(p) for p in peaks]),
        "time_to_ready_mean": _mean(ready_s),
        "time_to_ready_last": ready_s[-1] if ready_s else None,
    }
