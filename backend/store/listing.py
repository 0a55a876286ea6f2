"""The read-only replies over a job store: `jobs` (pages, search, disk use), `job` and the
`stats` aggregate. Pure reads of the store (standard library only): the local backend's reader
process answers with them (`server/reader.py`), so does its in-process fallback
(`server/handlers.py`) and the studio gateway (`studio/jobdesk.py`)."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BackendError, ErrorCode
from ..wire import protocol
from .jobs import INPUT_STEM, JOB_ID, THUMBNAIL, JobRecord, JobStore

# Bytes of job summaries in one `jobs` page: well under the frame limit, and small enough that
# encoding a page (one C call that holds the GIL) keeps the control loop waiting ~1 ms, not ~7.
JOBS_REPLY_BUDGET = 128 << 10
JOBS_LIMIT = 10_000  # `jobs(limit)` at most
JOBS_OFFSET = 1_000_000  # `jobs(offset)` at most
QUERY_CHARS = 200  # `jobs(query)` at most

Summarize = Callable[[JobRecord], dict]


def job_reply(store: JobStore, content: dict[str, Any]) -> dict:
    """A `job` reply: the record, its folder, its files and (on request) its log."""
    record = store.get(content["job_id"])
    return protocol.ok_reply(
        job=record.to_wire(),
        folder=str(store.folder(record.id)),
        files=store.files(record.id),  # regular files only: links are never followed
        # The log excerpt (up to 16 KB) only on request: clients poll `job` for its state.
        log=store.log_excerpt(record.id) if content.get("log") else None,
    )


def list_jobs(
    store: JobStore,
    content: dict[str, Any],
    summarize: Summarize,
    budget: int | None = None,
) -> dict:
    """A `jobs` reply (docs/protocol.md, paging): by position (`offset`, `query`, with
    `total`) or after `before`. The local backend and the studio gateway (its summaries name
    the artist and the worker) both answer with it. `budget`: bytes of summaries in a page
    (JOBS_REPLY_BUDGET)."""
    budget = JOBS_REPLY_BUDGET if budget is None else budget
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
        records, warnings, more = page_before(store, limit, before, summarize, budget)
        return _listing(store, summarize, records, warnings, 0, limit, None, budget, more)
    if query:  # reads every record: about 3 ms per 100 jobs on the 2-core CI machine
        records, warnings, _ = newest(store, None)
        found = [r for r in records if matches(r, query.split())]
        return _listing(store, summarize, found, warnings, offset, limit, len(found), budget)
    records, warnings, total = newest(store, offset + limit)
    return _listing(store, summarize, records, warnings, offset, limit, total, budget)


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
    store: JobStore,
    limit: int,
    before: str,
    summarize: Summarize,
    budget: int = JOBS_REPLY_BUDGET,
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
            if len(records) >= limit or (records and used + cost > budget):
                return records, warnings, True
            used += cost
            records.append(record)
    return records, warnings, False


def _listing(
    store: JobStore,
    summarize: Summarize,
    records: list[JobRecord],
    warnings: list[str],
    offset: int,
    limit: int,
    total: int | None,
    budget: int,
    more_follow: bool | None = None,
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
        if jobs and used > budget:
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


def stats_reply(
    aggregate: dict[str, Any], requests: dict[str, int], rejected: dict[str, int], uptime: float
) -> dict:
    """A `stats` reply: the stats log's aggregate and the backend's request counters."""
    return protocol.ok_reply(
        aggregate=aggregate, requests=requests, rejected=rejected, uptime=uptime
    )
