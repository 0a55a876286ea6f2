"""One backend child process: how it is launched (command, environment, process group), its
log file (rotation, tail), its handshake bookkeeping and the signals that end it. Used by
`supervisor.py`; stdlib + pyzmq only."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import zmq

from .. import settings
from ..backendlogs import LOG_PREFIX, Predecessor, fallback_log_dir
from ..errors import BackendError, ErrorCode
from ..procutil import pid_alive
from ..safefs import Folder
from ..wire import protocol
from ..wire.client import Client
from . import commands
from .lifecycle import LadderWalk

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class BackendSpec:
    """How to launch a backend process."""

    output_dir: Path
    connection_file: Path
    log_dir: Path | None = None  # default OUTPUT_DIR/logs
    python: str = sys.executable
    engine: str = "preview"
    engine_options: dict[str, str] = field(default_factory=dict)
    extra_pythonpath: list[str] = field(default_factory=list)  # e.g. a bundled-wheels folder
    env: dict[str, str] = field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES
    queue_depth: int = settings.QUEUE_DEPTH
    state_dir: Path | None = None
    min_free_disk_mb: float | None = None
    heartbeat_interval: float | None = None  # default: a quarter of the heartbeat timeout, <= 1 s
    status_interval: float = (
        settings.STATUS_INTERVAL
    )  # how often a ready backend is asked for `status` (VRAM, queue)
    keep_logs: int = 10  # backend logs kept in log_dir (oldest removed first)
    extra_args: list[str] = field(default_factory=list)  # more `serve` arguments

    def __post_init__(self) -> None:
        # Resolved once, here: the backend runs in another working directory (the extension
        # root), so a relative path would name another folder there. Bytes paths are decoded.
        self.output_dir = absolute(self.output_dir)
        self.connection_file = absolute(self.connection_file)
        self.log_dir = absolute(self.log_dir) if self.log_dir else self.output_dir / "logs"
        self.state_dir = absolute(self.state_dir) if self.state_dir else None
        self.python = os.fsdecode(self.python)
        if os.sep in self.python or (os.altsep and os.altsep in self.python):
            self.python = str(absolute(self.python))  # a bare name is looked up on PATH
        self.extra_pythonpath = [str(absolute(p)) for p in self.extra_pythonpath]

    @property
    def standby_connection_file(self) -> Path:
        path = self.connection_file
        return path.with_name(f"{path.stem}.standby{path.suffix or '.json'}")


def absolute(path: str | bytes | os.PathLike) -> Path:
    """`path` against this process's working directory (no link resolved, `..` kept)."""
    return Path.cwd() / os.fsdecode(path)


class StartError(BackendError):
    """The backend did not come up; carries the tail of its log."""

    def __init__(self, message: str, log_path: Path | None, log_tail: str):
        where = f"the backend log {log_path}" if log_path else "the backend log"
        hint = f"Last lines of {where}:\n{log_tail}" if log_tail else f"See {where}."
        super().__init__(ErrorCode.ENGINE_UNAVAILABLE, message, hint)
        self.log_path = log_path
        self.log_tail = log_tail


# -- logs ------------------------------------------------------------------------------------


def rotate_logs(log_dir: Path, keep: int, protect: set[Path] = frozenset()) -> list[Path]:
    """Remove the oldest backend logs so that at most `keep` remain; returns those removed.
    Only regular files in the logs folder itself: a link (at a log's name, or the folder) is
    never followed, so nothing outside is ever deleted."""
    try:
        with Folder.at(log_dir) as folder:
            logs = sorted(
                (st.st_mtime, name)
                for name, st in folder.entries()
                if name.startswith(LOG_PREFIX)
                and name.endswith(".log")
                and stat.S_ISREG(st.st_mode)
            )
            removed = []
            for _, name in logs[: max(0, len(logs) - keep)]:
                if log_dir / name in protect:
                    continue
                try:
                    folder.remove(name)
                    removed.append(log_dir / name)
                except OSError:
                    pass
            return removed
    except OSError:
        return []


# -- one backend process ------------------------------------------------------------------


class BackendProcess:
    """One spawned backend process: its log, handshake, client and (when going) its ladder."""

    def __init__(
        self,
        role: str,
        proc: subprocess.Popen,
        log_path: Path,
        log_file: Any,
        conn_path: Path,
        spawned_at: float,
        stale_session: str | None,
    ):
        self.role = role  # "active" | "standby"
        self.proc = proc
        self.log_path = log_path
        self.log_file = log_file
        self.conn_path = conn_path
        self.spawned_at = spawned_at
        self.stale_session = stale_session
        self.info: protocol.ConnectionInfo | None = None
        self.client: Client | None = None
        self.hello: dict[str, Any] | None = None
        self.connected_at: float | None = None
        self.loaded = False
        self.failed: str | None = None  # the engine failed to load
        self.pending: dict[str, tuple[str, float]] = {}  # msg_id -> (request, sent at)
        self.last_status: dict[str, Any] = {}
        self.last_heartbeat: dict[str, Any] = {}
        self.next_status = spawned_at
        self.activating_since: float | None = None
        self.walk: LadderWalk | None = None
        self.why_gone = ""
        self.orphan: str | None = None  # the job it was running when it went unplanned
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.info.pid if self.info else self.proc.pid

    @property
    def session(self) -> str | None:
        return self.info.session if self.info else None

    def poll_exit(self) -> int | None:
        if self.exit_code is None:
            self.exit_code = self.proc.poll()
        return self.exit_code

    def send(self, msg_type: str, now: float, content: dict[str, Any] | None = None) -> str | None:
        if self.client is None:
            return None
        try:
            msg_id = self.client.send(msg_type, content)
        except zmq.ZMQError as exc:
            log.debug("cannot send %s to pid %s: %s", msg_type, self.pid, exc)
            return None
        self.pending[msg_id] = (msg_type, now)
        return msg_id

    def waiting_for(self, msg_type: str) -> bool:
        return any(kind == msg_type for kind, _ in self.pending.values())

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.log_file is not None:
            try:
                self.log_file.close()
            except OSError:
                pass
            self.log_file = None


