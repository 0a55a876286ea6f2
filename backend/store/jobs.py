"""On-disk job store: one folder per job, atomic writes; the single source of truth for history."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from .. import settings
from ..errors import BackendError, ErrorCode, JobCancelled
from ..safefs import Folder, UnsafePath, is_link
from ..wire.protocol import JOB_ID
from .ownerlock import OutputLock, OutputLocked

log = logging.getLogger(__name__)

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
MAX_RECORD_BYTES = 4 << 20  # a job.json larger than this is not ours: skipped as corrupt
MAX_FILES_LISTED = 200  # `job` replies list at most this many files of a folder


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset(JobState(name) for name in settings.TERMINAL_STATES)

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
    # The user asked to cancel while it ran: a backend that dies first must not run it again.
    cancel_requested: bool = False
    idempotency_key: str | None = None  # the client's key: a resent request finds this job
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    def to_wire(self) -> dict[str, Any]:
        """The record as the protocol sends it: the id is `job_id`, as in every request,
        reply and event. (`id`, the name in job.json, is sent too until protocol 2.0: older
        add-ons read it.)"""
        data = self.to_dict()
        return {"job_id": self.id, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        values["state"] = JobState(values["state"])
        return cls(**values)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def may_run_again(self) -> bool:
        """A job whose backend (or worker) died or was poisoned while it ran runs once more,
        then fails: the one place this rule lives (the runner, the supervisor and the studio
        workers ask it)."""
        return self.recoveries < settings.MAX_RECOVERIES


def after_backend_died(
    record: JobRecord, why: str, hint: str | None = None
) -> tuple[str, dict[str, Any]]:
    """The transition (event, fields) of a job its backend left running when it died: the
    user's cancel stands; a job that already ran once more fails with `backend_died`; any
    other runs once more. The one place that rule branches (the supervisor applies it when
    no backend comes next, a new backend when it recovers the queue)."""
    if record.cancel_requested:
        return "cancel", {"error": JobCancelled().to_dict()}
    if not record.may_run_again:
        died = BackendError(
            ErrorCode.BACKEND_DIED, f"the backend died twice while running this job ({why})", hint
        )
        return "fail", {"error": died.to_dict()}
    return "requeue", {"recoveries": record.recoveries + 1}


def outcome_event(record: JobRecord) -> tuple[str, dict[str, Any]]:
    """A finished job's final event (`job_done`, `job_failed` or `job_cancelled`), built from
    its record: the one shape the local backend and the studio workers send
    (docs/protocol.md)."""
    state = record.state
    if state is JobState.DONE:
        result = record.result or {}
        content = {
            "job_id": record.id,
            "glb_path": result.get("glb_path"),
            "mesh_stats": result.get("mesh_stats"),
            "oom_quality_degradation_level": record.level or 0,
            "degraded": bool(record.level),
            "degraded_reason": result.get("degraded_reason"),
            "final_params": record.final_params,
            "warnings": result.get("warnings") or [],
            "seconds": result.get("seconds"),
        }
        if record.extra.get("worker"):
            content["worker"] = record.extra["worker"]
        return "job_done", content
    if state is JobState.FAILED:
        return "job_failed", {"job_id": record.id, **(record.error or {})}
    return "job_cancelled", {"job_id": record.id}


_FIELD_TYPES = {
    "kind": str,
    "engine": str,
    "params": dict,
    "filename": str,
    "cancel_requested": bool,
    "extra": dict,
}
_OPTIONAL_DICTS = ("final_params", "result", "error")


_OPTIONAL_STRINGS = ("parent", "idempotency_key")
_COUNTS = ("recoveries", "attempts")  # whole numbers from 0
_OPTIONAL_INTS = ("level", "backend_pid")
_OPTIONAL_TIMES = ("started", "finished")  # Unix seconds


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_time(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _checked(record: JobRecord) -> JobRecord:
    """A record read from disk, with every type the backend and its clients rely on (else
    TypeError): a record another program edited is a corrupt folder, skipped and reported,
    never a crash of whatever sorts, sums or sends it."""
    for name, kind in _FIELD_TYPES.items():
        if not isinstance(getattr(record, name), kind):
            raise TypeError(f"{name} is not a {kind.__name__}")
    for name in _OPTIONAL_DICTS:
        if getattr(record, name) is not None and not isinstance(getattr(record, name), dict):
            raise TypeError(f"{name} is not an object")
    for name in _OPTIONAL_STRINGS:
        if getattr(record, name) is not None and not isinstance(getattr(record, name), str):
            raise TypeError(f"{name} is not a str")
    for name in _COUNTS:
        if not _is_int(getattr(record, name)) or getattr(record, name) < 0:
            raise TypeError(f"{name} is not a whole number")
    for name in _OPTIONAL_INTS:
        if getattr(record, name) is not None and not _is_int(getattr(record, name)):
            raise TypeError(f"{name} is not an integer")
    if not _is_time(record.created):
        raise TypeError("created is not a time")
    for name in _OPTIONAL_TIMES:
        if getattr(record, name) is not None and not _is_time(getattr(record, name)):
            raise TypeError(f"{name} is not a time")
    return record


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: no client could decode them


def _dumps(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode("utf-8")


# A failure with these errors concerns the whole output folder, not one job: the store stops
# taking jobs until a probe write succeeds again (recover()).
_STORE_WIDE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_LINK_HINT = (
    "Something placed a link or another user's file in the output folder. The backend never "
    "follows links there; remove it, or choose another output folder."
)


def store_error(exc: BaseException, what: str) -> BackendError:
    """The typed error for a file operation on the job store that failed."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, UnsafePath):
        return BackendError(
            ErrorCode.OUTPUT_UNWRITABLE,
            f"cannot write {what}: {exc.strerror} {exc.filename}",
            _LINK_HINT,
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BackendError(ErrorCode.DISK_FULL, f"disk full while writing {what}")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return BackendError(ErrorCode.OUTPUT_UNWRITABLE, f"cannot write {what}: {reason}")


def _store_wide(exc: BaseException) -> bool:
    if isinstance(exc, OutputLocked):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, UnsafePath) and exc.errno in _STORE_WIDE


