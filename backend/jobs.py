"""On-disk job store: one folder per job, atomic writes; the single source of truth for history."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import BackendError, ErrorCode
from .files import atomic_write_bytes

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
RECORD = "job.json"
REQUEST = "request.json"
RESULT = "result.glb"
RESULT_TMP = "result.tmp.glb"
STATS = "stats.json"
THUMBNAIL = "thumbnail.png"
LOG = "log.txt"
INPUT_STEM = "input"
MESH_STEM = "mesh"
LOG_EXCERPT_BYTES = 16_384


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

# (state, event) -> next state. Terminal states are sticky: no event leaves them.
TRANSITIONS: dict[tuple[JobState, str], JobState] = {
    (JobState.QUEUED, "start"): JobState.RUNNING,
    (JobState.QUEUED, "cancel"): JobState.CANCELLED,
    (JobState.QUEUED, "fail"): JobState.FAILED,
    (JobState.RUNNING, "finish"): JobState.DONE,
    (JobState.RUNNING, "fail"): JobState.FAILED,
    (JobState.RUNNING, "cancel"): JobState.CANCELLED,
    # The backend stopped or died while the job ran; a fresh backend runs it again.
    (JobState.RUNNING, "requeue"): JobState.QUEUED,
}


@dataclass
class JobRecord:
    id: str
    kind: str  # generate | reexport | texture
    state: JobState
    engine: str
    params: dict[str, Any]
    filename: str = ""
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    parent: str | None = None  # the job a reexport starts from
    recoveries: int = 0  # times the job was requeued after its backend died
    attempts: int = 0
    level: int | None = None
    final_params: dict[str, Any] | None = None
    result: dict[str, Any] | None = None  # glb path, mesh stats, warnings, degradation
    error: dict[str, Any] | None = None  # code, message, hint, retryable
    backend_pid: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        values["state"] = JobState(values["state"])
        return cls(**values)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


_FIELD_TYPES = {"kind": str, "engine": str, "params": dict, "filename": str, "recoveries": int}
_OPTIONAL_DICTS = ("final_params", "result", "error")


def _checked(record: JobRecord) -> JobRecord:
    """A record read from disk, with the types the server relies on (else TypeError)."""
    for name, kind in _FIELD_TYPES.items():
        if not isinstance(getattr(record, name), kind):
            raise TypeError(f"{name} is not a {kind.__name__}")
    for name in _OPTIONAL_DICTS:
        if getattr(record, name) is not None and not isinstance(getattr(record, name), dict):
            raise TypeError(f"{name} is not an object")
    return record


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))


def _disk_error(exc: OSError, what: str) -> BackendError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BackendError(ErrorCode.DISK_FULL, f"disk full while writing {what}")
    return BackendError(ErrorCode.INTERNAL, f"cannot write {what}: {exc}")


class JobStore:
    """Job folders under `root/jobs`. Thread-safe; every state change is written at once."""

    def __init__(self, root: str | Path, clock: Callable[[], float] = time.time):
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._lock = threading.RLock()

    # -- paths -----------------------------------------------------------------------

    def folder(self, job_id: str) -> Path:
        """The job's folder. Ids are checked so no request can point outside the store."""
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise BackendError(ErrorCode.NOT_FOUND, f"invalid job id {job_id!r}")
        return self.jobs_dir / job_id

    def path(self, job_id: str, name: str) -> Path:
        return self.folder(job_id) / name

    def input_path(self, job_id: str, stem: str = INPUT_STEM) -> Path | None:
        for candidate in sorted(self.folder(job_id).glob(f"{stem}.*")):
            return candidate
        return None

    # -- create / read ---------------------------------------------------------------

    def new_id(self) -> str:
        stamp = datetime.fromtimestamp(self.clock(), tz=timezone.utc).strftime("%Y%m%d-%H%M%S")
        return f"{stamp}-{secrets.token_hex(3)}"

    def create(
        self,
        kind: str,
        engine: str,
        params: dict[str, Any],
        *,
        image: bytes | None = None,
        image_ext: str = "png",
        filename: str = "",
        thumbnail: bytes | None = None,
        mesh: bytes | None = None,
        mesh_ext: str = "glb",
        parent: str | None = None,
    ) -> JobRecord:
        with self._lock:
            job_id = self.new_id()
            while (self.jobs_dir / job_id).exists():
                job_id = self.new_id()
            folder = self.jobs_dir / job_id
            record = JobRecord(
                id=job_id,
                kind=kind,
                state=JobState.QUEUED,
                engine=engine,
                params=params,
                filename=filename,
                created=self.clock(),
                parent=parent,
            )
            try:
                folder.mkdir(parents=True)
                if image is not None:
                    atomic_write_bytes(folder / f"{INPUT_STEM}.{image_ext}", image)
                if mesh is not None:
                    atomic_write_bytes(folder / f"{MESH_STEM}.{mesh_ext}", mesh)
                if thumbnail is not None:
                    atomic_write_bytes(folder / THUMBNAIL, thumbnail)
                request = {
                    "kind": kind,
                    "engine": engine,
                    "params": params,
                    "filename": filename,
                    "parent": parent,
                }
                atomic_write_json(folder / REQUEST, request)
                self._save(record)
            except OSError as exc:
                _remove_tree(folder)
                raise _disk_error(exc, f"job {job_id}") from None
            return record

    def get(self, job_id: str) -> JobRecord:
        folder = self.folder(job_id)
        try:
            data = json.loads((folder / RECORD).read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("id") != job_id:
                raise ValueError("not this job's record")  # a foreign id would escape the store
            return _checked(JobRecord.from_dict(data))
        except FileNotFoundError:
            raise BackendError(ErrorCode.NOT_FOUND, f"no job {job_id}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BackendError(ErrorCode.NOT_FOUND, f"job {job_id} is unreadable: {exc}") from None

    def list(self, limit: int | None = None) -> tuple[list[JobRecord], list[str]]:
        """Newest first. Corrupt folders are skipped and reported as warnings."""
        records: list[JobRecord] = []
        warnings: list[str] = []
        names = sorted((p.name for p in self.jobs_dir.iterdir() if p.is_dir()), reverse=True)
        for name in names:
            if not JOB_ID.match(name):
                continue
            try:
                records.append(self.get(name))
            except BackendError as exc:
                warnings.append(f"skipped {name}: {exc.message}")
                log.warning("skipping corrupt job folder %s: %s", name, exc.message)
            if limit is not None and len(records) >= limit:
                break
        records.sort(key=lambda r: (r.created, r.id), reverse=True)  # ids share seconds
        return records, warnings

    def unfinished(self) -> list[JobRecord]:
        """Jobs left queued or running (oldest first): work to recover after a restart."""
        records, _ = self.list()
        return sorted((r for r in records if not r.terminal), key=lambda r: r.created)

    # -- change ----------------------------------------------------------------------

    def transition(self, job_id: str, event: str, **fields: Any) -> JobRecord:
        with self._lock:
            record = self.get(job_id)
            target = TRANSITIONS.get((record.state, event))
            if target is None:
                raise BackendError(
                    ErrorCode.BAD_MESSAGE,
                    f"job {job_id} is {record.state.value}; cannot {event}",
                )
            record.state = target
            now = self.clock()
            if target is JobState.RUNNING:
                record.started = now
            if target in TERMINAL:
                record.finished = now
            for name, value in fields.items():
                setattr(record, name, value)
            self._save(record)
            return record

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        with self._lock:
            record = self.get(job_id)
            for name, value in fields.items():
                setattr(record, name, value)
            self._save(record)
            return record

    def write_json(self, job_id: str, name: str, data: Any) -> None:
        try:
            atomic_write_json(self.path(job_id, name), data)
        except OSError as exc:
            raise _disk_error(exc, name) from None

    def publish_result(self, job_id: str, tmp_path: Path) -> Path:
        """Move a validated GLB into place; only validated files ever become result.glb."""
        final = self.path(job_id, RESULT)
        os.replace(tmp_path, final)
        return final

    def append_log(self, job_id: str, text: str) -> None:
        """Keep a bounded log excerpt per job (the newest LOG_EXCERPT_BYTES)."""
        path = self.path(job_id, LOG)
        stamp = datetime.fromtimestamp(self.clock(), tz=timezone.utc).strftime("%H:%M:%S")
        line = f"{stamp} {text.rstrip()}\n".encode("utf-8", "replace")
        with self._lock:
            try:
                old = path.read_bytes() if path.exists() else b""
                data = (old + line)[-LOG_EXCERPT_BYTES:]
                atomic_write_bytes(path, data)
            except OSError:
                log.warning("cannot write log for job %s", job_id)

    def log_excerpt(self, job_id: str) -> str:
        try:
            return self.path(job_id, LOG).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _save(self, record: JobRecord) -> None:
        atomic_write_json(self.jobs_dir / record.id / RECORD, record.to_dict())


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
