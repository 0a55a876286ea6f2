"""A studio server on this machine for tests and benchmarks: a real `redis-server` on a free
loopback port, a gateway process and GPU-worker processes (CPU engines stand in for GPUs).

Everything binds to 127.0.0.1, lives in a temporary folder and is stopped by `close()`.
Without `redis-server` on PATH this raises, so CI fails loudly; set TRELLIS2_SKIP_REDIS=1 to
skip the tests that need it on a machine without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP_ENV = "TRELLIS2_SKIP_REDIS"

# Short limits so a lost worker's job moves on within seconds (docs/SCALE.md has the defaults).
FAST_TIMING = {
    "visibility_timeout": 4.0,
    "restore_interval": 1.0,
    "lease_seconds": 3.0,
    "lease_renew": 0.5,
    "retry_countdown": 1.0,
    "registry_ttl": 3.0,
    "registry_renew": 0.5,
}


def free_port(pairs: int = 1) -> int:
    """A loopback port P with P..P+2*pairs-1 free when asked (bind-and-close: a later bind may
    still lose a race; callers retry)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 2 * pairs >= 65535:
            continue
        try:
            for offset in range(1, 2 * pairs):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError("no free loopback port")


def wait_for(predicate, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


class RedisServer:
    """`redis-server` on 127.0.0.1:<free port>, no persistence, in its own folder."""

    def __init__(self, folder: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (apt-get install redis-server); "
                f"set {SKIP_ENV}=1 to skip the studio-server tests"
            )
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        args = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.folder),
            "--protected-mode",
            "yes",
        ]
        self.log = open(self.folder / "redis.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 10.0, "redis-server")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {(self.folder / 'redis.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def server_python() -> str | None:
    """An interpreter that can run the gateway and workers (Celery, redis-py): this one,
    TRELLIS2_SERVER_PYTHON, or the checkout's .venv (scripts/setup.sh makes it)."""
    candidates = [sys.executable, os.environ.get("TRELLIS2_SERVER_PYTHON", "")]
    candidates.append(
        str(ROOT / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    )
    for python in candidates:
        if python and Path(python).exists():
            check = subprocess.run(
                [python, "-c", "import celery, redis, zmq"], capture_output=True, timeout=60
            )
            if check.returncode == 0:
                return python
    return None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Cluster:
    """Redis + a gateway + GPU workers, each a real process, in `folder`."""

    def __init__(
        self,
        folder: Path,
        engine: str = "preview",
        engine_options: dict[str, str] | None = None,
        queue_depth: int = 32,
        timing: dict[str, float] | None = None,
        python: str | None = None,
    ):
        self.folder = Path(folder)
        # The gateway and workers need Celery and redis-py: Blender's Python (the add-on's
        # tests) hands them to the backend's venv.
        self.python = python or sys.executable
        self.home = self.folder / "gateway-home"
        self.store = self.folder / "store"
        self.engine = engine
        self.engine_options = engine_options or {}
        self.queue_depth = queue_depth
        self.timing = timing or FAST_TIMING
        self.redis = RedisServer(self.folder / "redis")
        self.port = free_port(pairs=1)
        self.listen = f"tcp://127.0.0.1:{self.port}"
        self.gateway: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    # -- processes ------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 (closed in close)
        self._logs.append(log)
        return subprocess.Popen(
            [self.python, "-m", "backend", *args],
            cwd=str(ROOT),
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_gateway(self, timeout: float = 30.0) -> None:
        info_path = self.home / "gateway.json"
        old = _read_json(info_path).get("pid")
        self.gateway = self._spawn(
            "gateway",
            [
                "gateway",
                "--home",
                str(self.home),
                "--listen",
                self.listen,
                "--broker",
                self.redis.url,
                "--store",
                str(self.store),
                "--queue-depth",
                str(self.queue_depth),
                "--min-free-disk-mb",
                "1",
            ],
        )
        pid = self.gateway.pid

        def bound() -> bool:
            if self.gateway.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.log_tail('gateway')}")
            return _read_json(info_path).get("pid") == pid and pid != old

        wait_for(bound, timeout, "the gateway")

    def start_worker(self, name: str, vram_gb: float = 24, gpu: int = 0) -> subprocess.Popen:
        args = [
            "worker",
            "--broker",
            self.redis.url,
            "--store",
            str(self.store),
            "--work-dir",
            str(self.folder / "workers" / name),
            "--name",
            name,
            "--gpu",
            str(gpu),
            "--vram-gb",
            str(vram_gb),
            "--engine",
            self.engine,
            "--min-free-disk-mb",
            "1",
        ]
        for key, value in self.engine_options.items():
            args += ["--engine-opt", f"{key}={value}"]
        for key, value in self.timing.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        proc = self._spawn(f"worker-{name}", args)
        self.workers[name] = proc
        return proc

    def add_user(self, name: str, listen: str | None = None) -> str:
        from backend.wire import curvekeys

        return curvekeys.add_user(self.home, name, listen or self.listen)

    def wait_workers(self, names, timeout: float = 60.0) -> list[dict]:
        """Until every named worker has announced itself in Redis (its backend is ready)."""
        from backend.studio.coord import Coordinator

        coord = Coordinator(self.redis.url)
        try:

            def ready():
                for name, proc in self.workers.items():
                    if name in names and proc.poll() is not None:
                        raise RuntimeError(f"worker {name} exited:\n{self.log_tail(name)}")
                live = {w["name"]: w for w in coord.workers()}
                return [live[n] for n in names] if all(n in live for n in names) else None

            return wait_for(ready, timeout, f"workers {names}", step=0.1)
        finally:
            coord.close()

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        proc.wait(30)

    def stop(self, proc: subprocess.Popen, timeout: float = 30.0) -> None:
        """SIGTERM to the process group, then SIGKILL."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            except ProcessLookupError:
                pass

    def log_tail(self, name: str, lines: int = 60) -> str:
        for candidate in (name, f"worker-{name}"):
            path = self.folder / f"{candidate}.log"
            if path.exists():
                text = path.read_text(errors="replace").splitlines()
                return "\n".join(text[-lines:])
        return ""

    def close(self) -> None:
        for proc in [*self.workers.values(), self.gateway]:
            if proc is not None:
                self.stop(proc)
        self.redis.stop()
        for log in self._logs:
            log.close()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class RecordingProxy:
    """A loopback TCP forwarder that keeps every byte it passes, both ways (for tests that
    look at what travels on the wire)."""

    def __init__(self, target_port: int):
        import threading

        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(None)
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                with self._lock:
                    self.captured += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def bytes(self) -> bytes:
        with self._lock:
            return bytes(self.captured)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
