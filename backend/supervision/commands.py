"""Every `python -m backend ...` command line this project starts (serve, its reader and job
processes, doctor, the cancel of a supervisor with no backend), and the environment it runs
in. The signing key never appears here: it travels in the connection file only."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from .. import settings
from ..procutil import BELOW_NORMAL


def backend_args(python: str, *args: str) -> list[str]:
    return [python, "-m", "backend", *args]


def serve_command(
    python: str,
    *,
    connection_file: Path,
    output_dir: Path,
    engine: str = "preview",
    engine_options: Mapping[str, str] = {},
    parent_pid: int | None = None,
    heartbeat: float | None = None,
    queue_depth: int | None = None,
    state_dir: Path | None = None,
    min_free_disk_mb: float | None = None,
    standby: bool = False,
    extra: Iterable[str] = (),
) -> list[str]:
    """`python -m backend serve ...` for one backend."""
    command = backend_args(
        python,
        "serve",
        "--connection-file",
        str(connection_file),
        "--output-dir",
        str(output_dir),
        "--engine",
        engine,
    )
    if parent_pid is not None:
        command += ["--parent-pid", str(parent_pid)]
    if heartbeat is not None:
        command += ["--heartbeat", f"{heartbeat:g}"]
    if queue_depth is not None:
        command += ["--queue-depth", str(queue_depth)]
    for key, value in engine_options.items():
        command += ["--engine-opt", f"{key}={value}"]
    if state_dir:
        command += ["--state-dir", str(state_dir)]
    if min_free_disk_mb is not None:
        command += ["--min-free-disk-mb", f"{min_free_disk_mb:g}"]
    if standby:
        command.append("--standby")
    return command + list(extra)


def reader_command(
    python: str, *, output_dir: Path, state_dir: Path, parent_pid: int | None = None
) -> list[str]:
    """`python -m backend reader ...`: a backend's reader process (backend/server/reader.py),
    started by the backend itself. Its channel's key comes on its stdin."""
    command = backend_args(
        python, "reader", "--output-dir", str(output_dir), "--state-dir", str(state_dir)
    )
    if parent_pid is not None:
        command += ["--parent-pid", str(parent_pid)]
    return command


def jobhost_command(python: str, *, slot: int, parent_pid: int | None = None) -> list[str]:
    """`python -m backend jobhost ...`: one of a backend's job processes
    (backend/server/jobhost.py), started by the backend itself. Its settings come on stdin."""
    command = backend_args(python, "jobhost", "--slot", str(slot))
    if parent_pid is not None:
        command += ["--parent-pid", str(parent_pid)]
    return command


def start_helper(command: list[str], *, stdout: int) -> subprocess.Popen:
    """Start one of a backend's own processes (the reader, a job process): its stdin a pipe
    (its orders; it exits at the pipe's end), this extension's environment, below normal
    priority on Windows (on POSIX it lowers its own niceness). Raises OSError."""
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=stdout,
        env=backend_environment(),
        cwd=str(settings.EXTENSION_ROOT),
        creationflags=BELOW_NORMAL,
    )


def doctor_command(
    python: str,
    *,
    output_dir: Path | None = None,
    engine: str | None = None,
    engine_options: Mapping[str, str] = {},
    for_blender: bool = False,
) -> list[str]:
    """`python -m backend doctor --json ...` with the engine's folders as flags; `for_blender`
    words the hints for the add-on's preferences (the add-on's Doctor button)."""
    command = backend_args(python, "doctor", "--json")
    if for_blender:
        command.append("--for-blender")
    if output_dir is not None:
        command += ["--output-dir", str(output_dir)]
    if engine:
        command += ["--engine", engine]
    for key in settings.ENGINE_ENV:
        if engine_options.get(key):
            command += [f"--{key.replace('_', '-')}", engine_options[key]]
    return command


def cancel_command(python: str, *, output_dir: Path, job_id: str) -> list[str]:
    """`python -m backend cancel --json ...`: a supervisor with no backend cancels a job."""
    return backend_args(python, "cancel", "--json", "--output-dir", str(output_dir), "--", job_id)


def backend_environment(
    extra_pythonpath: Iterable[str] = (),
    overrides: Mapping[str, str] = {},
    base: Mapping[str, str] | None = None,
    predecessor: str | None = None,
) -> dict[str, str]:
    """The environment of a backend child: this extension first on PYTHONPATH (so `-m backend`
    is this copy, whatever the working directory), then extra folders (bundled wheels), then
    what the parent had. `predecessor` (JSON, `backendlogs.Predecessor`) tells a backend of
    the one that went before it; no other child inherits a note."""
    env = dict(os.environ if base is None else base)
    env.pop(settings.ENV_PREDECESSOR, None)
    paths = [str(settings.EXTENSION_ROOT), *extra_pythonpath]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"  # the log shows the last words of a crash
    if "PYTORCH_CUDA_ALLOC_CONF" not in env and "PYTORCH_ALLOC_CONF" not in env:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    env.update(overrides)
    if predecessor is not None:
        env[settings.ENV_PREDECESSOR] = predecessor
    return env