# -- launching -------------------------------------------------------------------------------


def spawn(
    spec: BackendSpec,
    role: str,
    now: float,
    heartbeat: float,
    protect: set[Path],
    predecessor: Predecessor | None = None,
) -> BackendProcess:
    """Launch one backend (`role` "active" or "standby") with its own log file; `predecessor`
    tells it of the backend that went before it (the jobs that one left running)."""
    conn_path = spec.connection_file if role == "active" else spec.standby_connection_file
    stale = read_conn(conn_path)
    if stale is not None and not pid_alive(stale.pid):
        unlink_quietly(conn_path)  # a dead backend's file must not describe anything
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    command = backend_command(spec, conn_path, role, heartbeat)
    log_dir, log_file = open_log(spec, f"{LOG_PREFIX}{stamp}-{role}.log", protect)
    log_path = log_dir / f"{LOG_PREFIX}{stamp}-{role}.log"
    try:  # a full disk loses the header, not the backend
        log_file.write(os.fsencode(f"# {' '.join(command)}\n"))
    except OSError:
        pass
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=backend_environment(spec, predecessor),
            cwd=str(settings.EXTENSION_ROOT),
            close_fds=True,
            **process_group_options(),
        )
    except OSError as exc:
        log_file.close()
        raise StartError(
            f"cannot run the backend interpreter {spec.python}: {exc}", log_path, ""
        ) from None
    final = f"{LOG_PREFIX}{stamp}-{proc.pid}.log"
    try:  # name the log after the pid (Windows cannot rename an open file: keep the name)
        with Folder.at(log_dir) as folder:
            folder.rename(log_path.name, final)
        log_path = log_dir / final
    except OSError:
        pass
    b = BackendProcess(
        role, proc, log_path, log_file, conn_path, now, stale.session if stale else None
    )
    log.info("spawned %s backend pid %s (log %s)", role, proc.pid, log_path)
    return b


def open_log(spec: BackendSpec, name: str, protect: set[Path]) -> tuple[Path, Any]:
    """A new 0600 log file in the logs folder (never a link); when that folder cannot be used
    (read-only, full, a planted link) a private folder in the temp dir, then nowhere."""
    for log_dir in (spec.log_dir, fallback_log_dir()):
        try:
            with Folder.at(log_dir, create=True) as folder:
                rotate_logs(log_dir, max(1, spec.keep_logs) - 1, protect)
                fd = folder.create(name)
        except OSError as exc:
            log.warning("cannot write backend logs in %s: %s", log_dir, exc)
            continue
        return log_dir, os.fdopen(fd, "ab", buffering=0)
    return Path(os.devnull).parent, open(os.devnull, "ab", buffering=0)  # noqa: SIM115 - no log


def _is_log(name: str) -> bool:
    return name.startswith(LOG_PREFIX) and name.endswith(".log")


def backend_command(spec: BackendSpec, conn_path: Path, role: str, heartbeat: float) -> list[str]:
    """`python -m backend serve ...` for one backend of this spec."""
    return commands.serve_command(
        spec.python,
        connection_file=conn_path,
        output_dir=spec.output_dir,
        engine=spec.engine,
        engine_options=spec.engine_options,
        parent_pid=os.getpid(),
        heartbeat=heartbeat,
        queue_depth=spec.queue_depth,
        state_dir=spec.state_dir,
        min_free_disk_mb=spec.min_free_disk_mb,
        standby=role == "standby",
        extra=spec.extra_args,
    )


def backend_environment(
    spec: BackendSpec, predecessor: Predecessor | None = None
) -> dict[str, str]:
    note = predecessor.to_json() if predecessor is not None else None
    return commands.backend_environment(spec.extra_pythonpath, spec.env, predecessor=note)


# -- platform helpers -----------------------------------------------------------------------


def process_group_options() -> dict[str, Any]:
    """Own process group: a Ctrl-C in the terminal reaches the supervisor, not the backend."""
    if sys.platform == "win32":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        return {"creationflags": flags}
    return {"start_new_session": True}


def signal_group(proc: subprocess.Popen, terminate: bool) -> None:
    if proc.poll() is not None:
        return
    if sys.platform == "win32":
        if terminate:  # CTRL_BREAK reaches only our own process group
            proc.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            proc.kill()
        return
    sig = signal.SIGTERM if terminate else signal.SIGKILL
    try:
        os.killpg(proc.pid, sig)  # the backend leads its own session; helpers die with it
    except (ProcessLookupError, PermissionError):
        proc.send_signal(sig)


def read_conn(path: Path) -> protocol.ConnectionInfo | None:
    try:
        return protocol.read_connection_file(path)
    except BackendError:
        return None


def is_ours(info: protocol.ConnectionInfo, b: BackendProcess) -> bool:
    if info.pid == b.proc.pid:
        return True
    # A Windows venv's python.exe is a launcher whose child is the real backend.
    return sys.platform == "win32" and info.session != b.stale_session


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
