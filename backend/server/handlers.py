"""Request handlers: a request in, a reply's content out, over the backend's state
(`workers.Backend`). No socket here; `ROUTES` says which thread runs each request, so the
control loop (`loop.py`) answers from memory and hands anything that reads the job store,
decodes an image or waits on a child process to a lane. A new request is one `ROUTES` entry
(plus its schema in `protocol.REQUESTS`). A handler returns the reply's content, or
(content, buffers) for a reply that carries binary frames (`fetch`)."""

from __future__ import annotations

import itertools
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
from pathlib import Path
from typing import Any

from .. import __version__, settings
from ..checks import images, meshes
from ..errors import BackendError, ErrorCode
from ..params import parse_params, reexport_params
from ..pipeline import heap
from ..pipeline.runner import check_disk
from ..store.fetch import fetch
from ..store.jobs import INPUT_STEM, JOB_ID, THUMBNAIL, JobRecord, JobStore
from ..supervision import commands
from ..wire import protocol
from .workers import Backend, BackendState

log = logging.getLogger(__name__)

# Bytes of job summaries in one `jobs` page: well under the frame limit, and small enough that
# encoding a page (one C call that holds the GIL) keeps the control loop waiting ~1 ms, not ~7.
JOBS_REPLY_BUDGET = 128 << 10
MAX_KEY_CHARS = 200  # idempotency keys
JOBS_LIMIT = 10_000  # `jobs(limit)` at most
JOBS_OFFSET = 1_000_000  # `jobs(offset)` at most
QUERY_CHARS = 200  # `jobs(query)` at most
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
        current=b.runner.current,
        vram=b.vram,  # refreshed by the GPU prober and after each job, never here
        gpu_health=b.health,
        output_dir=str(b.config.output_dir),
        output=b.output_health(),
        rejected=rejected,
        memory=heap.figures(),
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
    _admit(b)
    parent = b.store.get(message.content["job_id"])
    if parent.state.value != "done" or parent.kind == "texture":
        raise BackendError(ErrorCode.BAD_PARAMS, f"job {parent.id} has no result to re-export")
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
    return list_jobs(b.store, message.content, summary)


def list_jobs(
    store: JobStore, content: dict[str, Any], summarize: Callable[[JobRecord], dict]
) -> dict:
    """A `jobs` reply (docs/protocol.md, paging): by position (`offset`, `query`, with
    `total`) or after `before`. The local backend and the studio gateway (its summaries name
    the artist and the worker) both answer with it."""
    limit = content.get("limit", 50)
    offset = content.get("offset", 0)
    query = content.get("query", "").strip().lower()
    if not 1 <= limit <= JOBS_LIMIT:
        raise BackendError(ErrorCode.BAD_PARAMS, f"limit must be 1..{JOBS_LIMIT}")
    if not 0 <= offset <= JOBS_OFFSET:
        raise BackendError(ErrorCode.BAD_PARAMS, f"offset must be 0..{JOBS_OFFSET}")
    if len(query) > QUERY_CHARS:
        raise BackendError(ErrorCode.BAD_PARAMS, f"query is longer than {QUERY_CHARS} characters")
    before = content.get("before")
    if before is not None:  # paging by id: stable while jobs are being added
        records, warnings, more = page_before(store, limit, before, summarize)
        return _listing(store, summarize, records, warnings, 0, limit, None, more)
    if query:  # reads every record: about 3 ms per 100 jobs on the 2-core CI machine
        records, warnings, _ = newest(store, None)
        found = [r for r in records if matches(r, query.split())]
        return _listing(store, summarize, found, warnings, offset, limit, len(found))
    records, warnings, total = newest(store, offset + limit)
    return _listing(store, summarize, records, warnings, offset, limit, total)


def on_job(b: Backend, message) -> dict:
    record = b.store.get(message.content["job_id"])
    return protocol.ok_reply(
        job=record.to_wire(),
        folder=str(b.store.folder(record.id)),
        files=b.store.files(record.id),  # regular files only: links are never followed
        # The log excerpt (up to 16 KB) only on request: clients poll `job` for its state.
        log=b.store.log_excerpt(record.id) if message.content.get("log") else None,
    )


def on_fetch(b: Backend, message) -> tuple[dict, list[bytes]]:
    # A file of a job as bytes (backend/store/fetch.py, shared with the studio gateway): a bounded
    # read (at most protocol.FETCH_MAX) of the job store, so a reader's work.
    content, chunk = fetch(b.store, message.content)
    return content, [chunk]


def on_stats(b: Backend, message) -> dict:
    from ..store.stats import aggregate

    requests, rejected = b.counts()
    return protocol.ok_reply(
        aggregate=aggregate(b.stats.read()),
        requests=requests,
        rejected=rejected,
        uptime=round(time.monotonic() - b.started_at, 3),
    )


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
    "jobs": Route(on_jobs, Lane.READER),
    "job": Route(on_job, Lane.READER),
    "stats": Route(on_stats, Lane.READER),
    "fetch": Route(on_fetch, Lane.READER),
    "delete_jobs": Route(on_delete_jobs, Lane.READER),
    "doctor": Route(on_doctor, Lane.OWN),
}


# -- pure helpers -----------------------------------------------------------------------------


def summary(record: JobRecord) -> dict[str, Any]:
    """A job as `jobs` lists it (without where it lives: `folder_facts`)."""
    result = record.result or {}
    return {
        "job_id": record.id,
        "kind": record.kind,
        "state": record.state.value,
        "engine": record.engine,
        "filename": record.filename,
        "created": record.created,
        "started": record.started,
        "finished": record.finished,
        "level": record.level,
        "attempts": record.attempts,
        "preset": (record.params or {}).get("preset"),
        "seed": (record.params or {}).get("seed"),
        "glb_path": result.get("glb_path"),
        "mesh_stats": result.get("mesh_stats"),
        "degraded_reason": result.get("degraded_reason"),
        "error": record.error,
        "parent": record.parent,
    }


