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

from .. import __version__
from ..safefs import Folder, read_file

log = logging.getLogger(__name__)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


class StatsLog:
    """Append-only JSON lines in the state folder, which is made 0700 and is never a link;
    the file is 0600 and never a link either. A full disk loses a stats line, never a job."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time):
        self.path = Path(os.fsdecode(path))
        self.clock = clock
        self._lock = threading.Lock()

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"kind": kind, "ts": _iso(self.clock()), "version": __version__, **fields}
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                with Folder.at(self.path.parent, create=True) as folder:
                    folder.append(self.path.name, line.encode("utf-8"))
            except OSError as exc:
                log.warning("cannot append to stats log %s: %s", self.path, exc)
        return record

    def read(self) -> list[dict[str, Any]]:
        try:
            with Folder.at(self.path.parent) as folder:
                data = folder.read(self.path.name)
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot read stats log %s: %s", self.path, exc)
            return []
        return parse_lines(data)[0]


def read_lines(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Parse a stats file (never through a link); returns (records, malformed lines)."""
    try:
        data = read_file(path)
    except FileNotFoundError:
        return [], 0
    return parse_lines(data)


def parse_lines(data: bytes) -> tuple[list[dict[str, Any]], int]:
    records: list[dict[str, Any]] = []
    bad = 0
    text = data.decode("utf-8", errors="replace")
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


def _once_per_job(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per job (the last): a job recorded twice (a crash between its stats line and
    its record, two backends on one folder in older versions) counts once."""
    last: dict[Any, int] = {}
    for index, line in enumerate(lines):
        job_id = line.get("job_id")
        last[job_id if isinstance(job_id, str) else index] = index
    return [lines[i] for i in sorted(last.values())]


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
    jobs = _once_per_job([r for r in records if r.get("kind") == "job"])
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