class JobStore:
    """Job folders under `root/jobs`. Thread-safe; every state change is written at once.

    Every file is reached through `safefs` (no symbolic link is ever followed; folders 0700,
    files 0600). A store given `locks` writes only while it holds them (`claim`). When the
    folder cannot be written (disk full, read-only, deleted, another owner) `problem` holds
    the typed error; jobs still end (`settle` keeps their outcome in memory and writes it once
    `recover` finds the folder usable again).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        clock: Callable[[], float] = time.time,
        locks: Sequence[OutputLock] = (),
    ):
        self.root = Path(os.fsdecode(root))
        self.jobs_dir = self.root / "jobs"
        self.clock = clock
        self.locks = tuple(locks)
        self._claimed = not self.locks
        self.problem: BackendError | None = None
        self._pending: dict[str, JobRecord] = {}  # outcomes not yet on disk
        self._lock = threading.RLock()

    # -- paths (no I/O) ----------------------------------------------------------------

    def folder(self, job_id: str) -> Path:
        """The job's folder. Ids are checked so no request can point outside the store."""
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise BackendError(ErrorCode.NOT_FOUND, f"invalid job id {job_id!r}")
        return self.jobs_dir / job_id

    def path(self, job_id: str, name: str) -> Path:
        return self.folder(job_id) / name

    # -- the folder: locks, health -------------------------------------------------------

    def claim(self) -> None:
        """Take the output folder's locks (a backend at start, a standby when activated).
        Raises OutputLocked when another process owns the folder; a folder that cannot hold a
        lock yet (read-only, full) leaves `problem` set until `recover` succeeds."""
        with self._lock:
            self._claimed = True
            try:
                self._writable()
            except OutputLocked:
                self._claimed = False
                raise
            except OSError as exc:
                self._note(exc, "the output folder")

    def release(self) -> None:
        for lock in self.locks:
            lock.release()

    def recover(self) -> bool:
        """Try the folder again: re-take the locks, write a probe, write the outcomes kept in
        memory. True (and `problem` cleared) when the store is usable."""
        with self._lock:
            try:
                self._writable()
                with self._jobs(create=True) as jobs:
                    jobs.write(".probe", b"")
                    jobs.remove(".probe")
                self._flush()
            except (OSError, BackendError) as exc:
                error = store_error(exc, f"the output folder {self.root}")
                if self.problem is None or self.problem.message != error.message:
                    log.warning("output folder still unusable: %s", error.message)
                self.problem = error
                return False
            if self.problem is not None:
                log.info("the output folder %s is usable again", self.root)
            self.problem = None
            return True

    def _writable(self) -> None:
        """Write only while holding the folder's locks; re-take a lock the folder lost (a
        deleted and remade output folder has a new, unlocked lock file)."""
        if not self._claimed:
            raise BackendError(
                ErrorCode.OUTPUT_LOCKED, "this process does not own the output folder"
            )
        for lock in self.locks:
            if not lock.current():
                lock.acquire()

    def _note(self, exc: BaseException, what: str) -> BackendError:
        """Classify a failed write; a folder-wide failure becomes the store's `problem`."""
        error = store_error(exc, f"{what} in {self.root}")
        if _store_wide(exc) and self.problem is None:
            log.warning("the output folder cannot be used: %s", error.message)
            self.problem = error
        return error

    def _jobs(self, create: bool = False) -> Folder:
        with Folder.root(self.root, create=create) as root:
            return root.sub("jobs", create=create)

    def _job_folder(self, job_id: str) -> Folder:
        self.folder(job_id)  # checks the id
        with self._jobs() as jobs:
            return jobs.sub(job_id)

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
        idempotency_key: str | None = None,
    ) -> JobRecord:
        with self._lock:
            try:
                self._writable()
                jobs = self._jobs(create=True)
            except (OSError, BackendError) as exc:
                raise self._note(exc, "a new job") from None
            with jobs:
                job_id = self._new_folder(jobs)
                record = JobRecord(
                    id=job_id,
                    kind=kind,
                    state=JobState.QUEUED,
                    engine=engine,
                    params=params,
                    filename=filename,
                    created=self.clock(),
                    parent=parent,
                    idempotency_key=idempotency_key,
                )
                request = {
                    "kind": kind,
                    "engine": engine,
                    "params": params,
                    "filename": filename,
                    "parent": parent,
                }
                try:
                    with jobs.sub(job_id) as folder:
                        if image is not None:
                            folder.write(f"{INPUT_STEM}.{image_ext}", image)
                        if mesh is not None:
                            folder.write(f"{MESH_STEM}.{mesh_ext}", mesh)
                        if thumbnail is not None:
                            folder.write(THUMBNAIL, thumbnail)
                        folder.write(REQUEST, _dumps(request))
                        folder.write(RECORD, _dumps(record.to_dict()))
                except OSError as exc:
                    try:
                        jobs.remove_tree(job_id)
                    except OSError:
                        pass
                    raise self._note(exc, f"job {job_id}") from None
            return record

    def _new_folder(self, jobs: Folder) -> str:
        while True:
            job_id = self.new_id()
            try:
                jobs.mkdir(job_id)
                return job_id
            except FileExistsError:
                continue  # taken (by a job, or by anything else at that name)
            except OSError as exc:
                raise self._note(exc, "a new job folder") from None

    def get(self, job_id: str) -> JobRecord:
        self.folder(job_id)  # checks the id
        with self._lock:
            pending = self._pending.get(job_id)
        if pending is not None:
            return replace(pending)
        try:
            with self._jobs() as jobs:
                return self._read(jobs, job_id)
        except FileNotFoundError:
            raise BackendError(ErrorCode.NOT_FOUND, f"no job {job_id}") from None
        except OSError as exc:
            raise BackendError(ErrorCode.NOT_FOUND, f"job {job_id} is unreadable: {exc}") from None

    def _read(self, jobs: Folder, job_id: str) -> JobRecord:
        """One record, through an open jobs folder. Raises BackendError(NOT_FOUND)."""
        try:
            with jobs.sub(job_id) as folder:
                raw = folder.read(RECORD, MAX_RECORD_BYTES + 1)
            if len(raw) > MAX_RECORD_BYTES:
                raise ValueError(f"{RECORD} is larger than {MAX_RECORD_BYTES} bytes")
            data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
            if not isinstance(data, dict) or data.get("id") != job_id:
                raise ValueError("not this job's record")  # a foreign id would escape the store
            return _checked(JobRecord.from_dict(data))
        except FileNotFoundError:
            raise BackendError(ErrorCode.NOT_FOUND, f"no job {job_id}") from None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise BackendError(ErrorCode.NOT_FOUND, f"job {job_id} is unreadable: {exc}") from None

    def list(self, limit: int | None = None) -> tuple[list[JobRecord], list[str]]:
        """Jobs newest first (at most `limit`). Corrupt folders and links are skipped and
        reported as warnings. Paging for clients is `server.handlers`' (`list_jobs`)."""
        records: list[JobRecord] = []
        warnings: list[str] = []
        try:
            jobs = self._jobs()
        except FileNotFoundError:
            return [], []
        except OSError as exc:
            return [], [f"cannot read {self.jobs_dir}: {exc}"]
        with jobs:
            try:
                entries = jobs.entries()
            except OSError as exc:
                return [], [f"cannot read {self.jobs_dir}: {exc}"]
            for name, st in sorted(
                ((name, st) for name, st in entries if JOB_ID.match(name)), reverse=True
            ):
                # Ids order by second only (the rest is random): read the whole second the
                # limit falls in, then keep the newest by creation time.
                if limit is not None and len(records) >= limit and name[:15] < records[-1].id[:15]:
                    break
                if not stat.S_ISDIR(st.st_mode):
                    warnings.append(f"skipped {name}: not a folder (a link is never followed)")
                    continue
                with self._lock:
                    pending = self._pending.get(name)
                try:
                    record = replace(pending) if pending else self._read(jobs, name)
                except BackendError as exc:
                    warnings.append(f"skipped {name}: {exc.message}")
                    log.warning("skipping corrupt job folder %s: %s", name, exc.message)
                    continue
                records.append(record)
        return _ordered(records)[:limit], warnings

    def unfinished(self) -> list[JobRecord]:
        """Jobs left queued or running (oldest first): work to recover after a restart."""
        records, _ = self.list()
        return sorted((r for r in records if not r.terminal), key=lambda r: r.created)

    # -- a job's files -------------------------------------------------------------------

    def input_path(self, job_id: str, stem: str = INPUT_STEM) -> Path | None:
        name = self._input_name(job_id, stem)
        return self.path(job_id, name) if name else None

    def _input_name(self, job_id: str, stem: str) -> str | None:
        try:
            with self._job_folder(job_id) as folder:
                entries = folder.entries()
        except OSError:
            return None
        for name, st in sorted(entries):
            if name.startswith(f"{stem}.") and stat.S_ISREG(st.st_mode):
                return name
        return None

    def read_input(
        self, job_id: str, stem: str = INPUT_STEM, limit: int | None = None
    ) -> tuple[str, bytes] | None:
        """(file name, bytes) of the job's input (`input.*` or `mesh.*`), never through a link,
        at most `limit` bytes of it (a caller that checks a size limit asks for one more)."""
        name = self._input_name(job_id, stem)
        data = self.read(job_id, name, limit) if name else None
        return (name, data) if name and data is not None else None

    def read(self, job_id: str, name: str, limit: int | None = None) -> bytes | None:
        """A file of the job's folder; None if it is missing, a link or unreadable."""
        try:
            with self._job_folder(job_id) as folder:
                return folder.read(name, limit)
        except OSError:
            return None

    def read_chunk(self, job_id: str, name: str, offset: int, length: int) -> tuple[bytes, int]:
        """(bytes, file size) of one regular file of a job's folder, no link followed.
        OSError (FileNotFoundError, UnsafePath) when it is missing or not a plain file."""
        with self._job_folder(job_id) as folder:
            return folder.read_at(name, offset, length)

    def files(self, job_id: str) -> dict[str, int]:
        """{name: bytes} of the regular files in a job's folder (links and temp files left
        out; at most MAX_FILES_LISTED)."""
        out: dict[str, int] = {}
        try:
            with self._job_folder(job_id) as folder:
                entries = folder.entries()
        except OSError:
            return out
        for name, st in sorted(entries):
            if name.startswith(".") or not stat.S_ISREG(st.st_mode):
                continue  # an atomic write's temp file, a link, a folder
            out[name] = st.st_size
            if len(out) >= MAX_FILES_LISTED:
                break
        return out

    def prepare(self, job_id: str, also: Sequence[str] = ()) -> Path:
        """Before a job runs: its folder (and `also`, e.g. a re-export's parent) must hold no
        link; a fresh empty result.tmp.glb (0600) is made for the engine to write, so a link
        planted at that name is never written through. Returns its path."""
        try:
            for job in (job_id, *also):
                with self._job_folder(job) as folder:
                    links = sorted(name for name, st in folder.entries() if is_link(st))
                if links:
                    raise BackendError(
                        ErrorCode.OUTPUT_UNWRITABLE,
                        f"job {job} holds a symbolic link ({', '.join(links[:5])}); "
                        "the backend never follows links, so it does not run this job",
                        _LINK_HINT,
                    )
            with self._job_folder(job_id) as folder:
                folder.fresh(RESULT_TMP)
        except OSError as exc:
            raise self._note(exc, f"job {job_id}") from None
        return self.path(job_id, RESULT_TMP)

    def discard_output(self, job_id: str) -> None:
        try:
            with self._job_folder(job_id) as folder:
                folder.remove(RESULT_TMP)
        except OSError:
            pass

    def check_output(self, job_id: str, path: Path) -> None:
        """The engine's GLB is the prepared result.tmp.glb, still a regular file."""
        if Path(path) != self.path(job_id, RESULT_TMP):
            raise BackendError(ErrorCode.INVALID_GLB, f"the engine wrote its GLB elsewhere: {path}")
        try:
            with self._job_folder(job_id) as folder:
                st = folder.lstat(RESULT_TMP)
        except OSError as exc:
            raise self._note(exc, f"job {job_id}") from None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise BackendError(
                ErrorCode.OUTPUT_UNWRITABLE,
                f"{RESULT_TMP} of job {job_id} is missing or not a regular file",
                _LINK_HINT,
            )

    def publish_result(self, job_id: str, tmp_path: Path) -> Path:
        """Move a validated GLB into place; only validated files ever become result.glb."""
        self.check_output(job_id, tmp_path)
        try:
            with self._job_folder(job_id) as folder:
                folder.rename(RESULT_TMP, RESULT)
        except OSError as exc:
            raise self._note(exc, f"the result of job {job_id}") from None
        return self.path(job_id, RESULT)

    def result_size(self, job_id: str) -> int:
        try:
            with self._job_folder(job_id) as folder:
                st = folder.lstat(RESULT)
        except OSError:
            return 0
        return st.st_size if st is not None else 0

    def write_json(self, job_id: str, name: str, data: Any) -> None:
        try:
            with self._job_folder(job_id) as folder:
                folder.write(name, _dumps(data))
        except OSError as exc:
            raise self._note(exc, name) from None

    def append_log(self, job_id: str, text: str) -> None:
        """Keep a bounded log excerpt per job (the newest LOG_EXCERPT_BYTES). A log that is a
        link is left alone (never read, never replaced)."""
        stamp = datetime.fromtimestamp(self.clock(), tz=timezone.utc).strftime("%H:%M:%S")
        line = f"{stamp} {text.rstrip()}\n".encode("utf-8", "replace")
        with self._lock:
            try:
                with self._job_folder(job_id) as folder:
                    try:
                        old = folder.read(LOG)
                    except FileNotFoundError:
                        old = b""
                    folder.write(LOG, (old + line)[-LOG_EXCERPT_BYTES:])
            except (OSError, BackendError) as exc:
                log.warning("cannot write log for job %s: %s", job_id, exc)

    def log_excerpt(self, job_id: str) -> str:
        data = self.read(job_id, LOG, LOG_EXCERPT_BYTES * 4)
        return data.decode("utf-8", "replace") if data else ""

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
            if target is JobState.CANCELLED and not fields.get("error"):
                # One shape for every cancelled job, however it was cancelled.
                fields["error"] = JobCancelled().to_dict()
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

    def request_cancel(self, job_id: str) -> bool:
        """Note on disk that the user cancelled a running job, so that a backend that dies
        before the job stops does not run it again. False if that could not be written."""
        with self._lock:
            try:
                record = self.get(job_id)
                if record.state is not JobState.RUNNING or record.cancel_requested:
                    return not record.terminal
                record.cancel_requested = True
                self._save(record)
            except BackendError:
                return False
            return True

    def settle(self, job_id: str, error: BackendError) -> bool:
        """End an unfinished job as failed with `error` although the folder may not be
        writable: the outcome is kept in memory (`get` and `page` see it) and written as soon
        as it can be. False when the job had ended already; True when this ended it (or its
        folder is gone, so that there is nothing left to record)."""
        with self._lock:
            try:
                record = self.get(job_id)
            except BackendError:
                return True
            if record.terminal:
                return False
            record.state = JobState.FAILED
            record.finished = self.clock()
            record.error = error.to_dict()
            self._pending[job_id] = record
            try:
                self._save(record)
            except BackendError:
                pass  # kept in memory; recover() writes it
            return True

    def unrecorded(self) -> dict[str, dict[str, Any]]:
        """The outcomes kept in memory (`settle`), as records' dicts: what another reader of
        this folder (the backend's reader process) must see instead of the disk's. Without
        the lock: the control loop asks, and a writer may hold the lock through an fsync."""
        kept = dict(self._pending)  # one C call: a consistent copy
        return {job_id: record.to_dict() for job_id, record in kept.items()}

    def show_unrecorded(self, records: dict[str, dict[str, Any]]) -> None:
        """Let `get` and `list` see another store's outcomes kept in memory (`unrecorded`), as
        that store does: for a store that only reads (the reader process)."""
        kept = {job_id: _checked(JobRecord.from_dict(data)) for job_id, data in records.items()}
        with self._lock:
            self._pending = kept

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def _save(self, record: JobRecord) -> None:
        with self._lock:
            try:
                self._writable()
                with self._job_folder(record.id) as folder:
                    folder.write(RECORD, _dumps(record.to_dict()))
            except (OSError, BackendError) as exc:
                raise self._note(exc, f"the record of job {record.id}") from None
            self._pending.pop(record.id, None)

    def _flush(self) -> None:
        """Write the outcomes kept in memory; a job whose folder is gone is dropped."""
        for job_id in self.pending():
            record = self._pending[job_id]
            try:
                with self._job_folder(job_id) as folder:
                    folder.write(RECORD, _dumps(record.to_dict()))
            except (FileNotFoundError, UnsafePath):
                log.warning("job %s: its folder is gone; its outcome is not recorded", job_id)
            self._pending.pop(job_id, None)


def _ordered(records: list[JobRecord]) -> list[JobRecord]:
    return sorted(records, key=lambda r: (r.created, r.id), reverse=True)  # ids share seconds
