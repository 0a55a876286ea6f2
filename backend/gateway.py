"""The studio gateway: the local backend's protocol over CURVE-encrypted ZeroMQ, for artists
whose keys are in the authorized-keys folder; jobs go to GPU workers through Celery.

One control loop owns the sockets (ROUTER for requests, PUB for events), like the local
server. A ZAP handler (`zmq.auth`'s ThreadAuthenticator) refuses unknown keys during the
CURVE handshake, before any message is read. Every message is also checked against the
current authorized keys (a removed artist is refused at once) and the envelope's HMAC.
A thread reads the workers' events from Redis and hands them to the loop. Results leave in
bounded chunks (`fetch`), so an artist's machine never needs the server's disk.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import signal
import stat
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

from . import __version__, curvekeys, protocol, validate
from .coord import Coordinator, decode_event
from .dispatch import TASK_NAME, can_serve, make_celery, need_tier, queue_name, worker_queue
from .errors import BackendError, ErrorCode, ProtocolError
from .jobs import JobRecord, JobStore
from .params import parse_params
from .runner import check_disk
from .server import (
    EXPORT_PARAMS,
    MAX_MESH_BYTES,
    MESH_FORMATS,
    _clean_filename,
    _image_ext,
    _summary,
    _thumbnail,
)

log = logging.getLogger(__name__)

EVENTS_URL = "inproc://gateway-events"
ZAP_DOMAIN = b"trellis2"
FETCH_DEFAULT = 1 << 20  # bytes per `fetch` chunk unless asked for less
FETCH_MAX = 4 << 20  # the most one reply carries
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")
MAX_VRAM_GB = 1024

_LOCAL = protocol.REQUESTS
# What an artist may ask the gateway: the local requests that make sense remotely, a card
# size for generate/texture, and `fetch` for result files (docs/protocol.md, "Gateway").
REQUESTS: dict[str, dict[str, Any]] = {
    "hello": _LOCAL["hello"],
    "ping": _LOCAL["ping"],
    "status": _LOCAL["status"],
    "generate": {
        "fields": {**_LOCAL["generate"]["fields"], "min_vram_gb": (int, False)},
        "buffers": _LOCAL["generate"]["buffers"],
    },
    "texture": {
        "fields": {**_LOCAL["texture"]["fields"], "min_vram_gb": (int, False)},
        "buffers": _LOCAL["texture"]["buffers"],
    },
    "reexport": _LOCAL["reexport"],
    "cancel": _LOCAL["cancel"],
    "jobs": _LOCAL["jobs"],
    "job": _LOCAL["job"],
    "stats": _LOCAL["stats"],
    "fetch": {
        "fields": {
            "job_id": (str, True),
            "name": (str, True),
            "offset": (int, False),
            "length": (int, False),
        },
        "buffers": (0, 0),
    },
}


@dataclass
class GatewayConfig:
    listen: str  # tcp://HOST:PORT (requests); events on PORT + 1
    home: Path  # keys (curvekeys.py)
    broker: str  # redis://...
    store: Path  # the shared job store
    queue_depth: int = 32  # jobs waiting for a worker before `busy`
    min_free_disk: int = 1 << 30
    heartbeat_interval: float = 1.0
    image_limits: validate.ImageLimits = field(default_factory=validate.ImageLimits)

    def __post_init__(self) -> None:
        self.home = Path(self.home)
        self.store = Path(self.store)


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.keys = curvekeys.ensure_home(config.home)
        self.session = protocol.Session(self.keys.signing_key)
        self.store = JobStore(config.store)
        self.coord = Coordinator(config.broker)
        self.celery = make_celery(config.broker)
        self.started_at = time.monotonic()
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.auth_failures = 0
        self.users: dict[str, str] = {}
        self._users_stamp: tuple = ()
        self._workers: list[dict[str, Any]] = []  # refreshed by the Redis thread
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
        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("backend.gateway.zap"))
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
            self._workers = self.coord.workers()
        except Exception as exc:
            log.warning("cannot list the workers yet: %s", exc)
        self._reconcile()
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
            content = getattr(self, f"_on_{message.msg_type}")(message, user, buffers)
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
                "state": self._state()[0],
                "session": self.session.session_id,
                "pid": os.getpid(),
                "queue": self._waiting,
                "running": self._running(),
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
                        self._workers = self.coord.workers()
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

    # -- views -------------------------------------------------------------------------------------

    def _state(self) -> tuple[str, str]:
        if not self._workers:
            return "starting", "no GPU worker is running"
        return "ready", f"{len(self._workers)} GPU worker(s)"

    def _engine(self) -> dict[str, Any]:
        for worker in self._workers:
            if worker.get("engine"):
                return dict(worker["engine"])
        return {"name": "remote", "label": "Studio server (no worker yet)", "capabilities": []}

    def _running(self) -> list[str]:
        return [w["job"] for w in self._workers if w.get("job")]

    def _pending_ids(self) -> list[str]:
        try:
            return self.coord.pending()
        except Exception:  # Redis away: status still answers
            return []

    # -- requests -------------------------------------------------------------------------------

    def _on_hello(self, message, user, buffers) -> dict:
        state, _ = self._state()
        return protocol.ok_reply(
            protocol_version=protocol.PROTOCOL_VERSION,
            backend_version=__version__,
            session=self.session.session_id,
            pid=os.getpid(),
            state=state,
            engine=self._engine(),
            python=sys.version.split()[0],
            platform=platform.platform(),
            gateway=True,
            user=user,
        )

    def _on_ping(self, message, user, buffers) -> dict:
        return protocol.ok_reply(pong=True, time=time.time())

    def _on_status(self, message, user, buffers) -> dict:
        state, reason = self._state()
        pending = self._pending_ids()
        return protocol.ok_reply(
            state=state,
            reason=reason,
            session=self.session.session_id,
            pid=os.getpid(),
            uptime=round(time.monotonic() - self.started_at, 3),
            engine=self._engine(),
            queue=pending,
            queue_depth=self.config.queue_depth,
            running=self._running(),
            current=None,
            workers=[
                {k: w.get(k) for k in ("name", "host", "gpu", "vram_gb", "state", "job")}
                for w in self._workers
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
            workers=len(self._workers),
        )

    def _on_generate(self, message, user, buffers) -> dict:
        params = parse_params(message.content.get("params")).to_dict()
        queue = self._admit(message.content.get("min_vram_gb", 0))
        image_bytes = message.buffers[0]
        image = validate.load_image(image_bytes, self.config.image_limits)
        return self._submit(
            "generate",
            params,
            message,
            user,
            queue,
            image=image_bytes,
            image_ext=_image_ext(image_bytes),
            thumbnail=_thumbnail(image),
        )

    def _on_texture(self, message, user, buffers) -> dict:
        params = parse_params(message.content.get("params")).to_dict()
        fmt = message.content["mesh_format"].lower()
        if fmt not in MESH_FORMATS:
            raise BackendError(
                ErrorCode.BAD_MESH_INPUT, f"mesh_format must be one of {MESH_FORMATS}"
            )
        image_bytes, mesh = message.buffers
        if not mesh or len(mesh) > MAX_MESH_BYTES:
            raise BackendError(ErrorCode.BAD_MESH_INPUT, f"mesh of {len(mesh)} bytes")
        queue = self._admit(message.content.get("min_vram_gb", 0))
        image = validate.load_image(image_bytes, self.config.image_limits)
        return self._submit(
            "texture",
            params,
            message,
            user,
            queue,
            image=image_bytes,
            image_ext=_image_ext(image_bytes),
            thumbnail=_thumbnail(image),
            mesh=mesh,
            mesh_ext=fmt,
        )

    def _on_reexport(self, message, user, buffers) -> dict:
        parent = self.store.get(message.content["job_id"])
        if parent.state.value != "done" or parent.kind == "texture":
            raise BackendError(ErrorCode.BAD_PARAMS, f"job {parent.id} has no result to re-export")
        changes = message.content.get("params") or {}
        unknown = sorted(set(changes) - set(EXPORT_PARAMS))
        if unknown:
            raise BackendError(
                ErrorCode.BAD_PARAMS,
                f"re-export can change only {', '.join(EXPORT_PARAMS)}; not {', '.join(unknown)}",
            )
        base = dict(parent.final_params or parent.params)
        base.pop("preset", None)
        preset = (parent.params or {}).get("preset", "balanced")
        params = parse_params({"preset": preset, **base, **changes}).to_dict()
        # The engine's cache (latents) stays on the worker that made the job.
        worker = parent.extra.get("worker")
        if not any(w.get("name") == worker for w in self._workers):
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"the worker that made job {parent.id} ({worker}) is not running",
                "Re-export needs that worker's cache: ask the admin to start it, or generate "
                "the model again.",
            )
        self._admit(0)
        thumb = self.store.path(parent.id, "thumbnail.png")
        return self._submit(
            "reexport",
            params,
            message,
            user,
            worker_queue(worker),
            thumbnail=thumb.read_bytes() if thumb.exists() else None,
            parent=parent.id,
            filename=parent.filename,
            extra={"changes": changes},
        )

    def _admit(self, min_vram_gb: int) -> str:
        """Refuse a job before any work is spent on it; returns its queue."""
        if not 0 <= min_vram_gb <= MAX_VRAM_GB:
            raise BackendError(ErrorCode.BAD_PARAMS, f"min_vram_gb must be 0..{MAX_VRAM_GB}")
        tier = need_tier(min_vram_gb)
        workers = self._workers
        if tier is None or not any(can_serve(w.get("vram_gb", 0), min_vram_gb) for w in workers):
            if not workers:
                raise BackendError(
                    ErrorCode.ENGINE_UNAVAILABLE,
                    "no GPU worker is running on the studio server",
                    "Ask the studio admin to start the workers (python -m backend worker).",
                )
            largest = max(w.get("vram_gb", 0) for w in workers)
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"this job needs a card with at least {min_vram_gb} GB; the largest card among "
                f"the {len(workers)} running worker(s) has {largest:g} GB",
                "Ask for a smaller card (lower quality settings fit: the ladder degrades "
                "instead of failing), or ask the admin for a worker with a larger card.",
            )
        if self.coord.pending_count() >= self.config.queue_depth:
            raise BackendError(
                ErrorCode.BUSY, f"the queue is full ({self.config.queue_depth} jobs waiting)"
            )
        check_disk(self.config.store, self.config.min_free_disk)
        return queue_name(tier)

    def _submit(
        self,
        kind: str,
        params: dict,
        message: protocol.Message,
        user: str,
        queue: str,
        *,
        image: bytes | None = None,
        image_ext: str = "png",
        thumbnail: bytes | None = None,
        mesh: bytes | None = None,
        mesh_ext: str = "glb",
        parent: str | None = None,
        filename: str | None = None,
        extra: dict | None = None,
    ) -> dict:
        name = _clean_filename(message.content.get("filename") if filename is None else filename)
        record = self.store.create(
            kind,
            self._engine().get("name", "remote"),
            params,
            image=image,
            image_ext=image_ext,
            filename=name,
            thumbnail=thumbnail,
            mesh=mesh,
            mesh_ext=mesh_ext,
            parent=parent,
        )
        info = {
            "user": user,
            "min_vram_gb": message.content.get("min_vram_gb", 0),
            "queue": queue,
            **(extra or {}),
        }
        self.store.update(record.id, extra=info)
        self._enqueue(record.id, queue)
        position = self.coord.pending_count()
        self._publish(
            "job_queued",
            {"job_id": record.id, "kind": kind, "position": position, "filename": name},
            message.header,
        )
        return protocol.ok_reply(job_id=record.id, position=position, state="queued")

    def _enqueue(self, job_id: str, queue: str) -> None:
        try:
            self.coord.add_pending(job_id)
            self.celery.send_task(TASK_NAME, args=[job_id], queue=queue, task_id=job_id)
        except Exception as exc:
            error = BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"the job queue (Redis) cannot be reached: {exc}",
                "Ask the studio admin to check the Redis server.",
            )
            try:
                self.coord.remove_pending(job_id)
            except Exception:
                pass
            self.store.transition(job_id, "fail", error=error.to_dict())
            raise error from None

    def _reconcile(self) -> None:
        """A gateway that died between writing a job and queueing it: queue it now. (A job
        queued twice runs once: the worker checks its record and lease.)"""
        try:
            pending = set(self.coord.pending())
            for record in self.store.unfinished():
                if record.state.value == "queued" and record.id not in pending:
                    queue = record.extra.get("queue") or queue_name(need_tier(0))
                    log.info("queueing job %s, which was never queued", record.id)
                    self._enqueue(record.id, queue)
        except Exception as exc:  # Redis away at start: the loop runs anyway
            log.warning("cannot reconcile the queue: %s", exc)

    def _on_cancel(self, message, user, buffers) -> dict:
        job_id = message.content["job_id"]
        record = self.store.get(job_id)
        if record.terminal:
            return protocol.ok_reply(job_id=job_id, state=record.state.value)
        owner = record.extra.get("user")
        if owner and owner != user:
            raise BackendError(
                ErrorCode.BAD_PARAMS,
                f"job {job_id} belongs to {owner}; only they can cancel it",
            )
        self.coord.request_cancel(job_id)  # a worker running it (or about to) sees this
        with self.coord.state_lock(job_id):
            record = self.store.get(job_id)
            if record.state.value == "queued":
                self.store.transition(job_id, "cancel")
                self.store.append_log(job_id, f"cancelled by {user} while queued")
                self.coord.remove_pending(job_id)
                self._publish("job_cancelled", {"job_id": job_id})
                return protocol.ok_reply(job_id=job_id, state="cancelled")
        state = "cancelling" if record.state.value == "running" else record.state.value
        return protocol.ok_reply(job_id=job_id, state=state)

    def _on_jobs(self, message, user, buffers) -> dict:
        limit = message.content.get("limit", 50)
        if not 1 <= limit <= 10_000:
            raise BackendError(ErrorCode.BAD_PARAMS, "limit must be 1..10000")
        records, warnings = self.store.list(limit)
        return protocol.ok_reply(jobs=[_remote_summary(r) for r in records], warnings=warnings)

    def _on_job(self, message, user, buffers) -> dict:
        record = self.store.get(message.content["job_id"])
        folder = self.store.folder(record.id)
        files = {}
        for path in folder.iterdir():
            if path.name.startswith("."):
                continue
            try:
                if path.is_file() and not path.is_symlink():
                    files[path.name] = path.stat().st_size
            except FileNotFoundError:
                pass
        return protocol.ok_reply(
            job=record.to_dict(),
            folder=str(folder),
            files=files,
            log=self.store.log_excerpt(record.id) if message.content.get("log") else None,
        )

    def _on_fetch(self, message, user, buffers) -> dict:
        """One chunk of one file of a job folder (never a path outside it, never a link)."""
        job_id, name = message.content["job_id"], message.content["name"]
        self.store.get(job_id)  # checks the id and that the job exists
        if not FILE_NAME.match(name):
            raise BackendError(ErrorCode.NOT_FOUND, f"no file {name!r} in job {job_id}")
        offset = message.content.get("offset", 0)
        length = min(message.content.get("length", FETCH_DEFAULT), FETCH_MAX)
        if offset < 0 or length < 1:
            raise BackendError(ErrorCode.BAD_PARAMS, "offset must be >= 0 and length >= 1")
        try:
            fd = os.open(self.store.path(job_id, name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            raise BackendError(ErrorCode.NOT_FOUND, f"no file {name!r} in job {job_id}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BackendError(ErrorCode.NOT_FOUND, f"{name!r} is not a file")
            chunk = os.pread(fd, length, offset) if offset < info.st_size else b""
        finally:
            os.close(fd)
        buffers.append(chunk)
        return protocol.ok_reply(
            job_id=job_id,
            name=name,
            offset=offset,
            length=len(chunk),
            size=info.st_size,
            eof=offset + len(chunk) >= info.st_size,
        )


def _remote_summary(record: JobRecord) -> dict[str, Any]:
    return {
        **_summary(record),
        "user": record.extra.get("user"),
        "worker": record.extra.get("worker"),
    }


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
