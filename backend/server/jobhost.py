"""Job hosts: a backend that runs several jobs at once (`--max-concurrent N` with a CPU engine)
runs each in a process of its own, so that N jobs computing in Python never queue with the
control loop for one GIL (docs/PERFORMANCE.md, issue #15). With one job at a time (every GPU
engine) the job runs on a thread of the backend, as before: one job thread leaves the loop's
ping p99 well under its goal, and a GPU's CUDA context, memory profile and poisoned-context
rule belong to the backend process the supervisor respawns.

A host (`python -m backend jobhost`, built by `supervision.commands.jobhost_command`) loads
its own engine and runs `pipeline.runner.Runner` on the same output folder: it is the backend's
hand, writing job files and stats lines while the backend holds the folder's locks. The
backend says what to do on the host's stdin, one JSON object a line: first the host's
settings, then `run`, `cancel` and `interrupt`. The host answers on its stdout, one JSON object
a line: `loading`, `ready` or `load_failed`, the runner's events, and `ended` per job. Stray
prints in the host go to its stderr (the backend's log), never into that channel. The pipes
are the parent's and the child's alone, so nothing is signed.

A host exits when its stdin closes: the backend closed it, or exited however it died, so no
host outlives its backend or writes into a folder the next backend owns. A job whose host
dies is the job of a dead backend (`store.jobs.after_backend_died`: once more, then failed);
the backend starts another host. A host that has not ended a cancelled job
`settings.JOB_PROCESS_CANCEL_GRACE` after the cancel (stopped, or stuck in native code) is
stopped with it, and the job ends cancelled (its record says the user cancelled it). A
stopping backend stops its hosts last; a job one of them never requeued is left `running` for
the next backend."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .. import settings
from ..errors import BackendError, ErrorCode
from ..procutil import lower_own_priority, pid_alive, stop_child
from ..supervision import commands

log = logging.getLogger(__name__)

MAX_LINE = 16 << 20  # bytes of one message on a host's channel (events are a few KB)
POLL = 0.05  # seconds between a running job's checks for cancel and stop


@dataclass(frozen=True)
class HostSettings:
    """What a host needs to run jobs like its backend; its stdin's first line."""

    output_dir: Path
    state_dir: Path
    engine: str
    engine_options: dict[str, str]
    min_free_disk: int

    def to_line(self) -> bytes:
        data = {
            "output_dir": str(self.output_dir),
            "state_dir": str(self.state_dir),
            "engine": self.engine,
            "engine_options": dict(self.engine_options),
            "min_free_disk": int(self.min_free_disk),
        }
        return _line(data)

    @classmethod
    def from_line(cls, line: bytes) -> HostSettings:
        data = json.loads(line)
        return cls(
            output_dir=Path(data["output_dir"]),
            state_dir=Path(data["state_dir"]),
            engine=str(data["engine"]),
            engine_options={str(k): str(v) for k, v in data["engine_options"].items()},
            min_free_disk=int(data["min_free_disk"]),
        )


