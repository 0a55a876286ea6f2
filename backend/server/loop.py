"""The backend server's I/O shell: a ZeroMQ control loop that only routes. It owns the sockets
(ROUTER for requests, PUB for events, an inproc PULL that other threads push events and late
replies into), checks each request's envelope and schema, and hands it to its handler where
`handlers.ROUTES` says: on the loop for answers from memory, else on a lane thread whose reply
comes back through the inproc channel. State and job threads are `workers.Backend`'s."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from .. import __version__, settings
from ..checks.images import ImageLimits
from ..errors import BackendError, ErrorCode, ProtocolError
from ..procutil import pid_alive
from ..wire import protocol
from . import reader
from .handlers import ROUTES, Lane, Route
from .workers import Backend, BackendState, ThreadLane

log = logging.getLogger(__name__)

EVENTS_URL = "inproc://backend-events"
EVENT, REPLY = b"event", b"reply"  # what an inproc message carries: frames for PUB or ROUTER

__all__ = ["BackendState", "Server", "ServerConfig"]


@dataclass
class ServerConfig:
    connection_file: Path
    output_dir: Path
    state_dir: Path | None = None
    engine: str = "preview"
    engine_options: dict[str, str] = field(default_factory=dict)
    queue_depth: int = settings.QUEUE_DEPTH
    max_concurrent: int = settings.MAX_CONCURRENT
    heartbeat_interval: float = settings.HEARTBEAT_INTERVAL
    min_free_disk: int = settings.MIN_FREE_DISK
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    parent_pid: int | None = None  # exit when this process dies (no orphans)
    recover: bool = True  # rerun jobs a dead backend left behind
    vram_cap_bytes: int | None = None  # emulate a smaller card
    shutdown_grace: float = settings.SHUTDOWN_GRACE  # for the running job to reach a checkpoint
    # A cancelled job in a job process that has not ended by then is stopped with its process.
    job_cancel_grace: float = settings.JOB_PROCESS_CANCEL_GRACE
    standby: bool = False  # load the engine but run nothing until an `activate` request
    # Freeze start-up objects out of the collector (heap.settle). Off only when the server
    # shares its process with other code, as in the in-thread test server.
    settle_heap: bool = True
    # Answer `jobs`, `job` and `stats` in a reader process (reader.py); off: on reader threads.
    reader_process: bool = True
    reader_timeout: float = settings.READER_TIMEOUT

    def __post_init__(self) -> None:
        # Absolute once, here: nothing below depends on the working directory.
        self.connection_file = Path.cwd() / os.fsdecode(self.connection_file)
        self.output_dir = Path.cwd() / os.fsdecode(self.output_dir)
        self.state_dir = (
            Path.cwd() / os.fsdecode(self.state_dir)
            if self.state_dir
            else self.output_dir / "state"
        )


class Server:
    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self.key = protocol.new_key()
        self.session = protocol.Session(self.key, clock=clock)
        self.ctx = zmq.Context()
        self._local = threading.local()  # each thread's PUSH socket into the loop
        self.backend = Backend(config, self._emit, self.session.session_id, clock)
        self.engine = self.backend.engine
        self.shell: zmq.Socket | None = None
        self.iopub: zmq.Socket | None = None
        self.events_in: zmq.Socket | None = None
        self.connection: protocol.ConnectionInfo | None = None
        self._lanes: dict[Lane, ThreadLane] = {}
        self.reader: reader.ReaderProcess | None = None

    @property
    def exit_code(self) -> int:
        return self.backend.exit_code

    # -- lifecycle -------------------------------------------------------------------

    def bind(self) -> protocol.ConnectionInfo:
        """Bind on loopback with ports chosen at bind time, then write the connection file."""
        self.shell = self.ctx.socket(zmq.ROUTER)
        self.shell.setsockopt(zmq.LINGER, 0)
        self.shell.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_BUFFER_FRAME + (1 << 20))
        self.shell.setsockopt(zmq.ROUTER_MANDATORY, 0)
        shell_port = self.shell.bind_to_random_port("tcp://127.0.0.1")
        self.iopub = self.ctx.socket(zmq.PUB)
        self.iopub.setsockopt(zmq.LINGER, 1000)
        # per subscriber; a slow one loses events, not memory
        self.iopub.setsockopt(zmq.SNDHWM, 1000)
        iopub_port = self.iopub.bind_to_random_port("tcp://127.0.0.1")
        self.events_in = self.ctx.socket(zmq.PULL)
        self.events_in.bind(EVENTS_URL)
        self.connection = protocol.ConnectionInfo(
            shell_port=shell_port,
            iopub_port=iopub_port,
            key=self.key,
            session=self.session.session_id,
            pid=os.getpid(),
            engine=self.engine.name,
            extra={
                "output_dir": str(self.config.output_dir.resolve()),
                "state_dir": str(self.config.state_dir.resolve()),
                "backend_version": __version__,
            },
        )
        protocol.write_connection_file(self.config.connection_file, self.connection)
        return self.connection

    def claim(self) -> None:
        """Take the output folder (its locks) before binding; raises OutputLocked when another
        process owns it. A standby claims it when activated."""
        self.backend.claim()

    def start(self) -> None:
        self.claim()
        if self.shell is None:
            self.bind()
        # INTAKE is one thread: jobs are made, and keys checked, in the order requests came.
        self._lanes = {Lane.INTAKE: ThreadLane("intake", 1), Lane.READER: ThreadLane("reader", 2)}
        if self.config.reader_process and self.reader is None:
            self.reader = reader.ReaderProcess(
                self.ctx,
                self.config.output_dir,
                self.config.state_dir,
                timeout=self.config.reader_timeout,
            )
            self.reader.start()
            self.backend.reader_figures = self.reader.figures
        self.backend.start()

    def serve_forever(self) -> int:
        b = self.backend
        try:
            self.start()  # inside: a start that fails removes the connection file too
            poller = zmq.Poller()
            poller.register(self.shell, zmq.POLLIN)
            poller.register(self.events_in, zmq.POLLIN)
            if self.reader is not None:
                self.reader.attach(poller)
            next_beat = 0.0
            while not (b.stopping.is_set() and not b.jobs_still_running()):
                for sock, _ in poller.poll(timeout=100):
                    if sock is self.shell:
                        self._drain_shell()
                    elif sock is self.events_in:
                        self._drain_events()
                    else:
                        self._drain_reader()
                now = time.monotonic()
                if self.reader is not None:
                    for lost in self.reader.tick(now, restart=not b.stopping.is_set()):
                        # Its reader died or hung: answered here, as without a reader.
                        route = ROUTES[lost.message.msg_type]
                        self._dispatch(route, lost.identity, lost.message)
                if now >= next_beat:
                    next_beat = now + self.config.heartbeat_interval
                    self._heartbeat()
                    self._watch_parent()
                    if b.active.is_set() and (b.store.problem or b.store.pending()):
                        b.store.recover()  # a full, read-only or deleted folder came back
            self._drain_events()
        finally:
            self._close()
        return self.exit_code

    def request_stop(
        self,
        reason: str,
        exit_code: int = settings.EXIT_OK,
        *,
        grace: float | None = None,
        escalate: bool = False,
    ) -> None:
        """Thread- and signal-safe: the loop ends once running jobs have requeued themselves
        or `grace` has passed (at once when `escalate` follows an earlier stop)."""
        self.backend.request_stop(reason, exit_code, grace=grace, escalate=escalate)

    def _close(self) -> None:
        self._publish("backend_state", {"state": "stopped", "reason": self.backend.state_reason})
        if self.reader is not None:
            self.reader.close()  # it also exits by itself when this process is gone
        self.backend.close()  # the job processes, likewise
        time.sleep(0.05)  # let the last events leave
        for sock in (self.shell, self.iopub, self.events_in):
            if sock is not None:
                sock.close(linger=200)
        self._remove_connection_file()
        self.backend.store.release()
        # destroy() also closes the per-thread PUSH sockets, which term() would wait on forever.
        self.ctx.destroy(linger=200)

    def _remove_connection_file(self) -> None:
        try:
            current = protocol.read_connection_file(self.config.connection_file)
        except BackendError:
            return
        if current.session == self.session.session_id:  # a newer backend may own it now
            try:
                self.config.connection_file.unlink()
            except OSError:
                pass

    def _watch_parent(self) -> None:
        pid = self.config.parent_pid
        if pid and not pid_alive(pid):
            log.warning("parent process %s is gone; shutting down", pid)
            self.request_stop("parent process exited")

    # -- events ------------------------------------------------------------------------

    def _emit(self, msg_type: str, content: dict[str, Any], parent: dict | None = None) -> None:
        """Thread-safe: publish an event. The calling thread encodes and signs it; the loop
        only forwards the frames."""
        try:
            frames = self._frames(msg_type, content, parent)
        except ValueError:  # NaN or infinity in an event: a bug, never a reason to stop
            log.exception("event %s not encodable", msg_type)
            return
        self._push([EVENT, msg_type.encode(), *frames])

    def _post_reply(
        self, identity: bytes, request_type: str, content: dict, parent: dict, buffers=()
    ) -> None:
        """Thread-safe: a reply made off the loop (with any binary buffers, as `fetch`'s
        chunk), encoded and signed here, sent by the loop."""
        reply_type = protocol.reply_type(request_type)
        try:
            # Handlers reply in plain JSON types: encoded once (encoding holds the GIL the
            # loop needs); buffers are signed as they are, never copied into JSON.
            frames = self.session.serialize(self.session.msg(reply_type, content, parent, buffers))
        except (TypeError, ValueError) as exc:
            log.exception("reply to %s not encodable", request_type)
            error = BackendError(ErrorCode.INTERNAL, f"reply not encodable: {exc}")
            frames = self._frames(reply_type, protocol.error_reply(error), parent)
        self._push([REPLY, identity, *frames])

    def _frames(self, msg_type: str, content: dict[str, Any], parent: dict | None) -> list[bytes]:
        # Paths and numpy scalars in the runner's events become text, as they always did.
        plain = json.loads(json.dumps(content, default=str))
        return self.session.serialize(self.session.msg(msg_type, plain, parent))

    def _push(self, frames: list[bytes]) -> None:
        """Every thread hands frames to the loop through its own inproc PUSH socket (no
        ZeroMQ socket is shared between threads)."""
        try:
            sock = getattr(self._local, "push", None)
            if sock is None:
                sock = self.ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(EVENTS_URL)
                self._local.push = sock
            sock.send_multipart(frames)
        except zmq.ZMQError as exc:  # the context is gone: the server is stopping
            log.debug("%s dropped: %s", frames[0].decode(), exc)

    def _drain_events(self) -> None:
        while True:
            try:
                frames = self.events_in.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, rest = frames[0], frames[1:]
            sock, what = (self.shell, "reply") if kind == REPLY else (self.iopub, "event")
            try:
                sock.send_multipart(rest, zmq.NOBLOCK)  # [identity or topic, *envelope]
            except zmq.ZMQError as exc:
                log.warning("%s %s not sent: %s", what, rest[0][:40], exc)

    def _publish(self, msg_type: str, content: dict[str, Any], parent: dict | None = None) -> None:
        if self.iopub is None:  # a start that failed before binding
            return
        message = self.session.msg(msg_type, content, parent)
        frames = self.session.serialize(message)
        try:
            self.iopub.send_multipart([msg_type.encode(), *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("event %s not published: %s", msg_type, exc)

    def _heartbeat(self) -> None:
        b = self.backend
        self._publish(
            "heartbeat",
            {
                "state": b.current_state().value,
                "session": self.session.session_id,
                "pid": os.getpid(),
                "queue": len(b.queue),
                "running": list(b.running),
            },
        )

    # -- requests ----------------------------------------------------------------------

    def _drain_shell(self) -> None:
        while True:
            try:
                received = self.shell.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # The envelope as bytes; buffers as views of ZeroMQ's own memory: a message is
            # hashed before anything is copied (an unsigned one, never).
            frames = [f.bytes for f in received[:6]] + [f.buffer for f in received[6:]]
            try:
                self._route(frames)
            except Exception:  # last line of defence: no message may stop the control loop
                log.exception("message dropped: handling it failed")
                self._reject(ErrorCode.INTERNAL)

    def _route(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self._reject(ErrorCode.BAD_MESSAGE)
            return
        identity, body = frames[0], frames[1:]
        if sum(map(len, body[5:])) > settings.LOOP_VERIFY_BYTES:
            # Images and meshes (any request carrying them is a new job, an intake request):
            # checked on the intake lane, where hashing them lets go of the GIL.
            self._lanes[Lane.INTAKE].submit(lambda: self._route_large(identity, body))
            return
        message = self._verified(identity, body, self._send_reply)
        if message is None:
            return
        route = ROUTES[message.msg_type]
        if route.lane is Lane.LOOP:
            content, buffers = self._answer(route, message)
            self._send_reply(identity, message.msg_type, content, message.header, buffers)
            return
        # The content frame (body[4]) as received goes to the reader process: nothing is
        # encoded here.
        process = self.reader if route.reader_process else None
        if process is not None and process.forward(
            identity, message, body[4], self._reader_overlay(message)
        ):
            return
        self._dispatch(route, identity, message)

    def _verified(
        self, identity: bytes, body: list[bytes], reply: Callable[..., None]
    ) -> protocol.Message | None:
        """The request, signature, date and fields checked, and counted; None when refused
        (answered with `error_reply` through `reply`)."""
        try:
            message = self.session.deserialize(body)
            protocol.check_request(message)
        except ProtocolError as exc:
            self._reject(exc.code)
            # The request's header when it could be read, so a client can match the refusal.
            parent = protocol.readable_header(body)
            reply(identity, "error", protocol.error_reply(exc), parent)
            return None
        self.backend.count(self.backend.counters, message.msg_type)
        return message

    def _route_large(self, identity: bytes, body: list[bytes]) -> None:
        """A request with large buffers, on the intake lane: checked, then answered here."""
        message = self._verified(identity, body, self._post_reply)
        if message is None:
            return
        # Only requests on the intake lane take buffers (protocol.REQUESTS; a test holds it):
        # answered here, in their order with the others.
        route = ROUTES[message.msg_type]
        content, buffers = self._answer(route, message)
        self._post_reply(identity, message.msg_type, content, message.header, buffers)

    def _dispatch(self, route: Route, identity: bytes, message: protocol.Message) -> None:
        """Run a request on its lane (or thread); its reply comes back through the loop."""

        def work() -> None:
            content, buffers = self._answer(route, message)
            self._post_reply(identity, message.msg_type, content, message.header, buffers)

        if route.lane is Lane.OWN:
            threading.Thread(target=work, name=f"request-{message.msg_type}", daemon=True).start()
        else:
            self._lanes[route.lane].submit(work)

    def _reader_overlay(self, message: protocol.Message) -> bytes:
        """What the reader process needs of this process's memory to answer as the handlers
        would: the outcomes the store could not write yet (usually none), and for `stats` the
        request counters and uptime."""
        b = self.backend
        counts = None
        if message.msg_type == "stats":
            requests, rejected = b.counts()
            uptime = round(time.monotonic() - b.started_at, 3)
            counts = {"requests": requests, "rejected": rejected, "uptime": uptime}
        return reader.overlay(b.store.unrecorded(), counts)

    def _drain_reader(self) -> None:
        """Send the reader process's answers: content it encoded, signed here as it is."""
        for request, content in self.reader.replies():
            reply_type = protocol.reply_type(request.message.msg_type)
            parent = request.message.header
            try:
                frames = self.session.serialize_encoded(reply_type, content, parent)
            except ValueError:
                log.error("the reader's reply to %s is not a JSON object", reply_type)
                error = BackendError(ErrorCode.INTERNAL, "the reader's reply was not JSON")
                frames = self._frames(reply_type, protocol.error_reply(error), parent)
            try:
                self.shell.send_multipart([request.identity, *frames], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("reply to %s dropped: %s", request.message.msg_type, exc)

    def _answer(self, route, message: protocol.Message) -> tuple[dict, list[bytes]]:
        """(reply content, binary buffers): a handler returns its content, or both."""
        try:
            reply = route.handler(self.backend, message)
        except BackendError as exc:
            return protocol.error_reply(exc), []
        except Exception as exc:  # nothing a client sends may take the backend down
            log.exception("handler %s failed", message.msg_type)
            return protocol.error_reply(BackendError(ErrorCode.INTERNAL, f"{exc!r}")), []
        if isinstance(reply, tuple):
            content, buffers = reply
            return content, list(buffers)
        return reply, []

    def _reject(self, code: ErrorCode) -> None:
        self.backend.count(self.backend.rejected, code.value)

    def _send_reply(
        self, identity: bytes, request_type: str, content: dict, parent: dict, buffers=()
    ) -> None:
        message = self.session.msg(protocol.reply_type(request_type), content, parent, buffers)
        try:
            self.shell.send_multipart([identity, *self.session.serialize(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("reply to %s dropped: %s", request_type, exc)
