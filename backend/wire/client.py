"""Non-blocking, poll-based client for the add-on and scripts (stdlib + pyzmq only).

No call blocks longer than the timeout it is given; `poll(0)` never blocks. Replies and events
come out of the same `poll()`, so one timer tick in Blender can drive everything.
`request_async()` returns a `Pending` at once: a later `poll()` resolves it with the reply, or
fails it when its deadline passes or the connection closes. The blocking conveniences
(`request()`, `generate()`, ...) are for scripts and tests.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import zmq

from .. import settings
from ..errors import BackendError, ErrorCode, ProtocolError
from . import protocol

TERMINAL_EVENTS = settings.TERMINAL_EVENTS
MAX_DOWNLOAD = 2 << 30  # a file larger than this is refused rather than held in memory


class ClientTimeout(BackendError):
    def __init__(self, what: str, timeout: float):
        super().__init__(
            ErrorCode.BACKEND_DIED,
            f"no answer to {what} within {timeout:.1f} s",
            "The backend may be busy starting or may have died; check its status and log.",
        )


class Pending:
    """A request sent without waiting: `poll()` resolves it with the reply, or fails it when its
    deadline passes or the connection closes. Read it only once `done`."""

    def __init__(self, msg_type: str, msg_id: str = "", sent: float = 0.0, timeout: float = 0.0):
        self.msg_type = msg_type
        self.msg_id = msg_id
        self.deadline = sent + timeout
        self.timeout = timeout
        self.reply: dict | None = None  # the reply's content when it was {"ok": true, ...}
        self.buffers: list[bytes] = []  # the reply's binary frames (a `fetch` chunk)
        self.error: BackendError | None = None

    @classmethod
    def failed(cls, msg_type: str, error: BackendError) -> Pending:
        pending = cls(msg_type)
        pending.error = error
        return pending

    @classmethod
    def answered(cls, msg_type: str, content: dict) -> Pending:
        pending = cls(msg_type)
        pending.resolve(content)
        return pending

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None

    @property
    def ok(self) -> bool:
        return self.reply is not None

    def result(self) -> dict:
        """The reply's content; raises its BackendError. Only once `done`."""
        if self.error is not None:
            raise self.error
        if self.reply is None:
            raise RuntimeError(f"{self.msg_type} has no answer yet")
        return self.reply

    def resolve(self, content: dict, buffers: Sequence[bytes] = ()) -> None:
        if self.done:
            return
        try:
            self.reply = _unwrap_content(content)
            self.buffers = [bytes(b) for b in buffers]
        except BackendError as exc:
            self.error = exc

    def fail(self, error: BackendError) -> None:
        if not self.done:
            self.error = error

    def __repr__(self) -> str:
        state = "ok" if self.ok else f"error {self.error!r}" if self.error else "waiting"
        return f"Pending({self.msg_type!r}, {state})"