class HostGone(Exception):
    """The host process ended (or could not be started); `why` says how."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), default=str).encode("utf-8") + b"\n"


# -- the backend's side ---------------------------------------------------------------------


class JobHost:
    """The backend's handle on one host: used by one worker thread (start, load, run, stop);
    `figures`, `shut` and `close` from any thread. `cancel_grace`: how long a cancelled job
    may take to end before its host is stopped (settings.JOB_PROCESS_CANCEL_GRACE)."""

    def __init__(
        self,
        slot: int,
        host_settings: HostSettings,
        python: str = sys.executable,
        cancel_grace: float = settings.JOB_PROCESS_CANCEL_GRACE,
    ):
        self.slot = slot
        self.settings = host_settings
        self.python = python
        self.cancel_grace = cancel_grace
        self.proc: subprocess.Popen | None = None
        self.started = 0  # hosts started in this slot (a second one replaced one that died)
        self.job_id: str | None = None
        self._messages: queue.SimpleQueue[dict[str, Any] | HostGone] = queue.SimpleQueue()
        self._write_lock = threading.Lock()
        self._proc_lock = threading.Lock()  # a launch and the backend's last close
        self._shut = False
        self._ready = False  # the launched process said its engine has loaded

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def figures(self) -> dict[str, Any]:
        """For `status.job_hosts`."""
        alive = self.proc is not None and self.proc.poll() is None
        return {
            "slot": self.slot,
            "pid": self.pid if alive else None,
            "job_id": self.job_id,
            "restarts": max(0, self.started - 1),
            "ready": alive and self._ready,  # its engine has loaded
        }

    def start(self, progress: Callable[[float, str], None] | None = None) -> None:
        """Start a host and wait until its engine has loaded (`launch`, then `wait_ready`)."""
        self.launch()
        self.wait_ready(progress)

    def launch(self) -> None:
        """Start a host process (a running one is stopped first); raises HostGone when it
        cannot start."""
        self.close()
        command = commands.jobhost_command(self.python, slot=self.slot, parent_pid=os.getpid())
        with self._proc_lock:
            if self._shut:
                raise HostGone("the backend is stopping")
            try:
                proc = commands.start_helper(command, stdout=subprocess.PIPE)
            except OSError as exc:
                raise HostGone(f"the job process did not start: {exc}") from None
            self.proc = proc
            self._ready = False
        self.started += 1
        self._messages = queue.SimpleQueue()
        threading.Thread(
            target=self._read, args=(proc, self._messages), name=f"jobhost-{self.slot}", daemon=True
        ).start()
        self._send(self.settings.to_line())

    def wait_ready(self, progress: Callable[[float, str], None] | None = None) -> None:
        """Until the launched host's engine has loaded, its progress passed on. Raises
        BackendError when the engine cannot load (the host's own typed error), HostGone when
        the host died first."""
        while True:
            message = self._next(timeout=None)
            kind = message.get("t")
            if kind == "ready":
                self._ready = True
                log.info("job process %s (slot %s) is ready", self.pid, self.slot)
                return
            if kind == "load_failed":
                self.close()
                raise BackendError.from_dict(message["error"])
            if kind == "loading" and progress is not None:
                progress(float(message.get("fraction", 0.0)), str(message.get("text", "")))

    def run(
        self,
        job_id: str,
        emit: Callable[[str, dict[str, Any]], None],
        cancel: threading.Event,
        stopping: threading.Event,
    ) -> dict[str, Any]:
        """Have the host run a job; its events go to `emit` as they come. Returns the host's
        `ended` message (`outcome`, `poisoned`, `unrecorded`); raises HostGone when the host
        died first. The user's cancel and the backend's stop are passed on as they happen. A
        host that has not ended the job `cancel_grace` seconds after its cancel (it hangs) is
        stopped: HostGone says so once it is gone (what it sent before is passed on first)."""
        self.job_id = job_id
        told_stop = False
        told_cancel: float | None = None  # when
        stopped: tuple[float, str] | None = None  # when, why
        try:
            self._send(_line({"op": "run", "job_id": job_id}))
            while True:
                now = time.monotonic()
                if cancel.is_set() and told_cancel is None:
                    told_cancel = now
                    self._send(_line({"op": "cancel", "job_id": job_id}))
                if stopping.is_set() and not told_stop:
                    told_stop = True
                    self._send(_line({"op": "interrupt"}))
                if stopped is None and told_cancel is not None:
                    if now - told_cancel >= self.cancel_grace:
                        stopped = (now, self._stop_hung(job_id))
                elif stopped is not None and now - stopped[0] >= self.cancel_grace:
                    raise HostGone(stopped[1])  # killed, yet its pipe has not closed
                try:
                    message = self._next(timeout=POLL)
                except queue.Empty:
                    continue
                except HostGone:
                    if stopped is not None:
                        raise HostGone(stopped[1]) from None
                    raise
                kind = message.get("t")
                if kind == "event":
                    emit(str(message["type"]), message["content"])
                elif kind == "ended" and message.get("job_id") == job_id:
                    return message
        finally:
            self.job_id = None

    def _stop_hung(self, job_id: str) -> str:
        """Stop a host that did not act on its job's cancel; why, for the job's log."""
        proc = self.proc
        why = (
            f"its job process {self.pid} did not stop within {self.cancel_grace:g} s of the"
            " cancel and was stopped"
        )
        log.warning("job %s: %s", job_id, why)
        if proc is not None and not stop_child(proc, 0.0):
            log.warning("job process %s did not exit", proc.pid)
        return why

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def is_shut(self) -> bool:
        """The backend stopped this host for good (`shut`): it is stopping."""
        return self._shut

    def shut(self) -> None:
        """The backend's last word: start no host after this one, and close its stdin (it
        exits on that at once). `close` then waits for it and kills it if it hangs."""
        with self._proc_lock:
            self._shut = True
            proc = self.proc
        if proc is not None:
            try:
                proc.stdin.close()
            except (OSError, AttributeError):
                pass

    def close(self, wait: float = 1.0) -> None:
        """Stop the host: its stdin closes (it exits on that at once), then it is killed if it
        has not gone within `wait` seconds."""
        with self._proc_lock:
            proc, self.proc = self.proc, None
        if proc is not None and not stop_child(proc, wait):
            log.warning("job process %s did not exit", proc.pid)

    def _send(self, line: bytes) -> None:
        proc = self.proc
        if proc is None:
            raise HostGone("the job process is not running")
        try:
            with self._write_lock:
                proc.stdin.write(line)
                proc.stdin.flush()
        except (OSError, ValueError):
            pass  # it died: its reader thread says how

    def _next(self, timeout: float | None) -> dict[str, Any]:
        message = self._messages.get(timeout=timeout)
        if isinstance(message, HostGone):
            raise message
        return message

    @staticmethod
    def _read(proc: subprocess.Popen, messages: queue.SimpleQueue) -> None:
        """The host's channel, a message a line, until it ends; then how the host ended."""
        stream: BinaryIO = proc.stdout
        try:
            while True:
                line = stream.readline(MAX_LINE + 1)
                if not line:
                    break
                if len(line) > MAX_LINE or not line.endswith(b"\n"):
                    log.warning("job process %s: a message over %s bytes", proc.pid, MAX_LINE)
                    proc.kill()
                    break
                try:
                    message = json.loads(line)
                except ValueError:
                    log.warning("job process %s: not a message: %r", proc.pid, line[:200])
                    continue
                if isinstance(message, dict):
                    messages.put(message)
        except (OSError, ValueError):
            pass
        try:
            code = proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        messages.put(HostGone(_ended(proc.pid, code)))


