"""How the add-on starts processes: the backend (through a supervisor) with the preferences'
settings, and `doctor` with the same interpreter. Plain Python (no bpy)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backend.files import default_output_dir
from ..backend.procutil import pid_alive
from .wording import one_line

ADDON_ROOT = Path(__file__).resolve().parent.parent  # holds backend/, so `-m backend` works
RUN_DIR_PREFIX = "trellis2-blender-"


@dataclass
class BackendConfig:
    """What the preferences say about the backend; a change applies on the next (re)start."""

    python: str = ""  # empty: the Python Blender runs (preview engine with the bundled wheels)
    engine: str = "preview"
    engine_options: dict[str, str] = field(default_factory=dict)
    output_dir: Path = field(default_factory=lambda: default_output_dir())
    respawn: str = "AFTER_FAILURE"
    every_n: int = 10
    heartbeat_timeout: float = 5.0
    start_timeout: float = 120.0
    where: str = "LOCAL"  # LOCAL: a supervised backend here; REMOTE: a studio gateway
    connection: str = field(default="", repr=False)  # the gateway's string: a credential

    @property
    def remote(self) -> bool:
        return self.where == "REMOTE"

    @property
    def cache_key(self) -> str:
        """Names this backend's download cache: its output folder, or the gateway's address
        and key (never the artist's secret)."""
        if self.remote:
            try:
                from ..backend.curvekeys import decode_connection

                conn = decode_connection(self.connection)
                ident = f"remote:{conn.shell}:{conn.server_key}"
            except Exception:  # an unreadable string never connects: any stable name will do
                ident = "remote:" + hashlib.sha256(self.connection.encode()).hexdigest()
        else:
            ident = f"local:{Path(self.output_dir).expanduser().absolute()}"
        return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:16]

    @property
    def interpreter(self) -> str:
        return self.python or sys.executable

    @property
    def own_python(self) -> bool:
        return not self.python or Path(self.python).resolve() == Path(sys.executable).resolve()


def bundled_site_dirs(modules: tuple[str, ...] = ("zmq", "PIL", "trimesh", "numpy")) -> list[str]:
    """Folders this Python imports the backend's packages from. Blender installs an extension's
    wheels into its own site-packages, which a child interpreter would not find by itself."""
    import importlib.util

    dirs: list[str] = []
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        parent = str(Path(list(spec.submodule_search_locations)[0]).parent)
        if parent not in dirs:
            dirs.append(parent)
    return dirs


def run_dir(pid: int | None = None) -> Path:
    """Where this Blender session's backend writes its connection file."""
    return Path(tempfile.gettempdir()) / f"{RUN_DIR_PREFIX}{pid or os.getpid()}"


def remove_stale_run_dirs(mine: Path) -> None:
    """Empty run folders of Blender sessions that have ended (older versions left them)."""
    try:
        candidates = list(mine.parent.glob(f"{RUN_DIR_PREFIX}*"))
    except OSError:
        return
    for folder in candidates:
        pid = folder.name[len(RUN_DIR_PREFIX) :]
        if folder != mine and pid.isdigit() and not pid_alive(int(pid)):
            try:
                folder.rmdir()  # only when empty: never remove what someone still uses
            except OSError:
                pass


def default_cache_root() -> Path:
    """Where downloads go when Blender names no extension folder (tests, scripts): a private
    folder of this user in the temporary folder."""
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"trellis2-blender-cache-{uid}"


def make_supervisor(config: BackendConfig) -> Any:
    """The real supervisor for a configuration (imported lazily: it needs pyzmq), or the
    link to a studio gateway (nothing to start on this machine)."""
    if config.remote:
        from .remotelink import RemoteLink

        return RemoteLink(config.connection)
    from ..backend.supervisor import BackendSpec, RespawnPolicy, Supervisor

    extra = [str(ADDON_ROOT)]
    if config.own_python:
        # Blender's Python has the extension's wheels on sys.path; a child needs them spelled out.
        extra += bundled_site_dirs()
    spec = BackendSpec(
        python=config.interpreter,
        engine=config.engine,
        engine_options=dict(config.engine_options),
        output_dir=Path(config.output_dir),
        connection_file=run_dir() / "connection.json",
        log_dir=Path(config.output_dir) / "logs",
        extra_pythonpath=extra,
    )
    policy = RespawnPolicy(
        after_failure=True,
        every_n_jobs=config.every_n if config.respawn == "EVERY_N" else None,
        fresh_per_job=config.respawn in ("FRESH", "STANDBY"),
        standby=config.respawn == "STANDBY",
        heartbeat_timeout=config.heartbeat_timeout,
        start_timeout=config.start_timeout,
    )
    return Supervisor(spec, policy)


def doctor_command(config: BackendConfig) -> tuple[list[str], dict[str, str]]:
    """`python -m backend doctor` for these settings: (arguments, environment)."""
    env = dict(os.environ)
    paths = [str(ADDON_ROOT)]
    if config.own_python:
        paths += bundled_site_dirs()
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    args = [config.interpreter, "-m", "backend", "doctor", "--json", "--for-blender"]
    args += ["--output-dir", str(config.output_dir), "--engine", config.engine]
    for key in ("weights_dir", "trellis_checkout"):
        if config.engine_options.get(key):
            args += [f"--{key.replace('_', '-')}", config.engine_options[key]]
    return args, env


class DoctorRun:
    """One `doctor` in a child process, collected by the tick (`poll()`). Never a traceback:
    a doctor that printed no report is summed up in one line (`output` has all of it)."""

    def __init__(self, config: BackendConfig):
        self.interpreter = config.interpreter
        args, env = doctor_command(config)
        self.report: dict[str, Any] | None = None
        self.text = "Running..."
        self.output = ""
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by poll() or kill()
        self._proc: subprocess.Popen | None = None
        try:
            self._proc = subprocess.Popen(
                args,
                cwd=str(ADDON_ROOT),
                env=env,
                stdout=self._out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            self.text = one_line(f"cannot run {self.interpreter}: {exc}")

    def poll(self) -> bool:
        """True once it has finished (then `report` or `text` says how it went)."""
        if self._proc is None:
            self._out.close()
            return True
        if self._proc.poll() is None:
            return False
        self._out.seek(0)
        self.output = self._out.read().decode("utf-8", "replace")
        self._out.close()
        start = self.output.find("{")
        try:
            report = json.loads(self.output[start:]) if start >= 0 else None
        except ValueError:
            report = None
        if not isinstance(report, dict):
            why = one_line(self.output) or f"it exited with code {self._proc.returncode}"
            self.text = one_line(f"Doctor could not run with {self.interpreter}: {why}")
            return True
        for check in report.get("checks") or []:
            if isinstance(check, dict):
                for key in ("detail", "hint", "message"):
                    if key in check:
                        check[key] = one_line(check[key], 300)
        self.report = report
        self.text = "OK" if report.get("ok") else "Problems found"
        return True

    def kill(self) -> None:
        """Stop it now (unregister, quitting): waits for the process to go."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._out.close()
