"""Fixtures of the reliability suite: real backend subprocesses that are always cleaned up."""

from __future__ import annotations

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