class Client:
    """One connection to one backend process (one session)."""

    def __init__(
        self,
        connection: protocol.ConnectionInfo | str | Path,
        *,
        context: zmq.Context | None = None,
        subscribe: bool = True,
        clock: Callable[[], float] = time.monotonic,
        monitor_events: int = 0,
    ):
        if not isinstance(connection, protocol.ConnectionInfo):
            connection = protocol.read_connection_file(connection)
        self.info = connection
        self.session = protocol.Session(connection.key)
        self.clock = clock
        self._own_context = context is None
        self.ctx = context or zmq.Context()
        self.shell = self.ctx.socket(zmq.DEALER)
        self.shell.setsockopt(zmq.LINGER, 0)
        # A monitor of the request socket's handshake (`monitor_events`, e.g. a refused CURVE
        # key) is attached before connecting, so the first handshake's events are not missed.
        self.monitor: zmq.Socket | None = None
        if monitor_events:
            try:
                self.monitor = self.shell.get_monitor_socket(monitor_events)
            except zmq.ZMQError:  # a libzmq without monitors: timeouts still tell
                pass
        self.shell.connect(connection.shell_url)
        self.iopub: zmq.Socket | None = None
        if subscribe:
            self.iopub = self.ctx.socket(zmq.SUB)
            self.iopub.setsockopt(zmq.LINGER, 0)
            self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
            self.iopub.connect(connection.iopub_url)
        self.poller = zmq.Poller()
        self.poller.register(self.shell, zmq.POLLIN)
        if self.iopub is not None:
            self.poller.register(self.iopub, zmq.POLLIN)
        self._backlog: deque[protocol.Message] = deque()
        self._pending: dict[str, Pending] = {}  # msg_id -> request_async() still unanswered
        self.rejected = 0  # incoming messages that failed verification (counted, dropped)
        self.backend_session: str = connection.session
        self.last_seen: float | None = None  # clock() of the last message from the backend
        self.closed = False

    # -- raw I/O ------------------------------------------------------------------------

    def send(
        self,
        msg_type: str,
        content: dict[str, Any] | None = None,
        buffers: tuple[bytes, ...] | list[bytes] = (),
    ) -> str:
        """Queue a request; returns its msg_id. Never blocks (ZeroMQ queues it)."""
        message = self.session.msg(msg_type, content, buffers=buffers)
        try:
            self.shell.send_multipart(self.session.serialize(message), zmq.NOBLOCK, copy=False)
        except zmq.Again:  # the send queue is full: the backend has not read for a long time
            raise ClientTimeout(f"sending {msg_type}", 0.0) from None
        return message.msg_id

    def poll(self, timeout: float = 0.0) -> list[protocol.Message]:
        """Everything received so far (replies and events); waits at most `timeout` s."""
        out = list(self._backlog)
        self._backlog.clear()
        if out:
            timeout = 0.0
        deadline = self.clock() + max(0.0, timeout)
        try:
            while True:
                remaining = max(0.0, deadline - self.clock())
                ready = dict(self.poller.poll(int(remaining * 1000)))
                if not ready:
                    return out
                if self.shell in ready:
                    out.extend(self._recv_all(self.shell, skip=0))
                if self.iopub is not None and self.iopub in ready:
                    out.extend(self._recv_all(self.iopub, skip=1))
                if out:
                    return out
        finally:
            self._expire()

    def _recv_all(self, sock: zmq.Socket, skip: int) -> list[protocol.Message]:
        messages = []
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            try:
                message = self.session.deserialize(frames[skip:])
            except ProtocolError:
                self.rejected += 1
                continue
            self.last_seen = self.clock()
            self.backend_session = message.session
            pending = self._pending.pop(message.parent_id, None) if message.parent_id else None
            if pending is not None and message.msg_type == protocol.reply_type(pending.msg_type):
                pending.resolve(message.content, message.buffers)
                continue
            if pending is not None:  # an event about the request: the reply is still to come
                self._pending[pending.msg_id] = pending
            messages.append(message)

    def _expire(self) -> None:
        now = self.clock()
        for msg_id, pending in list(self._pending.items()):
            if now >= pending.deadline:
                del self._pending[msg_id]
                pending.fail(ClientTimeout(pending.msg_type, pending.timeout))

    # -- request / reply ------------------------------------------------------------------

    def request(
        self,
        msg_type: str,
        content: dict[str, Any] | None = None,
        buffers: tuple[bytes, ...] | list[bytes] = (),
        timeout: float = 5.0,
    ) -> dict:
        """Send and wait for the reply (other messages stay queued for poll()).
        Raises BackendError for an error reply and ClientTimeout when nothing comes back."""
        msg_id = self.send(msg_type, content, buffers)
        reply = self.wait_reply(msg_id, timeout, what=msg_type)
        return _unwrap(reply)

    def request_async(
        self,
        msg_type: str,
        content: dict[str, Any] | None = None,
        buffers: tuple[bytes, ...] | list[bytes] = (),
        timeout: float = 5.0,
    ) -> Pending:
        """Send and return at once; a later poll() resolves the Pending (or fails it after
        `timeout` seconds). Never blocks."""
        if self.closed:
            return Pending.failed(msg_type, _closed_error(msg_type))
        try:
            msg_id = self.send(msg_type, content, buffers)
        except ClientTimeout as exc:
            return Pending.failed(msg_type, exc)
        except zmq.ZMQError as exc:
            return Pending.failed(
                msg_type, BackendError(ErrorCode.BACKEND_DIED, f"cannot send {msg_type}: {exc}")
            )
        pending = Pending(msg_type, msg_id, self.clock(), timeout)
        self._pending[msg_id] = pending
        return pending

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    def wait_reply(self, msg_id: str, timeout: float, what: str = "request") -> protocol.Message:
        deadline = self.clock() + timeout
        kept: list[protocol.Message] = []
        try:
            while True:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise ClientTimeout(what, timeout)
                batch = self.poll(remaining)
                for i, message in enumerate(batch):
                    if message.parent_id == msg_id and message.msg_type.endswith("_reply"):
                        kept.extend(batch[i + 1 :])  # events that came with it stay for poll()
                        return message
                    kept.append(message)
        finally:
            self._backlog.extendleft(reversed(kept))

    # -- conveniences ---------------------------------------------------------------------

    def hello(self, timeout: float = 5.0) -> dict:
        return self.request("hello", {"client": "trellis2-blender"}, timeout=timeout)

    def ping(self, timeout: float = 2.0) -> dict:
        return self.request("ping", timeout=timeout)

    def status(self, timeout: float = 5.0) -> dict:
        return self.request("status", timeout=timeout)

    def generate(
        self,
        image: bytes,
        params: dict[str, Any] | None = None,
        filename: str = "image.png",
        timeout: float = 10.0,
        idempotency_key: str | None = None,
    ) -> str:
        """Queue a generation. Resending with the same `idempotency_key` after a timeout
        returns the job the first request made instead of a second one."""
        content: dict[str, Any] = {"params": params or {}, "filename": filename}
        if idempotency_key is not None:
            content["idempotency_key"] = idempotency_key
        reply = self.request("generate", content, [image], timeout=timeout)
        return reply["job_id"]

    def texture(
        self,
        image: bytes,
        mesh: bytes,
        mesh_format: str,
        params: dict[str, Any] | None = None,
        filename: str = "image.png",
        timeout: float = 10.0,
    ) -> str:
        reply = self.request(
            "texture",
            {"params": params or {}, "filename": filename, "mesh_format": mesh_format},
            [image, mesh],
            timeout=timeout,
        )
        return reply["job_id"]

    def reexport(self, job_id: str, params: dict[str, Any], timeout: float = 5.0) -> str:
        return self.request("reexport", {"job_id": job_id, "params": params}, timeout=timeout)[
            "job_id"
        ]

    def cancel(self, job_id: str, timeout: float = 5.0) -> dict:
        return self.request("cancel", {"job_id": job_id}, timeout=timeout)

    def jobs(self, limit: int = 50, timeout: float = 5.0, before: str | None = None) -> dict:
        """One page of the history, newest first; the reply's `next` is the `before` of the
        next page (None after the last)."""
        content: dict[str, Any] = {"limit": limit}
        if before is not None:
            content["before"] = before
        return self.request("jobs", content, timeout=timeout)

    def job(self, job_id: str, timeout: float = 5.0) -> dict:
        return self.request("job", {"job_id": job_id}, timeout=timeout)

    def stats(self, timeout: float = 5.0) -> dict:
        return self.request("stats", timeout=timeout)

    def doctor(self, timeout: float = 60.0) -> dict:
        return self.request("doctor", timeout=timeout)

    def shutdown(self, reason: str = "", timeout: float = 5.0) -> dict:
        return self.request("shutdown", {"reason": reason}, timeout=timeout)

    def fetch(
        self,
        job_id: str,
        name: str,
        offset: int,
        length: int = protocol.FETCH_DEFAULT,
        timeout: float = 30.0,
    ) -> tuple[dict, bytes]:
        """One chunk of one file of a job: (reply content, bytes)."""
        msg_id = self.send(
            "fetch", {"job_id": job_id, "name": name, "offset": offset, "length": length}
        )
        reply = self.wait_reply(msg_id, timeout, what="fetch")
        content = _unwrap(reply)
        return content, fetched_chunk(content, reply.buffers)

    def download(
        self,
        job_id: str,
        name: str = "result.glb",
        chunk: int = protocol.FETCH_DEFAULT,
        timeout: float = 30.0,
        max_bytes: int = MAX_DOWNLOAD,
    ) -> bytes:
        """A job's file as bytes, in chunks of at most `chunk` bytes (each within `timeout`).
        Blocking: for scripts; the add-on fetches chunk by chunk from its tick."""
        parts: list[bytes] = []
        offset = 0
        size: int | None = None
        while True:
            content, data = self.fetch(job_id, name, offset, chunk, timeout)
            size = check_chunk(content, data, name, size, max_bytes)
            parts.append(data)
            offset += len(data)
            if content["eof"]:
                break
        blob = b"".join(parts)
        if len(blob) != size:
            raise BackendError(ErrorCode.INTERNAL, f"{name}: got {len(blob)} of {size} bytes")
        return blob

    def events(self, timeout: float = 1.0) -> Iterator[protocol.Message]:
        """Yield messages until none arrives for `timeout` seconds."""
        while True:
            batch = self.poll(timeout)
            if not batch:
                return
            yield from batch

    def wait_for_job(
        self,
        job_id: str,
        timeout: float,
        on_event: Callable[[protocol.Message], None] | None = None,
    ) -> dict:
        """Block until the job ends (for scripts and `blender -b`). Returns the final event
        content with "event" added; checks the store if an event was missed."""
        deadline = self.clock() + timeout
        next_check = self.clock() + 2.0
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise ClientTimeout(f"job {job_id}", timeout)
            for message in self.poll(min(remaining, 0.5)):
                if message.content.get("job_id") != job_id:
                    continue
                if on_event is not None:
                    on_event(message)
                if message.msg_type in TERMINAL_EVENTS:
                    return dict(message.content, event=message.msg_type)
            if self.clock() >= next_check:  # PUB/SUB may drop: the job store is the truth
                next_check = self.clock() + 2.0
                record = self.job(job_id, timeout=min(5.0, max(0.5, remaining)))["job"]
                if record["state"] in settings.TERMINAL_STATES:
                    return _event_from_record(record)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        pending, self._pending = self._pending, {}
        for request in pending.values():
            request.fail(_closed_error(request.msg_type))
        if self.monitor is not None:
            self.shell.disable_monitor()
            self.monitor.close(0)
        self.shell.close(0)
        if self.iopub is not None:
            self.iopub.close(0)
        if self._own_context:
            self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unwrap(reply: protocol.Message) -> dict:
    return _unwrap_content(reply.content)


