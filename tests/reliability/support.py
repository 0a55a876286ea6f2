"""Shared by the reliability tests: the profile (short for CI, full for the report), the figures
each test records, and a real `python -m backend serve` subprocess to attack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from backend.procutil import pid_alive
from backend.wire import protocol
from backend.wire.client import Client

ROOT = Path(__file__).resolve().parents[2]
PROFILE = os.environ.get("RELIABILITY_PROFILE", "short")
if PROFILE not in ("short", "full"):
    raise RuntimeError(f"RELIABILITY_PROFILE must be short or full, not {PROFILE!r}")
FULL = PROFILE == "full"
WAIT = 30.0  # generous bounded waits: CI has two slow cores


def scale(short: int, full: int) -> int:
    """A count for the current profile."""
    return full if FULL else short


def record(name: str, figures: dict[str, Any]) -> None:
    """Write one check's figures for scripts/reliability.py (only when it asks for them)."""
    folder = os.environ.get("RELIABILITY_RESULTS")
    if not folder:
        return
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"check": name, "profile": PROFILE, "recorded": time.time(), **figures}
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by `pid` (Linux /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            found.append((_decode_addr(hex_addr, width), int(hex_port, 16)))
    return found


def _decode_addr(hex_addr: str, width: int) -> str:
    if width == 8:  # little-endian IPv4
        return ".".join(str(int(hex_addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
    words = [hex_addr[i : i + 8] for i in range(0, 32, 8)]
    raw = b"".join(bytes.fromhex(w)[::-1] for w in words)
    import ipaddress

    return str(ipaddress.IPv6Address(raw))


class BackendProcess:
    """`python -m backend serve` in its own process, with a connected client."""

    def __init__(
        self,
        tmp: Path,
        engine: str = "preview",
        *args: str,
        env: dict[str, str] | None = None,
        output_dir: Path | None = None,
        min_free_disk_mb: float = 1,
    ):
        self.conn = tmp / "run" / "backend.json"
        self.output_dir = output_dir or tmp / "out"
        tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / f"backend-{time.monotonic_ns()}.log"
        command = [
            sys.executable,
            "-m",
            "backend",
            "serve",
            "--connection-file",
            str(self.conn),
            "--output-dir",
            str(self.output_dir),
            "--engine",
            engine,
            "--min-free-disk-mb",
            f"{min_free_disk_mb:g}",
            "--heartbeat",
            "0.2",
            *args,
        ]
        environ = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env or {}))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=environ, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + WAIT
        while True:
            info = _read_conn(self.conn)
            if info is not None and info.pid == self.proc.pid:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"backend did not start:\n{self.log()}")
            time.sleep(0.02)
        self.info = info
        self.client = Client(info)
        self.client.hello(timeout=WAIT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None and pid_alive(self.pid)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Ask it to shut down; returns its exit code (None if it had to be killed)."""
        code = self.proc.poll()
        if code is None:
            try:
                self.client.shutdown("test done", timeout=5)
            except Exception:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                code = None
        self.client.close()
        self._log.close()
        return code


def _read_conn(path: Path) -> protocol.ConnectionInfo | None:
    try:
        return protocol.read_connection_file(path)
    except Exception:
        return None


def tree_snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under root, except under `skip`."""
    out = {}
    for path in root.rglob("*"):
        if any(path == s or s in path.parents for s in skip):
            continue
        try:
            st = path.lstat()
        except OSError:
            continue
        out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out
