"""JSON-lines stats (one line per attempt, per job, per engine load) and their aggregates."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import Counter, OrderedDict
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
            value = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            bad += 1
            continue
        if isinstance(value, dict) and isinstance(value.get("kind"), str):
            records.append(value)
        else:
            bad += 1
    return records, bad


def _no_constant(name: str) -> Any:
    raise ValueError(name)  # NaN and Infinity: a line no client could be sent


def _number(value: Any) -> float | int | None:
    """A finite number from a line, else None: a line another program wrote counts as far
    as it is sound, never breaks the figures."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def _whole(value: Any, default: int) -> int:
    number = _number(value)
    return int(number) if number is not None else default


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
    return _figures(jobs, attempts, ready)


def _figures(
    jobs: list[dict[str, Any]], attempts: list[dict[str, Any]], ready: list[dict[str, Any]]
) -> dict[str, Any]:
    """The aggregate of the job lines (one per job, in the order of their last line), the
    attempt lines and the ready lines, each in file order."""
    finished = [j for j in jobs if j.get("outcome") in ("done", "failed")]
    done = [j for j in jobs if j.get("outcome") == "done"]
    seconds = [x for x in (_number(j.get("seconds")) for j in done) if x is not None]
    retries = [max(0, _whole(j.get("attempts"), 1) - 1) for j in finished]
    peaks = [x for x in (_number(a.get("vram_peak")) for a in attempts) if x is not None]
    ready_s = [x for x in (_number(r.get("seconds")) for r in ready) if x is not None]
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
            str(k): v for k, v in sorted(Counter(_whole(j.get("level"), 0) for j in done).items())
        },
        "mean_retries": _mean([float(r) for r in retries]),
        "attempts": len(attempts),
        "oom_attempts": sum(1 for a in attempts if a.get("outcome") == "oom"),
        "vram_peak_max": max(peaks) if peaks else None,
        "vram_peak_mean": _mean([float(p) for p in peaks]),
        "time_to_ready_mean": _mean(ready_s),
        "time_to_ready_last": ready_s[-1] if ready_s else None,
    }


# What `aggregate` reads of each kind of line: a tally keeps only these.
_KEPT = {
    "job": ("outcome", "seconds", "attempts", "error_code", "level"),
    "attempt": ("outcome", "vram_peak"),
    "ready": ("seconds",),
}
_MARK_BYTES = 256  # the last bytes read, compared on the next read: a rewritten file is re-read


class StatsTally:
    """`aggregate` of a stats log for a reader that asks often (the reader process's `stats`):
    each call reads only what was appended since the last one (from the offset it had reached)
    and keeps of each line what the aggregate reads. A file that was replaced, truncated or
    whose bytes before that offset changed (rotated, rewritten) is read again from the start.
    The figures are `aggregate(StatsLog(path).read())`'s, line for line: lines are parsed as
    `parse_lines` parses them and a last line without its newline yet counts as it would
    there, without being consumed. Not thread-safe (one reader)."""

    def __init__(self, path: str | Path):
        self.path = Path(os.fsdecode(path))
        self.full_reads = 0  # reads from the start (the first, and after a rotation)
        self._reset()

    def _reset(self) -> None:
        self._offset = 0  # bytes consumed: complete lines only
        self._identity: tuple[int, int] | None = None
        self._mark = b""  # the last consumed bytes
        self._tail = b""  # after the last newline: a line still being written
        self._jobs: OrderedDict[Any, dict[str, Any]] = OrderedDict()  # in last-line order
        self._attempts: list[dict[str, Any]] = []
        self._ready: list[dict[str, Any]] = []
        self._lines = 0
        self._cached: dict[str, Any] | None = None

    def aggregate(self) -> dict[str, Any]:
        self._refresh()
        if self._tail:
            tail, _ = parse_lines(self._tail)
            if tail:  # counted as `aggregate` would, kept out of the tally
                jobs, attempts, ready = OrderedDict(self._jobs), [*self._attempts], [*self._ready]
                lines = self._lines
                for record in tail:
                    lines = _fold(record, jobs, attempts, ready, lines)
                return _figures(list(jobs.values()), attempts, ready)
        if self._cached is None:
            self._cached = _figures(list(self._jobs.values()), self._attempts, self._ready)
        return self._cached

    def _refresh(self) -> None:
        data, st = self._read(self._offset - len(self._mark))
        if st is None:
            return
        identity = (st.st_dev, st.st_ino)
        if self._identity is not None and (
            identity != self._identity
            or st.st_size < self._offset
            or data[: len(self._mark)] != self._mark
        ):
            self._reset()
            data, st = self._read(0)
            if st is None:
                return
            identity = (st.st_dev, st.st_ino)
        if self._identity is None:
            self.full_reads += 1
        else:
            data = data[len(self._mark) :]
        self._identity = identity
        cut = data.rfind(b"\n") + 1
        self._tail = data[cut:]
        if not cut:
            return
        complete = data[:cut]
        records, _ = parse_lines(complete)
        for record in records:
            self._lines = _fold(record, self._jobs, self._attempts, self._ready, self._lines)
        self._offset += cut
        self._mark = (self._mark + complete)[-_MARK_BYTES:]
        self._cached = None

    def _read(self, offset: int) -> tuple[bytes, os.stat_result | None]:
        """(bytes from `offset`, the file's stat); a missing or unreadable file empties the
        tally (as `StatsLog.read` returns no lines) and gives (b"", None)."""
        try:
            with Folder.at(self.path.parent) as folder:
                return folder.read_from(self.path.name, offset)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("cannot read stats log %s: %s", self.path, exc)
            self._reset()
            return b"", None


def _fold(
    record: dict[str, Any],
    jobs: OrderedDict[Any, dict[str, Any]],
    attempts: list[dict[str, Any]],
    ready: list[dict[str, Any]],
    lines: int,
) -> int:
    """Add one parsed line to a tally; returns the count of job lines without an id so far
    (each counts on its own, as in `_once_per_job`)."""
    kind = record["kind"]
    kept = _KEPT.get(kind)
    if kept is None:
        return lines
    slim = {name: record[name] for name in kept if name in record}
    if kind == "job":
        job_id = record.get("job_id")
        if isinstance(job_id, str):
            jobs.pop(job_id, None)  # a job's last line counts, in its place in the file
            jobs[job_id] = slim
        else:
            jobs[(lines,)] = slim
            lines += 1
    elif kind == "attempt":
        attempts.append(slim)
    else:
        ready.append(slim)
    return lines
