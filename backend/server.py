"""The backend server: a ZeroMQ control loop that never blocks, a bounded job queue, worker
threads that run the hardened runner, and an event stream (PUB) for every client."""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import zmq

from . import __version__, gpu, heap, meshes, protocol, validate
from .engines import create as create_engine
from .errors import BackendError, ErrorCode, JobCancelled, ProtocolError
from .fetch import fetch
from .jobs import INPUT_STEM, JOB_ID, THUMBNAIL, JobRecord, JobState, JobStore
from .ownerlock import BACKEND_LOCK, OWNER_LOCK, OutputLock
from .params import parse_params, reexport_params
from .procutil import pid_alive
from .runner import MAX_RECOVERIES, Runner, RunnerConfig, check_disk
from .stats import StatsLog, aggregate

log = logging.getLogger(__name__)

EVENTS_URL = "inproc://backend-events"
JOBS_REPLY_BUDGET = protocol.MAX_JSON_FRAME // 2  # bytes of job summaries in one `jobs` page
MAX_KEY_CHARS = 200  # idempotency keys


class BackendState(str, Enum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    POISONED = "poisoned"
    STOPPING = "stopping"
    FAILED = "failed"  # the engine could not load; requests still answered


@dataclass
class ServerConfig:
    connection_file: Path
    output_dir: Path
    state_dir: Path | None = None
    engine: str = "preview"
    engine_options: dict[str, str] = field(default_factory=dict)
    queue_depth: int = 8
    max_concurrent: int = 1  # MAX_CONCURRENT_GENERATIONS
    heartbeat_interval: float = 1.0
    min_free_disk: int = 1 << 30
    image_limits: validate.ImageLimits = field(default_factory=validate.ImageLimits)
    parent_pid: int | None = None  # exit when this process dies (no orphans)
    recover: bool = True  # rerun jobs a dead backend left behind
    vram_cap_bytes: int | None = None  # emulate a smaller card
    shutdown_grace: float = 30.0  # seconds to let the running job reach a checkpoint
    standby: bool = False  # load the engine but run nothing until an `activate` request
    # Freeze start-up objects out of the collector (heap.settle). Off only when the server
    # shares its process with other code, as in the in-thread test server.
    settle_heap: bool = True

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
        self.started_at = time.monotonic()
        self.key = protocol.new_key()
        self.session = protocol.Session(self.key, clock=clock)
        # The backend that runs jobs holds backend.lock; one run without a supervisor (no
        # parent) owns the folder itself too (owner.lock). Taken by claim(), at activation.
        locks = [OutputLock(config.output_dir, BACKEND_LOCK, "backend", config.connection_file)]
        if not config.parent_pid:
            locks.insert(
                0, OutputLock(config.output_dir, OWNER_LOCK, "backend", config.connection_file)
            )
        self.store = JobStore(config.output_dir, locks=locks)
        self._keys: dict[str, str] = {}  # idempotency key -> job id
        self.stats = StatsLog(config.state_dir / "stats.jsonl")
        self.state = BackendState.STARTING
        self.state_reason = "starting"
        self.engine = create_engine(config.engine, **config.engine_options)
        self.engine_error: dict[str, Any] | None = None
        self.profile = self._open_profile()
        self.runner = Runner(
            self.engine,
            self.store,
            self.stats,
            self.profile,
            RunnerConfig(min_free_disk=config.min_free_disk),
        )
        self._health: dict[str, Any] = {"ok": True, "gpu": False}  # last GPU probe
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self._queue: deque[str] = deque()
        self._queue_cv = threading.Condition()
        self._running: dict[str, threading.Event] = {}
        self._decoded: dict[str, Any] = {}  # job id -> input decoded at submit (saves a decode)
        self._ready = threading.Event()
        self._active = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.exit_code = 0
        self._stop_deadline = 0.0
        self.ctx = zmq.Context()
        self.shell: zmq.Socket | None = None
        self.iopub: zmq.Socket | None = None
        self.events_in: zmq.Socket | None = None
        self._local = threading.local()
        self.connection: protocol.ConnectionInfo | None = None
        n = max(1, int(config.max_concurrent))
        if n > 1 and self.engine.uses_gpu:
            log.warning("GPU engines are not thread-safe; running one job at a time")
            n = 1
        self.max_concurrent = n

    # -- lifecycle -------------------------------------------------------------------

    def _open_profile(self):
        """The adaptive-start memory profile of this GPU (None for CPU engines)."""
        key = gpu.device_key() if self.engine.uses_gpu else None
        if key is None:
            return None
        from .memprofile import MemoryProfile

        return MemoryProfile(self.config.state_dir / "memory_profile.json", gpu_key=key)

    def bind(self) -> protocol.ConnectionInfo:
        """Bind on loopback with ports chosen at bind time, then write the connection file."""
        self.shell = self.ctx.socket(zmq.ROUTER)
        self.shell.setsockopt(zmq.LINGER, 0)
        self.shell.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_BUFFER_FRAME + (1 << 20))
        self.shell.setsockopt(zmq.ROUTER_MANDATORY, 0)
        shell_port = self.shell.bind_to_random_port("tcp://127.0.0.1")
        self.iopub = self.ctx.socket(zmq.PUB)
        self.iopub.setsockopt(zmq.LINGER, 1000)
        self.iopub.setsockopt(
            zmq.SNDHWM, 1000
        )  # per subscriber; a slow one loses events, not memory
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
        if not self.config.standby:
            self.store.claim()

    def start(self) -> None:
        self.claim()
        if self.shell is None:
            self.bind()
        if not self.config.standby:
            self._activate()
        self._spawn(self._load_engine, "engine-loader")
        for i in range(self.max_concurrent):
            self._spawn(self._worker, f"worker-{i}")
        if self.engine.uses_gpu:
            self._spawn(self._watch_gpu, "gpu-health")

    def _activate(self) -> None:
        with self._queue_cv:
            if self._active.is_set():
                return
            self.store.claim()  # raises OutputLocked: the standby must not run anything
            records, _ = self.store.list()
            self._keys = {r.idempotency_key: r.id for r in records if r.idempotency_key}
            if self.config.recover:
                self._recover_jobs(records)
            self._active.set()
            self._queue_cv.notify_all()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def serve_forever(self) -> int:
        self.start()
        poller = zmq.Poller()
        poller.register(self.shell, zmq.POLLIN)
        poller.register(self.events_in, zmq.POLLIN)
        next_beat = 0.0
        try:
            while not (self._stopping.is_set() and not self._running_threads_busy()):
                for sock, _ in poller.poll(timeout=100):
                    if sock is self.shell:
                        self._drain_shell()
                    else:
                        self._drain_events()
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.config.heartbeat_interval
                    self._heartbeat()
                    self._watch_parent()
                    if self._active.is_set() and (self.store.problem or self.store.pending()):
                        self.store.recover()  # a full, read-only or deleted folder came back
            self._drain_events()
        finally:
            self._close()
        return self.exit_code

    def _running_threads_busy(self) -> bool:
        return bool(self._running) and time.monotonic() < self._stop_deadline

    def request_stop(self, reason: str, exit_code: int = 0) -> None:
        if self._stopping.is_set():
            return
        self.exit_code = exit_code
        self._stop_deadline = time.monotonic() + self.config.shutdown_grace
        if self.state is not BackendState.POISONED:
            self._set_state(BackendState.STOPPING, reason)
        self._stopping.set()
        with self._queue_cv:
            self._queue_cv.notify_all()

    def _close(self) -> None:
        self._publish("backend_state", {"state": "stopped", "reason": self.state_reason})
        time.sleep(0.05)  # let the last events leave
        for sock in (self.shell, self.iopub, self.events_in):
            if sock is not None:
                sock.close(linger=200)
        self._remove_connection_file()
        self.store.release()
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

    # -- state and events --------------------------------------------------------------

    def _set_state(self, state: BackendState, reason: str) -> None:
        self.state = state
        self.state_reason = reason
        self._emit("backend_state", {"state": state.value, "reason": reason})

    def _emit(self, msg_type: str, content: dict[str, Any], parent: dict | None = None) -> None:
        """Thread-safe: every thread pushes through its own inproc socket to the loop."""
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(EVENTS_URL)
            self._local.push = sock
        try:
            sock.send_multipart(
                [
                    msg_type.encode(),
                    json.dumps(content, default=str).encode(),
                    json.dumps(parent or {}).encode(),
                ]
            )
        except zmq.ZMQError as exc:  # the context is gone: the server is stopping
            log.debug("event %s dropped: %s", msg_type, exc)

    def _drain_events(self) -> None:
        while True:
            try:
                frames = self.events_in.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = frames[0].decode()
            content = json.loads(frames[1])
            parent = json.loads(frames[2])
            if kind == "__reply__":
                identity = bytes.fromhex(content.pop("__identity__"))
                request_type = content.pop("__request_type__")
                self._send_reply(identity, request_type, content, parent)
            else:
                self._publish(kind, content, parent)

    def _publish(self, msg_type: str, content: dict[str, Any], parent: dict | None = None) -> None:
        message = self.session.msg(msg_type, content, parent)
        frames = self.session.serialize(message)
        try:
            self.iopub.send_multipart([msg_type.encode(), *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("event %s not published: %s", msg_type, exc)

    def _heartbeat(self) -> None:
        self._publish(
            "heartbeat",
            {
                "state": self._current_state().value,
                "session": self.session.session_id,
                "pid": os.getpid(),
                "queue": len(self._queue),
                "running": list(self._running),
            },
        )

    def _current_state(self) -> BackendState:
        if self.state is BackendState.READY and self._running:
            return BackendState.BUSY
        return self.state

    # -- the control loop --------------------------------------------------------------

    def _drain_shell(self) -> None:
        while True:
            try:
                frames = self.shell.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            try:
                self._handle_frames(frames)
            except Exception:  # last line of defence: no message may stop the control loop
                log.exception("message dropped: handling it failed")
                self._reject(ErrorCode.INTERNAL)

    def _handle_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self._reject(ErrorCode.BAD_MESSAGE)
            return
        identity, body = frames[0], frames[1:]
        try:
            message = self.session.deserialize(body)
            protocol.check_request(message)
        except ProtocolError as exc:
            self._reject(exc.code)
            self._send_reply(identity, "error", protocol.error_reply(exc), {})
            return
        self.counters[message.msg_type] += 1
        handler = getattr(self, f"_on_{message.msg_type}")
        try:
            content = handler(message, identity)
        except BackendError as exc:
            content = protocol.error_reply(exc)
        except Exception as exc:  # nothing a client sends may take the backend down
            log.exception("handler %s failed", message.msg_type)
            content = protocol.error_reply(BackendError(ErrorCode.INTERNAL, f"{exc!r}"))
        if content is not None:  # None: the reply comes later (deferred)
            self._send_reply(identity, message.msg_type, content, message.header)

    def _reject(self, code: ErrorCode) -> None:
        self.rejected[code.value] += 1

    def _send_reply(
        self, identity: bytes, request_type: str, content: dict, parent: dict, buffers=()
    ) -> None:
        message = self.session.msg(protocol.reply_type(request_type), content, parent, buffers)
        try:
            self.shell.send_multipart([identity, *self.session.serialize(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("reply to %s dropped: %s", request_type, exc)

    def _defer(self, identity: bytes, message: protocol.Message, work: Callable[[], dict]) -> None:
        """Run slow work off the loop; the reply is posted back through the event channel."""

        def run() -> None:
            try:
                content = work()
            except BackendError as exc:
                content = protocol.error_reply(exc)
            except Exception as exc:
                log.exception("deferred %s failed", message.msg_type)
                content = protocol.error_reply(BackendError(ErrorCode.INTERNAL, repr(exc)))
            content = dict(content, __identity__=identity.hex(), __request_type__=message.msg_type)
            self._emit("__reply__", content, message.header)

        threading.Thread(target=run, name=f"deferred-{message.msg_type}", daemon=True).start()

    # -- request handlers (each returns quickly) ---------------------------------------

    def _on_hello(self, message, identity) -> dict:
        return protocol.ok_reply(
            protocol_version=protocol.PROTOCOL_VERSION,
            backend_version=__version__,
            session=self.session.session_id,
            pid=os.getpid(),
            state=self._current_state().value,
            engine=self.engine.describe(),
            python=platform.python_version(),
            platform=sys.platform,
        )

    def _on_ping(self, message, identity) -> dict:
        return protocol.ok_reply(pong=True, time=self.clock())

    def _on_status(self, message, identity) -> dict:
        with self._queue_cv:
            queue = list(self._queue)
        return protocol.ok_reply(
            state=self._current_state().value,
            reason=self.state_reason,
            session=self.session.session_id,
            pid=os.getpid(),
            active=self._active.is_set(),
            uptime=round(time.monotonic() - self.started_at, 3),
            engine=self.engine.describe(),
            engine_error=self.engine_error,
            queue=queue,
            queue_depth=self.config.queue_depth,
            max_concurrent=self.max_concurrent,
            running=list(self._running),
            current=self.runner.current,
            vram=gpu.vram(),
            gpu_health=gpu.probe_health(0.5),
            output_dir=str(self.config.output_dir),
            output=self._output_health(),
            rejected=dict(self.rejected),
            memory=heap.figures(),
        )

    def _on_generate(self, message, identity) -> dict:
        duplicate = self._duplicate(message)
        if duplicate is not None:
            return duplicate
        self._admit()
        params = parse_params(message.content.get("params"))
        image_bytes = message.buffers[0]
        image = validate.load_image(image_bytes, self.config.image_limits)
        return self._submit(
            "generate",
            params.to_dict(),
            message,
            image_bytes=image_bytes,
            image=image,
        )

    def _on_texture(self, message, identity) -> dict:
        self.engine.stages_for("texture")  # typed error if this engine cannot texture
        duplicate = self._duplicate(message)
        if duplicate is not None:
            return duplicate
        self._admit()
        params = parse_params(message.content.get("params"))
        image_bytes, mesh = message.buffers
        fmt = meshes.checked_upload(message.content["mesh_format"], mesh)
        image = validate.load_image(image_bytes, self.config.image_limits)
        return self._submit(
            "texture",
            params.to_dict(),
            message,
            image_bytes=image_bytes,
            image=image,
            mesh=mesh,
            mesh_ext=fmt,
        )

    def _on_reexport(self, message, identity) -> dict:
        self.engine.stages_for("reexport")
        duplicate = self._duplicate(message)
        if duplicate is not None:
            return duplicate
        self._admit()
        parent = self.store.get(message.content["job_id"])
        if parent.state.value != "done" or parent.kind == "texture":
            raise BackendError(ErrorCode.BAD_PARAMS, f"job {parent.id} has no result to re-export")
        params = reexport_params(parent.params, parent.final_params, message.content.get("params"))
        return self._submit(
            "reexport",
            params.to_dict(),
            message,
            parent=parent.id,
            filename=parent.filename,
            thumbnail=self.store.read(parent.id, "thumbnail.png", 8 << 20),
        )

    def _duplicate(self, message) -> dict | None:
        """A request sent again with its idempotency key (say, after a client timeout) is
        answered with the job the first one made, whatever the queue or disk say now."""
        key = message.content.get("idempotency_key")
        if key is None:
            return None
        if not key or len(key) > MAX_KEY_CHARS:
            raise BackendError(
                ErrorCode.BAD_PARAMS, f"idempotency_key must be 1..{MAX_KEY_CHARS} characters"
            )
        job_id = self._keys.get(key)
        if job_id is None:
            return None
        try:
            state = self.store.get(job_id).state.value
        except BackendError:
            return None  # its folder is gone: the request makes a new job
        with self._queue_cv:
            position = self._queue.index(job_id) + 1 if job_id in self._queue else 0
        return protocol.ok_reply(job_id=job_id, position=position, state=state, duplicate=True)

    def _admit(self) -> None:
        """Refuse a new job before any work is spent on it (decoding the image costs more
        than the answer: a client retrying after `busy` must not make the backend busier)."""
        if self._stopping.is_set():
            raise BackendError(ErrorCode.SHUTTING_DOWN, "the backend is shutting down")
        if not self._active.is_set():
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                "this is a standby backend",
                "Send jobs to the active backend; a standby runs after `activate`.",
            )
        if self.state is BackendState.FAILED:
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                (self.engine_error or {}).get("message", "engine failed to load"),
            )
        problem = self.store.problem
        if problem is not None:  # disk full, read-only, deleted, another owner: typed
            raise BackendError(problem.code, problem.message, problem.hint)
        with self._queue_cv:
            if len(self._queue) >= self.config.queue_depth:
                raise BackendError(
                    ErrorCode.BUSY,
                    f"the queue is full ({self.config.queue_depth} jobs waiting)",
                )
        check_disk(self.config.output_dir, self.config.min_free_disk)

    def _submit(
        self,
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
        self._admit()  # again: a worker may have failed the engine meanwhile
        with self._queue_cv:
            name = _clean_filename(
                message.content.get("filename") if filename is None else filename
            )
            record = self.store.create(
                kind,
                self.engine.name,
                params,
                image=image_bytes,
                image_ext=_image_ext(image_bytes) if image_bytes else "png",
                filename=name,
                thumbnail=thumbnail or (_thumbnail(image) if image else None),
                mesh=mesh,
                mesh_ext=mesh_ext,
                parent=parent,
                idempotency_key=message.content.get("idempotency_key"),
            )
            if record.idempotency_key:
                self._keys[record.idempotency_key] = record.id
            self._queue.append(record.id)
            if image is not None:
                self._decoded[record.id] = image
            position = len(self._queue)
            self._queue_cv.notify()
        self._emit(
            "job_queued",
            {"job_id": record.id, "kind": kind, "position": position, "filename": name},
            message.header,
        )
        return protocol.ok_reply(job_id=record.id, position=position, state="queued")

    def _on_cancel(self, message, identity) -> dict:
        job_id = message.content["job_id"]
        record = self.store.get(job_id)
        with self._queue_cv:
            if job_id in self._queue:
                self.store.transition(job_id, "cancel")  # first: a failed write leaves it queued
                self._queue.remove(job_id)
                self._decoded.pop(job_id, None)
                self._emit("job_cancelled", {"job_id": job_id})
                return protocol.ok_reply(job_id=job_id, state="cancelled")
        flag = self._running.get(job_id)
        if flag is not None:
            self.store.request_cancel(job_id)  # on disk: a crash before the stop keeps it cancelled
            flag.set()
            return protocol.ok_reply(job_id=job_id, state="cancelling")
        return protocol.ok_reply(job_id=job_id, state=record.state.value)

    def _on_jobs(self, message, identity) -> dict:
        limit = message.content.get("limit", 50)
        offset = message.content.get("offset", 0)
        query = message.content.get("query", "").strip().lower()
        if not 1 <= limit <= 10_000:
            raise BackendError(ErrorCode.BAD_PARAMS, "limit must be 1..10000")
        if not 0 <= offset <= 1_000_000:
            raise BackendError(ErrorCode.BAD_PARAMS, "offset must be 0..1000000")
        if len(query) > 200:
            raise BackendError(ErrorCode.BAD_PARAMS, "query is longer than 200 characters")
        before = message.content.get("before")
        if before is not None:  # paging by id: stable while jobs are being added
            records, warnings, _ = self.store.page(limit, before)
            return self._listing(records, warnings, 0, limit, None)
        if query:  # reads every record: about 3 ms per 100 jobs on the 2-core CI machine
            return self._search_jobs(query, limit, offset)
        records, warnings, total = _newest(self.store, offset + limit)
        return self._listing(records, warnings, offset, limit, total)

    def _search_jobs(self, query: str, limit: int, offset: int) -> dict:
        records, warnings, _ = _newest(self.store, None)
        found = [r for r in records if _matches(r, query.split())]
        return self._listing(found, warnings, offset, limit, len(found))

    def _listing(self, records, warnings, offset: int, limit: int, total: int | None) -> dict:
        """One page, cut short where it would pass the reply limit. `next` is the id to give
        as `before` for the following page (None after the last)."""
        page = records[offset : offset + limit]
        jobs: list[dict] = []
        used = 0
        for record in page:
            entry = dict(_summary(record), **_folder_facts(self.store.folder(record.id)))
            used += len(json.dumps(entry, default=str))
            if jobs and used > JOBS_REPLY_BUDGET:
                break
            jobs.append(entry)
        more = (
            len(jobs) < len(page)
            or (total is None and len(page) == limit)
            or (total is not None and offset + len(page) < total)
        )
        return protocol.ok_reply(
            jobs=jobs,
            warnings=[w[:300] for w in warnings[:50]],
            total=total,
            offset=offset,
            next=jobs[-1]["job_id"] if jobs and more else None,
        )

    def _on_delete_jobs(self, message, identity) -> None:
        job_id = message.content.get("job_id")
        days = message.content.get("older_than_days")
        if (job_id is None) == (days is None):
            raise BackendError(ErrorCode.BAD_PARAMS, "give either job_id or older_than_days")
        if days is not None and not 0 <= days <= 36_500:
            raise BackendError(ErrorCode.BAD_PARAMS, "older_than_days must be 0..36500")
        if job_id is not None:
            self.store.folder(job_id)  # a bad id is refused here, before any work
        dry_run = bool(message.content.get("dry_run", False))
        self._defer(identity, message, lambda: self._delete_jobs(job_id, days, dry_run))

    def _delete_jobs(self, job_id: str | None, days: int | None, dry_run: bool) -> dict:
        """Remove finished jobs' folders (or, with `dry_run`, say what that would free). A job
        still queued or running, and the parent of one (a re-export reads its parent's
        files), is kept."""
        if job_id is not None:
            record = self.store.get(job_id)
            if not record.terminal:
                raise BackendError(
                    ErrorCode.BUSY,
                    f"job {job_id} is {record.state.value}",
                    "Cancel it first, or wait until it ends.",
                )
            candidates = [record]
        else:
            cutoff = self.clock() - days * 86_400
            records, _ = self.store.list()
            candidates = [r for r in records if r.terminal and (r.finished or r.created) < cutoff]
        with self._queue_cv:
            busy = [*self._queue, *self._running]
        kept = set()
        for busy_id in busy:
            try:
                kept.add(self.store.get(busy_id).parent)
            except BackendError:
                pass
        deleted, skipped, freed = [], [], 0
        for record in candidates:
            folder = self.store.folder(record.id)
            if record.id in kept:
                skipped.append({"job_id": record.id, "reason": "a re-export of it is queued"})
                continue
            size = _folder_facts(folder)["bytes"]
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

    def _on_job(self, message, identity) -> dict:
        record = self.store.get(message.content["job_id"])
        return protocol.ok_reply(
            job=record.to_dict(),
            folder=str(self.store.folder(record.id)),
            files=self.store.files(record.id),  # regular files only: links are never followed
            # The log excerpt (up to 16 KB) only on request: clients poll `job` for its state.
            log=self.store.log_excerpt(record.id) if message.content.get("log") else None,
        )

    def _on_fetch(self, message, identity) -> None:
        # A file of a job as bytes (backend/fetch.py, shared with the gateway): a bounded
        # read (at most 4 MiB), so it stays on the loop.
        content, chunk = fetch(self.store, message.content)
        self._send_reply(identity, message.msg_type, content, message.header, [chunk])

    def _on_stats(self, message, identity) -> dict:
        return protocol.ok_reply(
            aggregate=aggregate(self.stats.read()),
            requests=dict(self.counters),
            rejected=dict(self.rejected),
            uptime=round(time.monotonic() - self.started_at, 3),
        )

    def _on_doctor(self, message, identity) -> None:
        def work() -> dict:
            # A child process: doctor imports trellis2, which reads its attention settings
            # once at import; doing that here could race the engine's own import.
            import subprocess

            options = self.config.engine_options
            cmd = [
                sys.executable,
                "-m",
                "backend",
                "doctor",
                "--json",
                "--output-dir",
                str(self.config.output_dir),
            ]
            for key in ("weights_dir", "dinov3_path", "rembg_path", "trellis_checkout"):
                if options.get(key):
                    cmd += [f"--{key.replace('_', '-')}", options[key]]
            package_root = str(Path(__file__).resolve().parent.parent)
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (package_root, env.get("PYTHONPATH")) if p
            )
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=180, env=env, cwd=package_root
                )
                report = json.loads(proc.stdout)
            except (subprocess.TimeoutExpired, ValueError, OSError) as exc:
                raise BackendError(ErrorCode.INTERNAL, f"doctor did not report: {exc}") from None
            return protocol.ok_reply(report=report)

        self._defer(identity, message, work)
        return None

    def _output_health(self) -> dict[str, Any]:
        problem = self.store.problem
        return {
            "ok": problem is None,
            "error": problem.to_dict() if problem else None,
            "unrecorded": self.store.pending(),  # outcomes kept in memory until writable
        }

    def _on_activate(self, message, identity) -> dict:
        self._activate()
        return protocol.ok_reply(state=self._current_state().value, queue=list(self._queue))

    def _on_shutdown(self, message, identity) -> dict:
        reason = message.content.get("reason") or "shutdown requested"
        self.request_stop(reason)
        return protocol.ok_reply(state="stopping", running=list(self._running))

    # -- background threads ------------------------------------------------------------

    def _load_engine(self) -> None:
        began = time.monotonic()
        self._set_state(BackendState.LOADING, f"loading {self.engine.label or self.engine.name}")

        def progress(fraction: float, text: str = "") -> None:
            self._emit("backend_state", {"state": "loading", "fraction": fraction, "reason": text})

        try:
            if self.config.vram_cap_bytes:
                import torch  # noqa: F401  (the allocator was configured before this import)

                gpu.set_memory_cap(self.config.vram_cap_bytes)
            self.engine.load(progress)
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, BackendError)
                else BackendError(ErrorCode.ENGINE_UNAVAILABLE, f"{type(exc).__name__}: {exc}")
            )
            self.engine_error = error.to_dict()
            log.error("engine failed to load: %s", error.message)
            self._set_state(BackendState.FAILED, error.message)
            self._fail_queue(error)
            return
        seconds = time.monotonic() - began
        self.runner.profile = self._open_profile()
        if self.config.settle_heap:
            heap.settle()  # what start-up built lives as long as the process
        self.stats.append("ready", engine=self.engine.name, seconds=round(seconds, 4))
        self._set_state(BackendState.READY, f"ready in {seconds:.2f} s")
        self._ready.set()

    def _fail_queue(self, error: BackendError) -> None:
        with self._queue_cv:
            pending = list(self._queue)
            self._queue.clear()
        for job_id in pending:
            try:
                self.store.transition(job_id, "fail", error=error.to_dict())
            except BackendError as exc:
                self._end_unrecorded(job_id, exc)
                continue
            self._emit("job_failed", {"job_id": job_id, **error.to_dict()})

    def _worker(self) -> None:
        while not self._stopping.is_set():
            if not (self._ready.wait(timeout=0.2) and self._active.wait(timeout=0.2)):
                continue
            with self._queue_cv:
                while not self._queue and not self._stopping.is_set():
                    self._queue_cv.wait(timeout=0.5)
                if self._stopping.is_set():
                    return
                job_id = self._queue.popleft()
                image = self._decoded.pop(job_id, None)
                cancel = threading.Event()
                self._running[job_id] = cancel
            result = None
            try:
                problem = self.store.problem
                if problem is not None:  # the folder cannot record it: it ends typed, now
                    reason = f"not run: the output folder cannot be used ({problem.message})"
                    self._end_unrecorded(job_id, BackendError(problem.code, reason, problem.hint))
                    continue
                record = self.store.get(job_id)
                result = self.runner.run(
                    record,
                    emit=self._emit,
                    cancelled=cancel.is_set,
                    interrupted=self._stopping.is_set,
                    image=image,
                )
            except BackendError as exc:  # the store could not write the job's record
                self._end_unrecorded(job_id, exc)
            except Exception as exc:
                log.exception("worker failed on job %s", job_id)
                self._end_unrecorded(job_id, BackendError(ErrorCode.INTERNAL, repr(exc)))
            finally:
                self._running.pop(job_id, None)
            if result is not None and result.poisoned:
                self._set_state(BackendState.POISONED, f"CUDA context broken during job {job_id}")
                self.request_stop("gpu poisoned", exit_code=gpu.POISONED_EXIT_CODE)
                return

    def _watch_gpu(self, interval: float = 5.0) -> None:
        """Probe the GPU off the control loop, so `status` reports a hung GPU without hanging."""
        while not self._stopping.wait(interval):
            if self._ready.is_set():
                self._health = dict(gpu.probe_health(2.0), checked=self.clock())

    def _recover_jobs(self, records: list[JobRecord]) -> None:
        """Every job a dead backend left queued or running runs again (running ones only
        once); one the user cancelled while it ran stays cancelled. A job whose record cannot
        be written ends failed with the store's typed error."""
        for record in sorted((r for r in records if not r.terminal), key=lambda r: r.created):
            try:
                if record.state is JobState.RUNNING and record.cancel_requested:
                    self.store.transition(record.id, "cancel", error=JobCancelled().to_dict())
                    self.store.append_log(record.id, "cancelled (its backend stopped first)")
                    self._emit("job_cancelled", {"job_id": record.id})
                    continue
                if record.state is JobState.RUNNING and record.recoveries >= MAX_RECOVERIES:
                    error = BackendError(
                        ErrorCode.BACKEND_DIED, "the backend died twice while running this job"
                    )
                    self.store.transition(record.id, "fail", error=error.to_dict())
                    self.store.append_log(record.id, "failed: backend died again")
                    self._job_stats(record, error)
                    continue
                if record.state is JobState.RUNNING:
                    self.store.transition(record.id, "requeue", recoveries=record.recoveries + 1)
                    self.store.append_log(
                        record.id, "backend died during this job; running it again"
                    )
            except BackendError as exc:
                self._end_unrecorded(record.id, exc)
                continue
            self._queue.append(record.id)

    def _end_unrecorded(self, job_id: str, error: BackendError) -> None:
        """A job the store could not record (disk full, read-only or deleted folder) still
        ends: failed with that typed error, kept in memory until the folder is writable."""
        if error.code is ErrorCode.NOT_FOUND:
            error = BackendError(
                ErrorCode.OUTPUT_UNWRITABLE, f"the folder of job {job_id} is gone: {error.message}"
            )
        if not self.store.settle(job_id, error):
            return  # it had ended already
        log.warning("job %s failed: %s", job_id, error.message)
        self.store.discard_output(job_id)
        try:
            self._job_stats(self.store.get(job_id), error)
        except BackendError:
            pass  # its folder is gone
        self._emit("job_failed", {"job_id": job_id, **error.to_dict()})

    def _job_stats(self, record: JobRecord, error: BackendError) -> None:
        """The stats line of a job that ended without running to its end."""
        self.stats.append(
            "job",
            job_id=record.id,
            engine=record.engine,
            job_kind=record.kind,
            params=record.params,
            attempts=record.attempts,
            outcome="failed",
            error_code=error.code.value,
        )


def _summary(record: JobRecord) -> dict[str, Any]:
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


def _newest(store: JobStore, count: int | None) -> tuple[list[JobRecord], list[str], int]:
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
    records.sort(key=lambda r: (r.id[:15], r.created, r.id), reverse=True)
    return records, warnings, len(names)


def _matches(record: JobRecord, words: list[str]) -> bool:
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


def _folder_facts(folder: Path) -> dict[str, Any]:
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


def _clean_filename(name: Any) -> str:
    if not isinstance(name, str):
        return ""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in base if ch.isprintable())[:120]


def _image_ext(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "png").lower()
    except Exception:
        return "img"
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


def _thumbnail(image, side: int = 256) -> bytes:
    """A small PNG for the history list; speed over size (it is made while the client waits)."""
    from PIL import Image

    width, height = image.size
    scale = side / max(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
