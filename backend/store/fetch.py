"""`fetch`: one chunk of one file of a job folder, as bytes. The one implementation behind the
request on the local backend (`server/handlers.py`) and on the studio gateway
(`studio/jobdesk.py`), so a client reads results the same way whether or not it shares the
backend's disk.

The name is one plain file name of the folder (no path, no hidden file), the file is opened
through the job store (`safefs`: no link followed, regular files only) and a reply carries at
most `protocol.FETCH_MAX` bytes.
"""

from __future__ import annotations

from typing import Any

from ..errors import BackendError, ErrorCode
from ..wire import protocol
from ..wire.protocol import FILE_NAME
from .jobs import JobStore


def fetch(store: JobStore, content: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """(reply content, chunk) for a checked `fetch` request; raises a typed BackendError."""
    job_id, name = content["job_id"], content["name"]
    offset = content.get("offset", 0)
    length = content.get("length", protocol.FETCH_DEFAULT)
    if offset < 0 or length < 1:
        raise BackendError(ErrorCode.BAD_PARAMS, "offset must be >= 0 and length >= 1")
    store.get(job_id)  # checks the id and that the job exists (not_found otherwise)
    if not FILE_NAME.match(name):
        raise BackendError(ErrorCode.NOT_FOUND, f"no file {name!r} in job {job_id}")
    try:
        chunk, size = store.read_chunk(job_id, name, offset, min(length, protocol.FETCH_MAX))
    except OSError:  # missing, a link, a folder, another user's: all the same to a client
        raise BackendError(ErrorCode.NOT_FOUND, f"no file {name!r} in job {job_id}") from None
    reply = protocol.ok_reply(
        job_id=job_id,
        name=name,
        offset=offset,
        length=len(chunk),
        size=size,
        eof=offset + len(chunk) >= size,
    )
    return reply, chunk