def _ended(pid: int, code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"its job process {pid} was killed by {name}"
    return f"its job process {pid} exited with code {code}"


# -- the host's side ------------------------------------------------------------------------


class _Channel:
    """The host's way back to its backend: one JSON object a line on a private copy of the
    stdout it was started with."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "wb", buffering=0)
        os.dup2(2, 1)  # a print from an engine or a library lands in the log, not in here
        self._lock = threading.Lock()

    def send(self, data: dict[str, Any]) -> None:
        line = _line(data)
        with self._lock:
            self._out.write(line)


class _Orders:
    """What the backend says on stdin, read by a thread of its own: jobs to run (in order),
    the running job's cancel, the backend's stop. At stdin's end the host exits at once."""

    def __init__(self, stdin: BinaryIO, exit: Callable[[int], None] = os._exit):
        self.jobs: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.interrupted = threading.Event()
        self._stdin = stdin
        self._exit = exit
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._read, name="orders", daemon=True).start()

    def cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.discard(job_id)

    def _read(self) -> None:
        try:
            while True:
                line = self._stdin.readline(MAX_LINE)
                if not line:
                    break
                try:
                    order = json.loads(line)
                    op = order["op"]
                except (ValueError, KeyError, TypeError):
                    log.warning("job process: not an order: %r", line[:200])
                    continue
                if op == "run":
                    self.jobs.put(str(order["job_id"]))
                elif op == "cancel":
                    with self._lock:
                        self._cancelled.add(str(order["job_id"]))
                elif op == "interrupt":
                    self.interrupted.set()
        except (OSError, ValueError):
            pass
        self._exit(0)


def run(slot: int, parent_pid: int | None) -> int:
    """`python -m backend jobhost`: a job host's main (started by the backend, never by hand)."""
    from ..engines import create as create_engine
    from ..engines import load_error
    from ..pipeline import heap
    from ..pipeline.runner import Runner, RunnerConfig
    from ..store.jobs import JobStore
    from ..store.stats import StatsLog

    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the backend's to handle
    channel = _Channel()
    try:
        host = HostSettings.from_line(sys.stdin.buffer.readline(MAX_LINE))
    except (ValueError, KeyError, TypeError) as exc:
        log.error("job process: no settings on stdin (%s)", exc)
        return 2
    orders = _Orders(sys.stdin.buffer)
    orders.start()
    lower_own_priority(settings.JOB_PROCESS_NICE)
    began = time.monotonic()
    try:
        engine = create_engine(host.engine, **host.engine_options)
        engine.load(lambda f, text="": channel.send({"t": "loading", "fraction": f, "text": text}))
    except Exception as exc:
        channel.send({"t": "load_failed", "error": load_error(exc).to_dict()})
        return 1
    # The backend holds the folder's locks; this store is its hand and writes without them.
    store = JobStore(host.output_dir)
    runner = Runner(
        engine,
        store,
        StatsLog(host.state_dir / "stats.jsonl"),
        None,
        RunnerConfig(min_free_disk=host.min_free_disk),
    )
    heap.settle()  # a process of its own: what the engine built lives as long as it
    seconds = round(time.monotonic() - began, 4)
    log.info("job process %s (slot %s) ready in %.2f s", os.getpid(), slot, seconds)
    channel.send({"t": "ready", "pid": os.getpid(), "seconds": seconds})

    def emit(msg_type: str, content: dict[str, Any], parent: Any = None) -> None:
        channel.send({"t": "event", "type": msg_type, "content": content})

    while True:
        job_id = orders.jobs.get()
        ended: dict[str, Any] = {"t": "ended", "job_id": job_id, "outcome": None}
        try:
            result = runner.run(
                store.get(job_id),
                emit=emit,
                cancelled=lambda j=job_id: orders.cancelled(j),
                interrupted=orders.interrupted.is_set,
            )
            ended.update(outcome=result.outcome, poisoned=result.poisoned)
        except BackendError as exc:  # the store could not write the job's record
            ended["unrecorded"] = exc.to_dict()
        except Exception as exc:
            log.exception("job process failed on job %s", job_id)
            ended["unrecorded"] = BackendError(ErrorCode.INTERNAL, repr(exc)).to_dict()
        finally:
            orders.forget(job_id)
        channel.send(ended)
        if parent_pid and not pid_alive(parent_pid):  # stdin's end says so too; a backstop
            return 0
