"""How the add-on starts the backend: the preferences' settings as a configuration, the supervisor
(or studio link) made from them, the run folder of this Blender session and the download
cache's root. Plain Python (no bpy)."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backend.files import default_output_dir
from ..backend.procutil import pid_alive

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
                from ..backend.wire.curvekeys import decode_connection

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
    from ..backend.supervision.supervisor import BackendSpec, RespawnPolicy, Supervisor

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
