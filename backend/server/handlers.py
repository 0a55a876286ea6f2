"""Request handlers: a request in, a reply's content out, over the backend's state
(`workers.Backend`). No socket here; `ROUTES` says which thread runs each request, so the
control loop (`loop.py`) answers from memory and hands anything that reads the job store,
decodes an image or waits on a child process to a lane. A new request is one `ROUTES` entry
(plus its schema in `protocol.REQUESTS`). A handler returns the reply's content, or
(content, buffers) for a reply that carries binary frames (`fetch`)."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .. import __version__, settings
from ..checks import images, meshes
from ..errors import BackendError, ErrorCode
from ..params import parse_params, reexport_params
from ..pipeline import heap
from ..pipeline.runner import check_disk
from ..store import listing
from ..store.fetch import fetch
from ..store.jobs import THUMBNAIL
from ..store.listing import folder_facts, job_reply, list_jobs, stats_reply, summary
from ..supervision import commands
from ..wire import protocol
from .workers import Backend, BackendState

log = logging.getLogger(__name__)

# Bytes of job summaries in one `jobs` page (the store's listing; here so a test may lower it).
JOBS_REPLY_BUDGET = listing.JOBS_REPLY_BUDGET
MAX_KEY_CHARS = 200  # idempotency keys
DELETE_DAYS = 36_500  # `delete_jobs(older_than_days)` at most


class Lane(str, Enum):
    """Where a request runs."""

    LOOP = "loop"  # on the control loop: answers from memory only
    INTAKE = "intake"  # one thread, in arrival order: new jobs (decode, thumbnail, write)
    READER = "reader"  # reads of the job store (listings, records, stats, deletion)
    OWN = "own"  # a thread of its own (a child process that may take minutes)


Reply = dict[str, Any] | tuple[dict[str, Any], list[bytes]]  # content, or (content, buffers)
Handler = Callable[[Backend, protocol.Message], Reply]


@dataclass(frozen=True)
class Route:
    handler: Handler
    lane: Lane
    # Answered by the reader process (`reader.py`, the same replies) while it is up; by
    # `handler` on `lane` when it is not, or has lost the request.
    reader_process: bool = False


# -- answered from memory ----------------------------------------------------------------


def on_hello(b: Backend, message) -> dict:
    return protocol.ok_reply(
        protocol_version=protocol.PROTOCOL_VERSION,
        backend_version=__version__,
        session=b.session_id,
        pid=os.getpid(),
        state=b.current_state().value,
        engine=b.engine.describe(),
        python=platform.python_version(),
        platform=sys.platform,
    )


def on_ping(b: Backend, message) -> dict:
    return protocol.ok_reply(pong=True, time=b.clock())


def on_status(b: Backend, message) -> dict:
    _, rejected = b.counts()
    return protocol.ok_reply(
        state=b.current_state().value,
        reason=b.state_reason,
        session=b.session_id,
        pid=os.getpid(),
        active=b.active.is_set(),
        uptime=round(time.monotonic() - b.started_at, 3),
        engine=b.engine.describe(),
        engine_error=b.engine_error,
        queue=b.queue_snapshot(),
        queue_depth=b.config.queue_depth,
        max_concurrent=b.max_concurrent,
        running=list(b.running),
        current=b.current_progress(),
        vram=b.vram,  # refreshed by the GPU prober and after each job, never here
        gpu_health=b.health,
        output_dir=str(b.config.output_dir),
        output=b.output_health(),
        rejected=rejected,
        memory=heap.figures(),
        reader=b.reader_figures(),  # the reader process: its pid (None: none up), counters
        job_hosts=b.host_figures(),  # the job processes (None: jobs run on threads)
    )


def on_shutdown(b: Backend, message) -> dict:
    reason = message.content.get("reason") or "shutdown requested"
    b.request_stop(reason)
    return protocol.ok_reply(state="stopping", running=list(b.running))


# -- new jobs (intake lane, in arrival order) ----------------------------------------------


def on_generate(b: Backend, message) -> dict:
    duplicate = _duplicate(b, message)
    if duplicate is not None:
        return duplicate
    _admit(b)
    params = parse_params(message.content.get("params"))
    image_bytes = message.buffers[0]
    image = images.load_image(image_bytes, b.config.image_limits)
    return _submit(b, "generate", params.to_dict(), message, image_bytes=image_bytes, image=image)


def on_texture(b: Backend, message) -> dict:
    b.engine.stages_for("texture")  # typed error if this engine cannot texture
    duplicate = _duplicate(b, message)
    if duplicate is not None:
        return duplicate
    _admit(b)
    params = parse_params(message.content.get("params"))
    image_bytes, mesh = message.buffers
    fmt = meshes.checked_upload(message.content["mesh_format"], mesh)
    image = images.load_image(image_bytes, b.config.image_limits)
    return _submit(
        b,
        "texture",
        params.to_dict(),
        message,
        image_bytes=image_bytes,
        image=image,
        mesh=mesh,
        mesh_ext=fmt,
    )


def on_reexport(b: Backend, message) -> dict:
    b.engine.stages_for("reexport")
    duplicate = _duplicate(b, message)
    if duplicate is not None:
        return duplicate
    # The parent first: an unknown job is `not_found` whatever the backend's state.
    parent = b.store.get(message.content["job_id"])
    if parent.state.value != "done" or parent.kind == "texture":
        raise BackendError(ErrorCode.BAD_PARAMS, f"job {parent.id} has no result to re-export")
    _admit(b)
    params = reexport_params(parent.params, parent.final_params, message.content.get("params"))
    return _submit(
        b,
        "reexport",
        params.to_dict(),
        message,
        parent=parent.id,
        filename=parent.filename,
        thumbnail=b.store.read(parent.id, THUMBNAIL, 8 << 20),
    )


def on_cancel(b: Backend, message) -> dict:
    job_id = message.content["job_id"]
    record = b.store.get(job_id)
    with b.queue_cv:
        if job_id in b.queue:
            b.store.transition(job_id, "cancel")  # first: a failed write leaves it queued
            b.queue.remove(job_id)
            b.decoded.pop(job_id, None)
            b.emit("job_cancelled", {"job_id": job_id})
            return protocol.ok_reply(job_id=job_id, state="cancelled")
    flag = b.running.get(job_id)
    if flag is not None:
        b.store.request_cancel(job_id)  # on disk: a crash before the stop keeps it cancelled
        flag.set()
        return protocol.ok_reply(job_id=job_id, state="cancelling")
    return protocol.ok_reply(job_id=job_id, state=record.state.value)


def on_activate(b: Backend, message) -> dict:
    b.activate(message.content.get("predecessor"))  # its queue comes from the store
    return protocol.ok_reply(state=b.current_state().value, queue=b.queue_snapshot())


def _duplicate(b: Backend, message) -> dict | None:
    """A request sent again with its idempotency key (say, after a client timeout) is
    answered with the job the first one made, whatever the queue or disk say now."""
    key = message.content.get("idempotency_key")
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_CHARS:
        raise BackendError(
            ErrorCode.BAD_PARAMS, f"idempotency_key must be 1..{MAX_KEY_CHARS} characters"
        )
    job_id = b.keys.get(key)
    if job_id is None:
        return None
    try:
        state = b.store.get(job_id).state.value
    except BackendError:
        return None  # its folder is gone: the request makes a new job
    with b.queue_cv:
        position = b.queue.index(job_id) + 1 if job_id in b.queue else 0
    return protocol.ok_reply(job_id=job_id, position=position, state=state, duplicate=True)


def _admit(b: Backend) -> None:
    """Refuse a new job before any work is spent on it (decoding the image costs more than
    the answer: a client retrying after `busy` must not make the backend busier)."""
    if b.stopping.is_set():
        raise BackendError(ErrorCode.SHUTTING_DOWN, "the backend is shutting down")
    if not b.active.is_set():
        raise BackendError(
            ErrorCode.ENGINE_UNAVAILABLE,
            "this is a standby backend",
            "Send jobs to the active backend; a standby runs after `activate`.",
        )
    if b.state is BackendState.FAILED:
        raise BackendError(
            ErrorCode.ENGINE_UNAVAILABLE,
            (b.engine_error or {}).get("message", "engine failed to load"),
        )
    problem = b.store.problem
    if problem is not None:  # disk full, read-only, deleted, another owner: typed
        raise BackendError(problem.code, problem.message, problem.hint)
    with b.queue_cv:
        if len(b.queue) >= b.config.queue_depth:
            raise BackendError(
                ErrorCode.BUSY, f"the queue is full ({b.config.queue_depth} jobs waiting)"
            )
    check_disk(b.config.output_dir, b.config.min_free_disk)


def _submit(
    b: Backend,
    kind: str,
    params: dict,
    message,
    *,
    image_bytes: bytes | None = None,
    image=None,
    mesh: bytes | None = None,
    mesh_ext: str = "glb",
    parent: str | None = None,
    filename: str | None = None,
    thumbnail: bytes | None = None,
) -> dict:
    _admit(b)  # again: a worker may have failed the engine meanwhile
    name = clean_filename(message.content.get("filename") if filename is None else filename)
    # Written outside the queue's lock (the loop reads the queue for `status`); only this
    # lane adds jobs, so the depth checked above still holds.
    record = b.store.create(
        kind,
        b.engine.name,
        params,
        image=image_bytes,
        image_ext=images.image_ext(image_bytes) if image_bytes else "png",
        filename=name,
        thumbnail=thumbnail or (images.thumbnail(image) if image else None),
        mesh=mesh,
        mesh_ext=mesh_ext,
        parent=parent,
        idempotency_key=message.content.get("idempotency_key"),
    )
    with b.queue_cv:
        if record.idempotency_key:
            b.keys[record.idempotency_key] = record.id
        b.queue.append(record.id)
        if image is not None:
            b.decoded[record.id] = image
        position = len(b.queue)
        b.queue_cv.notify()
    b.emit("job_queued", b.queued_event(record, position), message.header)
    return protocol.ok_reply(job_id=record.id, position=position, state="queued")


# -- reads of the job store (reader lane) ---------------------------------------------------


def on_jobs(b: Backend, message) -> dict:
    return list_jobs(b.store, message.content, summary, JOBS_REPLY_BUDGET)


def on_job(b: Backend, message) -> dict:
    return job_reply(b.store, message.content)


def on_fetch(b: Backend, message) -> tuple[dict, list[bytes]]:
    # A file of a job as bytes (backend/store/fetch.py, shared with the studio gateway): a bounded
    # read (at most protocol.FETCH_MAX) of the job store, so a reader's work.
    content, chunk = fetch(b.store, message.content)
    return content, [chunk]


def on_stats(b: Backend, message) -> dict:
    from ..store.stats import aggregate

    requests, rejected = b.counts()
    uptime = round(time.monotonic() - b.started_at, 3)
    return stats_reply(aggregate(b.stats.read()), requests, rejected, uptime)


def on_delete_jobs(b: Backend, message) -> dict:
    """Remove finished jobs' folders (or, with `dry_run`, say what that would free). A job
    still queued or running, and the parent of one (a re-export reads its parent's files),
    is kept."""
    job_id = message.content.get("job_id")
    days = message.content.get("older_than_days")
    if (job_id is None) == (days is None):
        raise BackendError(ErrorCode.BAD_PARAMS, "give either job_id or older_than_days")
    if days is not None and not 0 <= days <= DELETE_DAYS:
        raise BackendError(ErrorCode.BAD_PARAMS, f"older_than_days must be 0..{DELETE_DAYS}")
    dry_run = bool(message.content.get("dry_run", False))
    if job_id is not None:
        b.store.folder(job_id)  # a bad id is refused here, before any work
        record = b.store.get(job_id)
        if not record.terminal:
            raise BackendError(
                ErrorCode.BUSY,
                f"job {job_id} is {record.state.value}",
                "Cancel it first, or wait until it ends.",
            )
        candidates = [record]
    else:
        cutoff = b.clock() - days * 86_400
        records, _ = b.store.list()
        candidates = [r for r in records if r.terminal and (r.finished or r.created) < cutoff]
    with b.queue_cv:
        busy = [*b.queue, *b.running]
    kept = set()
    for busy_id in busy:
        try:
            kept.add(b.store.get(busy_id).parent)
        except BackendError:
            pass
    deleted, skipped, freed = [], [], 0
    for record in candidates:
        folder = b.store.folder(record.id)
        if record.id in kept:
            skipped.append({"job_id": record.id, "reason": "a re-export of it is queued"})
            continue
        size = folder_facts(folder)["bytes"]
        if not dry_run:
            try:
                if folder.is_symlink():  # the store never makes links: do not follow one
                    raise OSError(f"{folder} is a symbolic link")
                shutil.rmtree(folder)
            except OSError as exc:
                skipped.append({"job_id": record.id, "reason": str(exc)})
                continue
        deleted.append(record.id)
        freed += size
    if deleted and not dry_run:
        log.info("deleted %d job folder(s), %d bytes", len(deleted), freed)
    return protocol.ok_reply(
        job_ids=deleted, count=len(deleted), bytes=freed, skipped=skipped, dry_run=dry_run
    )


# -- a child process (its own thread) -------------------------------------------------------


def on_doctor(b: Backend, message) -> dict:
    # A child process: doctor imports trellis2, which reads its attention settings once at
    # import; doing that here could race the engine's own import.
    cmd = commands.doctor_command(
        sys.executable, output_dir=b.config.output_dir, engine_options=b.config.engine_options
    )
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=settings.DOCTOR_TIMEOUT,
            env=commands.backend_environment(),
            cwd=str(settings.EXTENSION_ROOT),
        )
        report = json.loads(proc.stdout)
    except (subprocess.TimeoutExpired, ValueError, OSError) as exc:
        raise BackendError(ErrorCode.INTERNAL, f"doctor did not report: {exc}") from None
    return protocol.ok_reply(report=report)


ROUTES: dict[str, Route] = {
    "hello": Route(on_hello, Lane.LOOP),
    "ping": Route(on_ping, Lane.LOOP),
    "status": Route(on_status, Lane.LOOP),
    "shutdown": Route(on_shutdown, Lane.LOOP),
    "generate": Route(on_generate, Lane.INTAKE),
    "texture": Route(on_texture, Lane.INTAKE),
    "reexport": Route(on_reexport, Lane.INTAKE),
    "cancel": Route(on_cancel, Lane.INTAKE),
    "activate": Route(on_activate, Lane.INTAKE),
    "jobs": Route(on_jobs, Lane.READER, reader_process=True),
    "job": Route(on_job, Lane.READER, reader_process=True),
    "stats": Route(on_stats, Lane.READER, reader_process=True),
    "fetch": Route(on_fetch, Lane.READER),
    "delete_jobs": Route(on_delete_jobs, Lane.READER),
    "doctor": Route(on_doctor, Lane.OWN),
}


# -- pure helpers -----------------------------------------------------------------------------


def clean_filename(name: Any) -> str:
    if not isinstance(name, str):
        return ""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in base if ch.isprintable())[:120]