def newest(store: JobStore, count: int | None) -> tuple[list[JobRecord], list[str], int]:
    """At least the `count` newest readable jobs (all with None), newest first, the warnings
    for unreadable folders, and how many job folders there are. The order is the id's second
    (ids start with it), then `created`: so any page of `jobs` is a slice of one order and
    paging never skips or repeats a job, although this reads only the newest ids."""
    records: list[JobRecord] = []
    warnings: list[str] = []
    try:
        listing = os.listdir(store.jobs_dir)
    except FileNotFoundError:  # made on the first job (a deleted folder is made again)
        return records, warnings, 0
    except OSError as exc:
        return records, [f"cannot read {store.jobs_dir}: {exc}"], 0
    names = sorted((name for name in listing if JOB_ID.match(name)), reverse=True)
    boundary = None
    for name in names:
        if boundary is not None and name[:15] != boundary:
            break
        try:
            records.append(store.get(name))
        except BackendError as exc:
            warnings.append(f"skipped {name}: {exc.message}")
            continue
        if count is not None and boundary is None and len(records) >= count:
            boundary = name[:15]  # finish this second: its order is by `created`
    records.sort(key=listing_order, reverse=True)
    return records, warnings, len(names)


def matches(record: JobRecord, words: list[str]) -> bool:
    text = " ".join(
        str(x)
        for x in (
            record.id,
            record.filename,
            record.kind,
            record.state.value,
            record.engine,
            (record.params or {}).get("preset"),
        )
    ).lower()
    return all(word in text for word in words)


def listing_order(record: JobRecord) -> tuple[str, float, str]:
    """The one order of every `jobs` listing, newest first (sort descending): the id's second
    (ids start with it), then `created`, then the id."""
    return (record.id[:15], record.created, record.id)


def page_before(
    store: JobStore, limit: int, before: str, summarize: Callable[[JobRecord], dict]
) -> tuple[list[JobRecord], list[str], bool]:
    """The records that follow job `before` in the listing order, as many as `limit` and the
    reply budget allow (each record's summary plus an allowance for where it lives), and
    whether more follow.

    Read a second's jobs at a time, only as far as the budget reaches: reading `limit` records
    when the reply holds a few hundred made a listing of N jobs read about N^2 / 300 records
    (5,000 jobs: ~40,000 reads). Cut in the listing order, so the last job sent is the next
    cursor and no job of a busy second (a batch) is skipped or repeated."""
    warnings: list[str] = []
    try:
        listing = os.listdir(store.jobs_dir)
    except FileNotFoundError:
        return [], warnings, False
    except OSError as exc:
        return [], [f"cannot read {store.jobs_dir}: {exc}"], False
    second = before[:15]
    try:
        cursor = listing_order(store.get(before))
    except BackendError:  # the cursor's job is gone: within its second, by id alone
        cursor = None
    names = sorted((n for n in listing if JOB_ID.match(n) and n[:15] <= second), reverse=True)
    records: list[JobRecord] = []
    used = 0
    for _, group in itertools.groupby(names, key=lambda n: n[:15]):
        batch = []
        for name in group:
            try:
                batch.append(store.get(name))
            except BackendError as exc:
                warnings.append(f"skipped {name}: {exc.message}")
        for record in sorted(batch, key=listing_order, reverse=True):
            key = listing_order(record)
            if (cursor is not None and key >= cursor) or (cursor is None and record.id >= before):
                continue  # sent on an earlier page
            cost = len(json.dumps(summarize(record), default=str))
            cost += 3 * len(str(store.folder(record.id))) + 64
            if len(records) >= limit or (records and used + cost > JOBS_REPLY_BUDGET):
                return records, warnings, True
            used += cost
            records.append(record)
    return records, warnings, False


def _listing(
    store: JobStore, summarize, records, warnings, offset: int, limit: int, total, more_follow=None
) -> dict:
    """One page, cut short where it would pass the reply limit. `next` is the id to give as
    `before` for the following page (None after the last). `more_follow`: whether jobs follow
    `records` when the caller knows (a page by id), else found from `total` and `limit`."""
    page = records[offset : offset + limit]
    jobs: list[dict] = []
    used = 0
    for record in page:
        entry = dict(summarize(record), **folder_facts(store.folder(record.id)))
        used += len(json.dumps(entry, default=str))
        if jobs and used > JOBS_REPLY_BUDGET:
            break
        jobs.append(entry)
    more = (
        len(jobs) < len(page)
        or bool(more_follow)
        or (more_follow is None and total is None and len(page) == limit)
        or (total is not None and offset + len(page) < total)
    )
    return protocol.ok_reply(
        jobs=jobs,
        warnings=[w[:300] for w in warnings[:50]],
        total=total,
        offset=offset,
        next=jobs[-1]["job_id"] if jobs and more else None,
    )


def folder_facts(folder: Path) -> dict[str, Any]:
    """Disk use of a job folder (links not followed) and where its thumbnail and input are."""
    facts: dict[str, Any] = {"folder": str(folder), "bytes": 0, "thumbnail": None, "input": None}
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                facts["bytes"] += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            if current == folder and entry.name == THUMBNAIL:
                facts["thumbnail"] = entry.path
            elif current == folder and entry.name.startswith(f"{INPUT_STEM}."):
                facts["input"] = entry.path
    return facts


def clean_filename(name: Any) -> str:
    if not isinstance(name, str):
        return ""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in base if ch.isprintable())[:120]
