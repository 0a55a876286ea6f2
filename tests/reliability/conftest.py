"""Fixtures of the reliability suite: real backend subprocesses that are always cleaned up."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.reliability.support import BackendProcess


@pytest.fixture
def backend_proc(tmp_path):
    """Factory: start `python -m backend serve` subprocesses; all are stopped at teardown."""
    started: list[BackendProcess] = []

    def start(engine: str = "preview", *args: str, sub: str = "b", **kwargs) -> BackendProcess:
        proc = BackendProcess(tmp_path / f"{sub}{len(started)}", engine, *args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)
        proc.client.close()  # a test that failed early leaves no socket to block exit


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (needs root); skipped with the reason when it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {done.stderr.strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


class ReadOnly:
    """Makes a folder read-only and writable again, honestly for the user running the test:
    root ignores modes, so as root the folder becomes a read-only bind mount of itself (real
    EROFS); otherwise every folder in it loses its write bits (real EACCES)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.root = os.geteuid() == 0
        self.how = "read-only bind mount (EROFS)" if self.root else "chmod a-w (EACCES)"
        self.mounted = False
        self.modes: dict[Path, int] = {}

    def on(self) -> None:
        if self.root:
            for command in (
                ["mount", "--bind", str(self.folder), str(self.folder)],
                ["mount", "-o", "remount,ro,bind", str(self.folder)],
            ):
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    self.off()
                    pytest.skip(f"cannot make a read-only bind mount: {done.stderr.strip()}")
                self.mounted = True
            return
        for folder in [self.folder, *(p for p in self.folder.rglob("*") if p.is_dir())]:
            self.modes[folder] = folder.stat().st_mode & 0o7777
            folder.chmod(self.modes[folder] & ~0o222)

    def off(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)
            self.mounted = False
        for folder, mode in self.modes.items():
            folder.chmod(mode)
        self.modes.clear()


@pytest.fixture
def read_only():
    made: list[ReadOnly] = []

    def make(folder: Path) -> ReadOnly:
        made.append(ReadOnly(folder))
        return made[-1]

    yield make
    for r in made:
        r.off()
