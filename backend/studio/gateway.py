"""The studio gateway: the local backend's protocol over CURVE-encrypted ZeroMQ, for artists
whose keys are in the authorized-keys folder; jobs go to GPU workers through Celery.

One control loop owns the sockets (ROUTER for requests, PUB for events), like the local
server. A ZAP handler (`zmq.auth`'s ThreadAuthenticator) refuses unknown keys during the
CURVE handshake, before any message is read. Every message is also checked against the
current authorized keys (a removed artist is refused at once) and the envelope's HMAC.
A thread reads the workers' events from Redis and hands them to the loop. The job requests
themselves are answered by `jobdesk.py`; this module answers hello, ping, status and stats.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from .. import __version__, settings
from ..checks import images
from ..errors import BackendError, ErrorCode, ProtocolError
from ..store.jobs import JobStore
from ..wire import curvekeys, protocol
from .coord import Coordinator, decode_event
from .dispatch import make_celery
from .jobdesk import REQUESTS, JobDesk

log = logging.getLogger(__name__)

EVENTS_URL = "inproc://gateway-events"
ZAP_DOMAIN = b"trellis2"


@dataclass
class GatewayConfig:
    listen: str  # tcp://HOST:PORT (requests); events on PORT + 1
    home: Path  # keys (curvekeys.py)
    broker: str  # redis://...
    store: Path  # the shared job store
    queue_depth: int = settings.GATEWAY_QUEUE_DEPTH  # jobs waiting for a worker before `busy`
    min_free_disk: int = settings.MIN_FREE_DISK
    heartbeat_interval: float = 1.0
    image_limits: images.ImageLimits = field(default_factory=images.ImageLimits)

    def __post_init__(self) -> None:
        self.home = Path(self.home)
        self.store = Path(self.store)


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.keys = curvekeys.ensure_home(config.home)
        self.session = protocol.Session(self.keys.signing_key)
        self.coord = Coordinator(config.broker)
        self.desk = JobDesk(
            JobStore(config.store),
            self.coord,
            make_celery(config.broker),
            self._publish,
            queue_depth=config.queue_depth,
            min_free_disk=config.min_free_disk,
            image_limits=config.image_limits,
        )
        self.started_at = time.monotonic()
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.auth_failures = 0
        self.users: dict[str, str] = {}
        self._users_stamp: tuple = ()
        self._waiting = 0  # jobs waiting for a worker, as of the Redis thread's last look
        self._stopping = threading.Event()
        self.ctx = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        self.shell: zmq.Socket | None = None
        self.iopub: zmq.Socket | None = None
        self.events_in: zmq.Socket | None = None
        self.monitors: list[zmq.Socket] = []
        self._thread: threading.Thread | None = None

    # -- sockets ----------------------------------------------------------------------------

    def bind(self) -> dict[str, Any]:
        """Start the authenticator, bind both sockets with CURVE, write gateway.json."""
        self.auth = ThreadAuthenticator(
            self.ctx, log=logging.getLogger("backend.studio.gateway.zap")
        )
        self.auth.start()
        self._reload_users(force=True)
        shell_url = self.config.listen
        events_url = curvekeys.events_endpoint(shell_url)
        self.shell = self._curve_socket(zmq.ROUTER)
        self.shell.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_BUFFER_FRAME + (1 << 20))
        self.shell.bind(shell_url)
        self.iopub = self._curve_socket(zmq.PUB)
        self.iopub.setsockopt(zmq.SNDHWM, 1000)  # per subscriber: a slow one loses events
        self.iopub.bind(events_url)
        for sock in (self.shell, self.iopub):
            self.monitors.append(sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH))
        self.events_in = self.ctx.socket(zmq.PULL)
        self.events_in.bind(EVENTS_URL)
        info = {
            "shell": shell_url,
            "events": events_url,
            "pid": os.getpid(),
            "session": self.session.session_id,
            "server_key": self.keys.public.decode("ascii"),
            "store": str(self.config.store.resolve()),
            "backend_version": __version__,
        }
        curvekeys.write_gateway_info(self.config.home, info)
        return info

    def _curve_socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 500)
        sock.curve_server = True
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.zap_domain = ZAP_DOMAIN
        # Without a ZAP handler libzmq would let any CURVE key in: refuse instead.
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        return sock

    def _reload_users(self, force: bool = False) -> None:
        stamp = curvekeys.folder_stamp(self.config.home)
        if not force and stamp == self._users_stamp:
            return
        self._users_stamp = stamp
        self.users = curvekeys.authorized_users(self.config.home)
        self.auth.configure_curve(
            domain=ZAP_DOMAIN.decode(), location=str(curvekeys.authorized_dir(self.config.home))
        )
        log.info("authorized users: %s", ", ".join(sorted(self.users.values())) or "(none)")

    # -- the loop ------------------------------------------------------------------------------

    def serve_forever(self) -> int:
        if self.shell is None:
            self.bind()
        try:  # know the workers before the first request (the thread refreshes the list)
            self.desk.workers = self.coord.workers()
        except Exception as exc:
            log.warning("cannot list the workers yet: %s", exc)
        self.desk.reconcile()
        self._thread = threading.Thread(target=self._redis_loop, name="redis", daemon=True)
        self._thread.start()
        poller = zmq.Poller()
        for sock in (self.shell, self.events_in, *self.monitors):
            poller.register(sock, zmq.POLLIN)
        next_beat = 0.0
        try:
            while not self._stopping.is_set():
                for sock, _ in poller.poll(timeout=100):
                    if sock is self.shell:
                        self._drain_shell()
                    elif sock is self.events_in:
                        self._drain_events()
                    else:
                        self._drain_monitor(sock)
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.config.heartbeat_interval
                    self._reload_users()
                    self._heartbeat()
        finally:
            self._close()
        return 0

    def request_stop(self) -> None:
        self._stopping.set()

    def _close(self) -> None:
        for sock in (self.shell, self.iopub, self.events_in, *self.monitors):
            if sock is not None:
                sock.close(linger=200)
        if self.auth is not None:
            self.auth.stop()
        if self._thread is not None:
            self._thread.join(timeout=3.0)
        self.ctx.destroy(linger=200)
        self.coord.close()

    def _drain_monitor(self, sock: zmq.Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.auth_failures += 1
                log.warning("refused a connection with an unknown key from %s", event["endpoint"])

    def _drain_shell(self) -> None:
        while True:
            try:
                frames = self.shell.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._handle(frames)
            except Exception:  # last line of defence: no message may stop the loop
                log.exception("message dropped: handling it failed")
                self.rejected[ErrorCode.INTERNAL.value] += 1

    def _handle(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            self.rejected[ErrorCode.BAD_MESSAGE.value] += 1
            return
        identity = frames[0].bytes
        try:
            message = self.session.deserialize([f.bytes for f in frames[1:]])
            protocol.check_request(message, REQUESTS)
        except ProtocolError as exc:
            self.rejected[exc.code.value] += 1
            self._reply(identity, "error", protocol.error_reply(exc), {})
            return
        user = self.users.get(frames[1].get("User-Id") or "")
        if user is None:  # authorized when it connected, removed since
            self.rejected["revoked"] += 1
            error = BackendError(
                ErrorCode.BAD_SIGNATURE,
                "this key is no longer authorized on the gateway",
                "Ask the studio admin for a new connection string.",
            )
            self._reply(identity, message.msg_type, protocol.error_reply(error), message.header)
            return
        self.counters[message.msg_type] += 1
        buffers: list[bytes] = []
        try:
            handler = getattr(self, f"_on_{message.msg_type}", None) or getattr(
                self.desk, f"on_{message.msg_type}"
            )
            content = handler(message, user, buffers)
        except BackendError as exc:
            content = protocol.error_reply(exc)
        except Exception as exc:  # nothing an artist sends may take the gateway down
            log.exception("handler %s failed", message.msg_type)
            content = protocol.error_reply(BackendError(ErrorCode.INTERNAL, repr(exc)))
        self._reply(identity, message.msg_type, content, message.header, buffers)

    def _reply(self, identity, request_type, content, parent, buffers=()) -> None:
        message = self.session.msg(protocol.reply_type(request_type), content, parent, buffers)
        try:
            self.shell.send_multipart([identity, *self.session.serialize(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("reply to %s dropped: %s", request_type, exc)

    def _publish(self, msg_type: str, content: dict[str, Any], parent: dict | None = None) -> None:
        frames = self.session.serialize(self.session.msg(msg_type, content, parent))
        try:
            self.iopub.send_multipart([msg_type.encode(), *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("event %s not published: %s", msg_type, exc)

    def _drain_events(self) -> None:
        while True:
            try:
                raw = self.events_in.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = decode_event(raw)
            if event is not None:
                self._publish(*event)

    def _heartbeat(self) -> None:
        self._publish(
            "heartbeat",
            {
                "state": self.desk.state()[0],
                "session": self.session.session_id,
                "pid": os.getpid(),
                "queue": self._waiting,
                "running": self.desk.running(),
            },
        )

    # -- the Redis thread -------------------------------------------------------------------------

    def _redis_loop(self) -> None:
        """Workers' events from Redis to the loop (through inproc); the worker list, each
        second. Reconnects after Redis goes away."""
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(EVENTS_URL)
        pubsub = None
        next_scan = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    if pubsub is None:
                        pubsub = self.coord.subscribe_events()
                    message = pubsub.get_message(timeout=0.2)
                    if message is not None and message.get("type") == "message":
                        push.send(message["data"], zmq.NOBLOCK)
                    if time.monotonic() >= next_scan:
                        next_scan = time.monotonic() + 1.0
                        self.desk.workers = self.coord.workers()
                        self._waiting = self.coord.pending_count()
                except zmq.Again:
                    log.warning("event dropped: the gateway's loop is behind")
                except zmq.ZMQError:
                    return  # the context is closing
                except Exception as exc:  # Redis away: wait, then subscribe again
                    log.warning("redis: %s", exc)
                    pubsub = None
                    self._stopping.wait(1.0)
        finally:
            push.close(0)

    # -- requests ------------------------------------------------------------------------

    def _on_hello(self, message, user, buffers) -> dict:
        state, _ = self.desk.state()
        return protocol.ok_reply(
            protocol_version=protocol.PROTOCOL_VERSION,
            backend_version=__version__,
            session=self.session.session_id,
            pid=os.getpid(),
            state=state,
            engine=self.desk.engine(),
            python=sys.version.split()[0],
            platform=platform.platform(),
            gateway=True,
            user=user,
        )

    def _on_ping(self, message, user, buffers) -> dict:
        return protocol.ok_reply(pong=True, time=time.time())

    def _on_status(self, message, user, buffers) -> dict:
        state, reason = self.desk.state()
        pending = self.desk.pending_ids()
        return protocol.ok_reply(
            state=state,
            reason=reason,
            session=self.session.session_id,
            pid=os.getpid(),
            uptime=round(time.monotonic() - self.started_at, 3),
            engine=self.desk.engine(),
            queue=pending,
            queue_depth=self.config.queue_depth,
            running=self.desk.running(),
            current=None,
            workers=[
                {k: w.get(k) for k in ("name", "host", "gpu", "vram_gb", "state", "job")}
                for w in self.desk.workers
            ],
            gateway=True,
            user=user,
            requests=dict(self.counters),
            rejected=dict(self.rejected),
            auth_failures=self.auth_failures,
        )

    def _on_stats(self, message, user, buffers) -> dict:
        return protocol.ok_reply(
            requests=dict(self.counters),
            rejected=dict(self.rejected),
            auth_failures=self.auth_failures,
            uptime=round(time.monotonic() - self.started_at, 3),
            workers=len(self.desk.workers),
        )


def main(args: Any) -> int:
    """`python -m backend gateway`: serve artists until SIGTERM or Ctrl-C."""
    config = GatewayConfig(
        listen=args.listen,
        home=Path(args.home),
        broker=args.broker,
        store=Path(args.store),
        queue_depth=args.queue_depth,
        min_free_disk=int(args.min_free_disk_mb * 2**20),
    )
    gateway = Gateway(config)
    info = gateway.bind()
    log.info("gateway %s on %s (events %s)", __version__, info["shell"], info["events"])

    def on_signal(signum: int, _frame: Any) -> None:
        gateway.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return gateway.serve_forever()
