"""The reader process: the job store's read-only requests (`jobs`, `job`, `stats`) answered by
a process of their own, so that a client listing thousands of jobs costs the server's
interpreter, and the GIL its control loop needs, next to nothing (docs/PERFORMANCE.md, issue
#15).

The server starts it with the output and state folders (`python -m backend reader`, built by
`supervision.commands.reader_command`). The control loop hands it each such request's content
frame as the client sent it, with what only the server's memory holds (the outcomes its store
could not write yet, `JobStore.unrecorded`, and for `stats` the request counters); the reader
answers with the reply's content already encoded as JSON, which the loop signs and sends as it
is (`Session.serialize_encoded`). The replies are `store.listing`'s, the same functions the
in-process handlers call, so they are the same replies. `stats` keeps a running tally of the
stats log (`StatsTally`) instead of reading the whole file each time.

The channel is a ZeroMQ PAIR socket (a fresh endpoint and key per reader). On POSIX it is a
Unix socket in a folder of its own that only this user may enter: a PAIR takes one peer, and
on a loopback port another local user could connect first and keep the reader out (the
requests were then all answered in-process); on Windows, a port on 127.0.0.1. Every
message carries an HMAC-SHA256 under a key the reader reads from its stdin (never from a
command line). The reader exits when its stdin closes (the server exited, however it died),
when its parent process is gone, or when the server stops it.

When the reader is not up yet, has died, or has not answered within `timeout` (then it is
killed), its requests are answered in-process (the reader lane, as before it existed) and a new
reader is started, with a growing pause after readers that died young. The server never waits
on it."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from .. import settings
from ..errors import BackendError, ErrorCode
from ..procutil import cpu_seconds, is_stopped, lower_own_priority, pid_alive, stop_child
from ..store.jobs import JobStore
from ..store.listing import job_reply, list_jobs, stats_reply, summary
from ..store.stats import StatsTally
from ..supervision import commands
from ..wire import protocol

log = logging.getLogger(__name__)

REQUESTS = frozenset({"jobs", "job", "stats"})  # what the reader answers
MAX_FRAME = 64 << 20  # bytes of one frame on the channel (a `job` record may hold 4 MiB)
MAX_OVERLAY = 4 << 20  # unrecorded outcomes sent along; more than this: answered in-process
_QUERY, _ANSWER = b"q", b"a"  # what a signature covers first: the direction of the message
_DONE_URL = "inproc://reader-answers"


def _mac(key: bytes, direction: bytes, frames: list[bytes]) -> bytes:
    mac = hmac.new(key, direction, hashlib.sha256)
    for frame in frames:
        mac.update(len(frame).to_bytes(8, "big"))
        mac.update(frame)
    return mac.digest()


def _signed(key: bytes, direction: bytes, frames: list[bytes]) -> list[bytes]:
    return [_mac(key, direction, frames), *frames]


def _verified(key: bytes, direction: bytes, frames: list[bytes]) -> list[bytes] | None:
    if len(frames) < 2 or not hmac.compare_digest(frames[0], _mac(key, direction, frames[1:])):
        return None
    return frames[1:]


# -- the server's side --------------------------------------------------------------------------


@dataclass
class Forwarded:
    """A request handed to the reader: where its reply goes, and when it was handed over."""

    identity: bytes
    message: protocol.Message
    sent: float


class ReaderProcess:
    """The server's handle on its reader: used from the control loop only (its socket is one
    of the loop's). `forward` hands a request over or says no (then the caller answers it
    in-process); `replies` collects answers; `tick` notices a reader that died or hangs and
    returns the requests it held, and starts a new one."""

    def __init__(
        self,
        ctx: zmq.Context,
        output_dir: Path,
        state_dir: Path,
        *,
        timeout: float = settings.READER_TIMEOUT,
        stall: float = settings.READER_STALL,
        max_inflight: int = settings.READER_MAX_INFLIGHT,
        python: str = sys.executable,
    ):
        self.ctx = ctx
        self.output_dir = output_dir
        self.state_dir = state_dir
        self.timeout = timeout
        self.stall = stall
        self._cpu_mark: tuple[float, float] | None = None  # (when, the reader's CPU seconds)
        self.max_inflight = max_inflight
        self.python = python
        self.socket: zmq.Socket | None = None
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # the reader's own pid, from its first message
        self.pending: dict[bytes, Forwarded] = {}
        self.answered = 0  # requests the reader answered
        self.in_process = 0  # requests it could not take or lost (answered in-process)
        self.restarts = 0
        self._key = b""
        self._tokens = itertools.count(1)
        self._poller: zmq.Poller | None = None
        self._started_at = 0.0
        self._next_check = 0.0
        self._restart_at = 0.0
        self._pause = 0.0  # before the next start, after readers that died young
        self._folder: str | None = None  # the Unix socket's private folder

    def attach(self, poller: zmq.Poller) -> None:
        """The loop's poller: the reader's socket is polled with the others."""
        self._poller = poller
        if self.socket is not None:
            poller.register(self.socket, zmq.POLLIN)

    def start(self) -> None:
        """Start a reader (it says when it is up; until then requests are answered
        in-process). A failure to start is logged and tried again later."""
        key = secrets.token_bytes(32)
        sock = self.ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        sock.setsockopt(zmq.SNDHWM, self.max_inflight + 16)
        folder = None
        try:
            url, folder = _private_endpoint()
            sock.bind(url)
            url = sock.getsockopt_string(zmq.LAST_ENDPOINT)  # the port chosen, on TCP
            command = commands.reader_command(
                self.python,
                output_dir=self.output_dir,
                state_dir=self.state_dir,
                parent_pid=os.getpid(),
            )
            proc = commands.start_helper(command, stdout=subprocess.DEVNULL)
        except (OSError, zmq.ZMQError) as exc:
            sock.close(linger=0)
            _remove(folder)
            log.warning("the reader process did not start: %s", exc)
            self._schedule_restart(time.monotonic())
            return
        try:
            proc.stdin.write(json.dumps({"key": key.hex(), "url": url}).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            pass  # it died at once: tick() sees it
        self._key, self.socket, self.proc, self.pid = key, sock, proc, None
        self._folder = folder
        self._started_at = time.monotonic()
        if self._poller is not None:
            self._poller.register(sock, zmq.POLLIN)

    def forward(
        self, identity: bytes, message: protocol.Message, content: bytes, overlay: bytes
    ) -> bool:
        """Hand a request to the reader: its content frame as received, and `overlay` (b"" or
        a JSON object: what the reader needs of the server's memory). False when the reader
        cannot take it now; the caller answers it in-process."""
        if self.pid is None or len(self.pending) >= self.max_inflight or len(overlay) > MAX_OVERLAY:
            self.in_process += 1
            return False
        token = next(self._tokens).to_bytes(8, "big")
        frames = [token, message.msg_type.encode("ascii"), content, overlay]
        try:
            self.socket.send_multipart(_signed(self._key, _QUERY, frames), zmq.NOBLOCK)
        except zmq.ZMQError:
            self.in_process += 1
            return False
        self.pending[token] = Forwarded(identity, message, time.monotonic())
        return True

    def replies(self) -> list[tuple[Forwarded, bytes]]:
        """The answers received so far: (the request, its reply's encoded content)."""
        out: list[tuple[Forwarded, bytes]] = []
        while self.socket is not None:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            body = _verified(self._key, _ANSWER, frames)
            if body is None or len(body) != 2:
                log.warning("a message on the reader's channel was not the reader's: dropped")
                continue
            token, content = body
            if not token:  # the reader is up
                self.pid = int(json.loads(content)["pid"])
                log.info("reader process %s is up", self.pid)
                continue
            request = self.pending.pop(token, None)
            if request is not None:
                self.answered += 1
                out.append((request, content))
        return out

    def tick(self, now: float, restart: bool = True) -> list[Forwarded]:
        """Called by the loop often (cheap between checks): a reader that exited, did not
        answer in time or did not come up is let go (killed), and the requests it held are
        returned for the caller to answer in-process. Starts a new reader when it is time and
        `restart` (not while the server stops)."""
        if now < self._next_check:
            return []
        self._next_check = now + settings.READER_CHECK_INTERVAL
        lost: list[Forwarded] = []
        if self.proc is not None:
            code = self.proc.poll()
            oldest = next(iter(self.pending.values()), None)
            if code is not None:
                log.warning("the reader process exited (code %s); starting another", code)
                lost = self._let_go(now)
            elif oldest is not None and now - oldest.sent > self.timeout:
                log.warning(
                    "the reader process did not answer within %.0f s; replacing it", self.timeout
                )
                lost = self._let_go(now)
            elif oldest is not None and self._stalled(now, oldest):
                log.warning("the reader process is not working on its requests; replacing it")
                lost = self._let_go(now)
            elif self.pid is None and now - self._started_at > settings.READER_START_TIMEOUT:
                log.warning("the reader process did not come up; replacing it")
                lost = self._let_go(now)
        if self.proc is None and restart and now >= self._restart_at:
            self.restarts += 1
            self.start()
        self.in_process += len(lost)
        return lost

    def _stalled(self, now: float, oldest: Forwarded) -> bool:
        """A request has waited `stall` seconds and the reader is stopped, or has used no
        CPU for that long: hung (SIGSTOP, a deadlock), not busy with a long listing. Its CPU
        time is read at each check while requests wait (Linux; elsewhere never stalled)."""
        pid = self.proc.pid
        cpu = cpu_seconds(pid)
        if cpu is None:
            return False  # no /proc: READER_TIMEOUT decides
        if self._cpu_mark is None or self._cpu_mark[1] != cpu:
            self._cpu_mark = (now, cpu)  # it worked since the last look
        if now - oldest.sent < self.stall:
            return False
        return is_stopped(pid) or now - self._cpu_mark[0] >= self.stall

    def figures(self) -> dict[str, Any]:
        """For `status`: the reader's pid (None while none is up) and its counters."""
        return {
            "pid": self.pid,
            "answered": self.answered,
            "in_process": self.in_process,
            "pending": len(self.pending),
            "restarts": self.restarts,
        }

    def close(self) -> None:
        """Stop the reader: its stdin closes (it exits on that), then it is killed if it has
        not gone within a second."""
        self._let_go(time.monotonic(), wait=1.0)

    def _let_go(self, now: float, wait: float = 0.0) -> list[Forwarded]:
        proc, sock = self.proc, self.socket
        lost = list(self.pending.values())
        self.pending.clear()
        self.proc = self.socket = self.pid = None
        self._cpu_mark = None
        if sock is not None:
            if self._poller is not None:
                try:
                    self._poller.unregister(sock)
                except KeyError:
                    pass
            sock.close(linger=0)
        _remove(self._folder)
        self._folder = None
        if proc is not None:
            if not stop_child(proc, wait):
                log.warning("the reader process %s did not exit", proc.pid)
            lived = now - self._started_at
            self._schedule_restart(now, young=lived < settings.READER_YOUNG)
        return lost

    def _schedule_restart(self, now: float, young: bool = True) -> None:
        """At once after a reader that lived a while; after a pause, doubling up to a limit,
        after one that died young (or did not start), so a reader that cannot run costs the
        server nothing but its in-process answers."""
        if young:
            self._pause = min(
                settings.READER_MAX_PAUSE, max(settings.READER_MIN_PAUSE, 2 * self._pause)
            )
        else:
            self._pause = 0.0
        self._restart_at = now + self._pause


def _private_endpoint() -> tuple[str, str | None]:
    """(the URL to bind, the folder to remove with it): a Unix socket in a new 0700 folder
    (a short path, under the temp folder: such paths are limited to ~100 bytes), or a port on
    127.0.0.1 where there are no Unix sockets."""
    if os.name == "posix" and zmq.has("ipc"):
        _sweep(tempfile.gettempdir())
        folder = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
        return f"ipc://{folder}/channel", folder
    return "tcp://127.0.0.1:*", None


_PREFIX = "trellis2-reader-"  # then the backend's pid, a dash and mkdtemp's letters


def _sweep(parent: str) -> None:
    """Remove the channel folders of this user's backends that are gone: a backend and its
    reader killed together (SIGKILL to their process group) leave theirs behind."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(_PREFIX):
            continue
        pid = entry.name[len(_PREFIX) :].split("-", 1)[0]
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        mine = stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
        if mine and pid.isdigit() and not pid_alive(int(pid)):
            _remove(entry.path)


def _remove(folder: str | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _folder_of(url: str) -> str | None:
    """The private folder of a channel `_private_endpoint` made (None for a port): the
    reader removes it as it ends, so a server killed by SIGKILL leaves none behind."""
    if not url.startswith("ipc://"):
        return None
    folder, name = os.path.split(url[len("ipc://") :])
    made = os.path.basename(folder).startswith(_PREFIX) and name == "channel"
    return folder if made else None


def overlay(unrecorded: dict[str, dict], counts: dict[str, Any] | None) -> bytes:
    """What a forwarded request carries of the server's memory (b"" when nothing)."""
    if not unrecorded and counts is None:
        return b""
    data: dict[str, Any] = {}
    if unrecorded:
        data["unrecorded"] = unrecorded
    if counts is not None:
        data["counts"] = counts
    return json.dumps(data, separators=(",", ":"), default=str).encode("utf-8")


# -- the reader's side --------------------------------------------------------------------------


class Answerer:
    """The reader's replies, as encoded content: `store.listing`'s, over the output folder (a
    store that never writes, one per request with that request's unrecorded outcomes) and the
    stats tally. Thread-safe."""

    def __init__(self, output_dir: Path, state_dir: Path):
        self.output_dir = output_dir
        self.tally = StatsTally(state_dir / "stats.jsonl")
        self._tally_lock = threading.Lock()

    def answer(self, msg_type: str, content: bytes, extra: bytes) -> bytes:
        try:
            request = json.loads(content)
            memory = json.loads(extra) if extra else {}
            store = JobStore(self.output_dir)  # no I/O until asked
            store.show_unrecorded(memory.get("unrecorded") or {})
            reply = self._reply(store, msg_type, request, memory)
        except BackendError as exc:
            reply = protocol.error_reply(exc)
        except Exception as exc:  # as the server's handlers: a typed reply, never a crash
            log.exception("reader: %s failed", msg_type)
            reply = protocol.error_reply(BackendError(ErrorCode.INTERNAL, f"{exc!r}"))
        try:
            return protocol.encode(reply)
        except (TypeError, ValueError) as exc:
            log.exception("reply to %s not encodable", msg_type)
            error = BackendError(ErrorCode.INTERNAL, f"reply not encodable: {exc}")
            return protocol.encode(protocol.error_reply(error))

    def _reply(self, store: JobStore, msg_type: str, request: dict, memory: dict) -> dict:
        if msg_type == "jobs":
            return list_jobs(store, request, summary)
        if msg_type == "job":
            return job_reply(store, request)
        if msg_type == "stats":
            counts = memory["counts"]
            with self._tally_lock:
                figures = self.tally.aggregate()
            return stats_reply(figures, counts["requests"], counts["rejected"], counts["uptime"])
        raise BackendError(ErrorCode.INTERNAL, f"the reader does not answer {msg_type!r}")


def run(output_dir: Path, state_dir: Path, parent_pid: int | None) -> int:
    """`python -m backend reader`: the reader process's main. Its stdin's first line is
    {"key", "url"}; it ends when stdin closes."""
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the server's to handle
    try:
        hello = json.loads(sys.stdin.buffer.readline(4096))
        key, url = bytes.fromhex(hello["key"]), str(hello["url"])
    except (ValueError, KeyError, TypeError):
        log.error("reader: no key on stdin")
        return 2
    folder = _folder_of(url)
    _exit_with_stdin(lambda code: (_remove(folder), os._exit(code)))
    lower_own_priority(settings.READER_NICE)
    answerer = Answerer(output_dir, state_dir)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
    sock.connect(url)
    done = ctx.socket(zmq.PULL)  # answers signed by the threads, sent from here
    done.bind(_DONE_URL)
    work: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
    for i in range(settings.READER_THREADS):
        worker = threading.Thread(
            target=_answer_forever, args=(ctx, key, answerer, work), name=f"reader-{i}"
        )
        worker.daemon = True
        worker.start()
    sock.send_multipart(_signed(key, _ANSWER, [b"", json.dumps({"pid": os.getpid()}).encode()]))
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(done, zmq.POLLIN)
    while True:
        ready = dict(poller.poll(1000))
        if not ready:
            if parent_pid and not pid_alive(parent_pid):
                _remove(folder)
                return 0
            continue
        while sock in ready:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            body = _verified(key, _QUERY, frames)
            if body is None or len(body) != 4:
                log.warning("reader: a message that is not the server's was dropped")
                continue
            work.put(body)
        while done in ready:
            try:
                frames = done.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            sock.send_multipart(frames)


def _answer_forever(
    ctx: zmq.Context, key: bytes, answerer: Answerer, work: queue.SimpleQueue[list[bytes]]
) -> None:
    """A reader thread: requests in arrival order (READER_THREADS at a time), each answer
    signed here and handed to the main thread to send."""
    done = ctx.socket(zmq.PUSH)
    done.connect(_DONE_URL)
    while True:
        token, msg_type, content, extra = work.get()
        reply = answerer.answer(msg_type.decode("ascii", "replace"), content, extra)
        done.send_multipart(_signed(key, _ANSWER, [token, reply]))


def _exit_with_stdin(exit: Callable[[int], None] = os._exit) -> None:
    """End this process when stdin reaches its end: the server closed it, or exited however
    it died (no orphan reader)."""

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        exit(0)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()