def _unwrap_content(content: dict) -> dict:
    if content.get("ok") is True:
        return content
    error = content.get("error") if isinstance(content.get("error"), dict) else {}
    raise BackendError.from_dict(error or {"code": "internal", "message": "malformed reply"})


def fetched_chunk(content: dict, buffers: Sequence[bytes]) -> bytes:
    """The bytes of a `fetch` reply (its one buffer, as long as it says)."""
    if len(buffers) != 1 or len(buffers[0]) != content.get("length"):
        raise BackendError(ErrorCode.BAD_MESSAGE, "a fetch reply without its chunk")
    return bytes(buffers[0])


def check_chunk(
    content: dict, data: bytes, name: str, size: int | None, max_bytes: int = MAX_DOWNLOAD
) -> int:
    """The file's size after one more chunk of a download that knew `size` (None at first);
    raises when the file is too large, changed, or a chunk came empty before the end."""
    now = content.get("size")
    if not isinstance(now, int) or now < 0:
        raise BackendError(ErrorCode.BAD_MESSAGE, f"{name}: a fetch reply without its size")
    if size is None and now > max_bytes:
        raise BackendError(ErrorCode.TOO_LARGE, f"{name} is {now} bytes")
    if size is not None and now != size:  # results are renamed into place, never rewritten
        raise BackendError(ErrorCode.INTERNAL, f"{name} changed during the download")
    if not data and not content.get("eof"):
        raise BackendError(ErrorCode.INTERNAL, f"{name}: empty chunk before the end")
    return now


def _closed_error(msg_type: str) -> BackendError:
    return BackendError(
        ErrorCode.BACKEND_DIED,
        f"the connection to the backend closed before it answered {msg_type}",
        "The backend stopped or was replaced; try again once it is running.",
    )


def _event_from_record(record: dict) -> dict:
    """A missed final event, rebuilt from the `job` record on the wire: the same fields as
    `jobs.outcome_event` (which the client, imported by the add-on, does not import)."""
    state = record["state"]
    result = record.get("result") or {}
    if state == "done":
        return {
            "event": "job_done",
            "job_id": record["job_id"],
            "glb_path": result.get("glb_path"),
            "mesh_stats": result.get("mesh_stats"),
            "oom_quality_degradation_level": record.get("level") or 0,
            "degraded": bool(record.get("level")),
            "degraded_reason": result.get("degraded_reason"),
            "final_params": record.get("final_params"),
            "warnings": result.get("warnings") or [],
            "seconds": result.get("seconds"),
        }
    if state == "failed":
        return {"event": "job_failed", "job_id": record["job_id"], **(record.get("error") or {})}
    return {"event": "job_cancelled", "job_id": record["job_id"]}
