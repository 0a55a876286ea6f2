"""The add-on's runtime state and tick logic as plain Python (no bpy), so tests drive it directly.

Blender calls `Controller.tick()` from a `bpy.app.timers` callback on the main thread; tests and
`blender -b` scripts call it in a loop (timers never fire in Blender-as-a-module). Everything the
panel shows - backend state, jobs in flight, the history - lives here, not in Scene properties,
so progress never dirties the .blend file.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backend.errors import BackendError
from ..backend.files import default_output_dir
from ..backend.jobs import JobStore

ADDON_ROOT = Path(__file__).resolve().parent.parent  # holds backend/, so `-m backend` works
TERMINAL = ("done", "failed", "cancelled")
EVENT_STATE = {"job_done": "done", "job_failed": "failed", "job_cancelled": "cancelled"}
BUSY_INTERVAL = 0.1  # seconds between ticks while anything is queued or running
IDLE_INTERVAL = 0.5
RECONCILE_EVERY = 2.0  # seconds between job-store checks while jobs are active
RESPAWN_CHOICES = ("AFTER_FAILURE", "EVERY_N", "FRESH", "STANDBY")


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

    @property
    def interpreter(self) -> str:
        return self.python or sys.executable

    @property
    def own_python(self) -> bool:
        return not self.python or Path(self.python).resolve() == Path(sys.executable).resolve()


@dataclass
class JobView:
    """One job as the panel shows it: the backend's events folded into a few fields."""

    job_id: str
    name: str
    kind: str = "generate"
    state: str = "queued"  # waiting (for the backend), queued, running, done, failed, cancelled
    stage: str = ""
    label: str = ""
    fraction: float = 0.0
    level: int = 0
    seed: int | None = None
    position: int | None = None
    glb_path: str | None = None
    message: str = ""
    hint: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    auto_import: bool = True
    imported: bool = False
    submitted: float = 0.0
    finished: float | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass
class _Pending:
    """A Generate pressed before the backend was ready: submitted on the first ready tick."""

    local_id: str
    image: bytes
    params: dict[str, Any]
    filename: str


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


def random_seed() -> int:
    return random.randrange(0, 2**31 - 1)


def _msg_parts(message: Any) -> tuple[str, dict[str, Any]]:
    """(msg_type, content) of a protocol.Message or a supervisor event (object or dict)."""
    if isinstance(message, dict):
        return str(message.get("msg_type") or message.get("type") or ""), dict(
            message.get("content") or message
        )
    return str(getattr(message, "msg_type", "") or ""), dict(getattr(message, "content", {}) or {})


class Controller:
    """Owns the supervisor and the jobs of this Blender session."""

    def __init__(
        self,
        config: BackendConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        supervisor_factory: Callable[[BackendConfig], Any] | None = None,
    ):
        self.config = config or BackendConfig()
        self.clock = clock
        self.supervisor_factory = supervisor_factory or make_supervisor
        self.supervisor: Any = None
        self.jobs: dict[str, JobView] = {}  # this session's jobs, oldest first
        self._pending: list[_Pending] = []
        self._local_ids = 0
        self._aliases: dict[str, str] = {}  # waiting-N -> the backend's job id
        self.history: list[dict[str, Any]] = []
        self.history_warnings: list[str] = []
        self.history_dirty = True
        self.last_error = ""
        self.notes: list[str] = []  # supervisor/backend notices for the status line (newest last)
        self.sessions: list[str] = []  # backend sessions seen, in order (a restart adds one)
        self.doctor_report: dict[str, Any] | None = None
        self.doctor_text = ""
        self._doctor_proc: subprocess.Popen | None = None
        self._doctor_out: Any = None
        self.config_changed = False
        # Hooks the add-on sets: import a finished job into the scene, redraw the UI.
        self.on_job_done: Callable[[JobView], None] | None = None
        self.on_change: Callable[[], None] | None = None
        self.ticks = 0
        self._next_reconcile = 0.0

    # -- backend lifecycle ------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.supervisor is None:
            return "stopped"
        return _enum_value(getattr(self.supervisor, "state", "stopped"))

    @property
    def running(self) -> bool:
        return self.state not in ("stopped", "dead")

    def configure(self, config: BackendConfig) -> None:
        if config != self.config:
            self.config_changed = self.running
            self.config = config
            self.history_dirty = True

    def start(self, wait: bool = False, timeout: float | None = None) -> None:
        """Start the backend (non-blocking unless `wait`); a dead one is replaced."""
        if self.supervisor is not None and self.running:
            if wait:
                self.supervisor.start_and_wait(timeout)
                self._note_session()
            return
        if self.supervisor is not None:
            self._stop_supervisor(timeout=2.0)
        self.supervisor = self.supervisor_factory(self.config)
        self.config_changed = False
        self.last_error = ""
        if wait:
            self.supervisor.start_and_wait(timeout)
            self._note_session()
        else:
            self.supervisor.start()

    def stop(self, timeout: float | None = None) -> None:
        for pending in self._pending:
            self._finish(self.jobs.get(pending.local_id), "cancelled", "backend stopped")
        self._pending.clear()
        self._stop_supervisor(timeout)

    def _stop_supervisor(self, timeout: float | None) -> None:
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:
            try:
                supervisor.stop(timeout)
            except Exception as exc:  # the process may already be gone; nothing to keep
                self.last_error = f"stopping the backend: {exc}"

    def restart(self, reason: str = "user") -> None:
        """Restart for a clean process (VRAM back). A changed configuration needs a new spec."""
        if self.supervisor is None or self.config_changed or not self.running:
            self.stop(timeout=None)
            self.start()
            return
        self.supervisor.restart(reason)

    def _note_session(self) -> None:
        session = getattr(self.supervisor, "session", None)
        if session and (not self.sessions or self.sessions[-1] != session):
            self.sessions.append(session)

    # -- jobs --------------------------------------------------------------------------

    def submit(
        self,
        image: bytes,
        params: dict[str, Any],
        name: str,
        filename: str = "image.png",
        auto_import: bool = True,
    ) -> JobView:
        """Queue a generation. Starts the backend if needed; never waits for it."""
        if self.supervisor is None or not self.running:
            self.start()
        view = JobView(
            job_id="",
            name=name,
            seed=params.get("seed"),
            auto_import=auto_import,
            submitted=self.clock(),
        )
        if self._ready():
            view.job_id = self.supervisor.submit(image, params, filename)
        else:
            self._local_ids += 1
            view.job_id = f"waiting-{self._local_ids}"
            view.state = "waiting"
            view.label = "Waiting for the backend"
            self._pending.append(_Pending(view.job_id, image, params, filename))
        self.jobs[view.job_id] = view
        self._changed()
        return view

    def track(self, job_id: str, name: str, kind: str, auto_import: bool = True) -> JobView:
        """Follow a job submitted elsewhere (re-export goes straight through the client)."""
        view = JobView(
            job_id=job_id, name=name, kind=kind, auto_import=auto_import, submitted=self.clock()
        )
        self.jobs[job_id] = view
        return view

    def cancel(self, job_id: str) -> None:
        view = self.jobs.get(job_id)
        for pending in list(self._pending):
            if pending.local_id == job_id:
                self._pending.remove(pending)
                self._finish(view, "cancelled", "cancelled before the backend was ready")
                return
        if view is not None and view.terminal:
            return
        if self.supervisor is None:
            raise BackendError.from_dict(
                {"code": "backend_died", "message": "the backend is not running"}
            )
        self.supervisor.cancel(job_id)

    def active_jobs(self) -> list[JobView]:
        return [v for v in self.jobs.values() if not v.terminal]

    def current_job(self) -> JobView | None:
        running = [v for v in self.jobs.values() if v.state == "running"]
        if running:
            return running[0]
        active = self.active_jobs()
        return active[0] if active else None

    def _ready(self) -> bool:
        return self.supervisor is not None and self.state in ("ready", "busy")

    # -- the tick ---------------------------------------------------------------------

    def tick(self) -> float:
        """One non-blocking step: poll the backend, fold its events in, submit what waited.
        Returns the seconds until the next tick."""
        self.ticks += 1
        changed = False
        if self.supervisor is not None:
            try:
                events = self.supervisor.tick()
            except Exception as exc:  # a tick must never raise into Blender's timer loop
                events = []
                self.last_error = f"backend: {exc}"
                changed = True
            for message in events or ():
                self.apply(message)
                changed = True
            self._note_session()
            if self._pending and self._ready():
                self._submit_pending()
                changed = True
            elif self._pending and self.state == "dead":
                for pending in self._pending:
                    self._finish(
                        self.jobs.get(pending.local_id),
                        "failed",
                        "the backend could not start",
                        getattr(self.supervisor, "state_reason", "") or "See the backend log.",
                    )
                self._pending.clear()
                changed = True
            if self.clock() >= self._next_reconcile:
                changed = self._reconcile() or changed
        if self._doctor_proc is not None:
            changed = self._poll_doctor() or changed
        if changed:
            self._changed()
        busy = bool(self._pending or self.active_jobs() or self.state in ("starting", "loading"))
        return BUSY_INTERVAL if busy or self._doctor_proc is not None else IDLE_INTERVAL

    def _reconcile(self) -> bool:
        """Every RECONCILE_EVERY s, settle jobs whose final event PUB/SUB dropped from the
        job store (the source of truth). Reads one small JSON file per active job."""
        self._next_reconcile = self.clock() + RECONCILE_EVERY
        changed = False
        for view in self.active_jobs():
            if view.state != "waiting":
                changed = self._check_store(view) or changed
        return changed

    def _submit_pending(self) -> None:
        while self._pending:
            pending = self._pending.pop(0)
            view = self.jobs.pop(pending.local_id, None)
            if view is None:
                continue
            try:
                job_id = self.supervisor.submit(pending.image, pending.params, pending.filename)
            except BackendError as exc:
                self.jobs[pending.local_id] = view
                self._finish(view, "failed", exc.message, getattr(exc, "hint", "") or "")
                continue
            view.job_id = job_id
            view.state = "queued"
            view.label = ""
            self.jobs[job_id] = view
            self._aliases[pending.local_id] = job_id

    def apply(self, message: Any) -> None:
        """Fold one backend or supervisor event into the views."""
        msg_type, content = _msg_parts(message)
        job_id = content.get("job_id")
        if msg_type.startswith("job_") and isinstance(job_id, str):
            view = self.jobs.get(job_id)
            if view is None:  # a job recovered from an earlier backend, or another client's
                name = Path(str(content.get("filename") or job_id)).stem
                view = self.jobs[job_id] = JobView(
                    job_id=job_id, name=name, submitted=self.clock(), auto_import=False
                )
            self._apply_job(view, msg_type, content)
            return
        if msg_type in ("backend_state", "heartbeat"):
            return  # the supervisor folds these into its own state
        text = content.get("message") or content.get("reason") or content.get("state")
        if msg_type and text:
            self.notes.append(f"{msg_type}: {text}")
            del self.notes[:-20]

    def _apply_job(self, view: JobView, msg_type: str, content: dict[str, Any]) -> None:
        if view.terminal:
            return  # terminal states are sticky, as in the job store
        if msg_type == "job_queued":
            view.state = "queued"
            view.position = content.get("position")
            view.kind = content.get("kind") or view.kind
        elif msg_type == "job_started":
            view.state = "running"
            view.position = None
        elif msg_type == "job_progress":
            view.state = "running"
            view.stage = content.get("stage") or view.stage
            view.label = content.get("label") or view.stage
            view.fraction = float(content.get("fraction") or 0.0)
            view.level = int(content.get("level") or view.level or 0)
        elif msg_type == "job_retry":
            view.level = int(content.get("level") or view.level or 0)
            view.message = f"retrying at quality level {view.level} ({content.get('reason')})"
        elif msg_type == "job_done":
            view.glb_path = content.get("glb_path")
            view.result = content
            view.level = int(content.get("oom_quality_degradation_level") or 0)
            final = content.get("final_params") or {}
            view.seed = final.get("seed", view.seed)
            self._finish(view, "done")
            if view.auto_import and self.on_job_done is not None:
                try:
                    self.on_job_done(view)
                except Exception as exc:  # a failed import is reported, never raised in a timer
                    view.message = f"import failed: {exc}"
                    self.last_error = view.message
        elif msg_type == "job_failed":
            self._finish(view, "failed", content.get("message") or "failed", content.get("hint"))
        elif msg_type == "job_cancelled":
            self._finish(view, "cancelled")

    def _finish(
        self, view: JobView | None, state: str, message: str = "", hint: str | None = ""
    ) -> None:
        if view is None:
            return
        view.state = state
        view.finished = self.clock()
        if state == "done":
            view.fraction = 1.0
            view.label = "Done"
        if message:
            view.message = message
        view.hint = hint or ""
        self.history_dirty = True

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- blocking mode (blender -b scripts, tests) -------------------------------------

    def wait(self, job_id: str, timeout: float = 600.0, sleep: float = 0.02) -> JobView:
        """Tick until the job ends. Checks the job store too: PUB/SUB may drop an event."""
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + 2.0
        while True:
            self.tick()
            view = self._view_for(job_id)
            if view is not None and view.terminal:
                return view
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout:.0f} s")
            if view is not None and now > next_check and not view.job_id.startswith("waiting"):
                next_check = now + 2.0
                self._check_store(view)
            time.sleep(sleep)

    def _view_for(self, job_id: str) -> JobView | None:
        # A waiting job is re-keyed when it reaches the backend.
        return self.jobs.get(job_id) or self.jobs.get(self._aliases.get(job_id, ""))

    def _check_store(self, view: JobView) -> bool:
        try:
            record = JobStore(self.config.output_dir).get(view.job_id)
        except BackendError:
            return False
        if view.terminal or not record.terminal:
            return False
        if record.state.value == "done":
            result = record.result or {}
            self._apply_job(
                view,
                "job_done",
                {
                    "job_id": view.job_id,
                    "glb_path": result.get("glb_path"),
                    "mesh_stats": result.get("mesh_stats"),
                    "oom_quality_degradation_level": record.level or 0,
                    "final_params": record.final_params,
                },
            )
        else:
            error = record.error or {}
            self._finish(view, record.state.value, error.get("message", ""), error.get("hint"))
        return True

    def generate_blocking(
        self,
        image: bytes,
        params: dict[str, Any],
        name: str,
        filename: str = "image.png",
        auto_import: bool = True,
        timeout: float = 600.0,
    ) -> JobView:
        """Submit and wait, for `blender -b` scripts where no timer runs."""
        if self.supervisor is None or not self.running:
            self.start(wait=True, timeout=self.config.start_timeout)
        elif not self._ready():
            self.supervisor.start_and_wait(self.config.start_timeout)
        view = self.submit(image, params, name, filename, auto_import)
        return self.wait(view.job_id, timeout)

    # -- history ----------------------------------------------------------------------

    def refresh_history(self, limit: int = 20) -> list[dict[str, Any]]:
        """Read the job store (the source of truth; survives Blender and backend restarts)."""
        try:
            store = JobStore(self.config.output_dir)
            records, warnings = store.list(limit)
        except (OSError, BackendError) as exc:
            self.history, self.history_warnings = [], [f"cannot read history: {exc}"]
            self.history_dirty = False
            return self.history
        entries = []
        for record in records:
            result = record.result or {}
            folder = store.folder(record.id)
            final = record.final_params or {}
            entries.append(
                {
                    "job_id": record.id,
                    "kind": record.kind,
                    "state": record.state.value,
                    "engine": record.engine,
                    "name": Path(record.filename).stem if record.filename else record.id,
                    "filename": record.filename,
                    "created": record.created,
                    "seconds": (record.finished - record.started)
                    if record.finished and record.started
                    else None,
                    "level": record.level or 0,
                    "seed": final.get("seed", (record.params or {}).get("seed")),
                    "preset": (record.params or {}).get("preset"),
                    "glb_path": result.get("glb_path"),
                    "mesh_stats": result.get("mesh_stats") or {},
                    "degraded_reason": result.get("degraded_reason"),
                    "error": record.error,
                    "folder": str(folder),
                    "thumbnail": str(folder / "thumbnail.png"),
                    "input": str(store.input_path(record.id) or ""),
                }
            )
        self.history, self.history_warnings = entries, warnings
        self.history_dirty = False
        return entries

    def history_entry(self, job_id: str) -> dict[str, Any] | None:
        if self.history_dirty or not any(e["job_id"] == job_id for e in self.history):
            self.refresh_history(limit=200)
        return next((e for e in self.history if e["job_id"] == job_id), None)

    # -- status and doctor ------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Backend state plus GPU and VRAM from the supervisor's last `status` poll."""
        out: dict[str, Any] = {"state": self.state, "reason": "", "log_path": None, "pid": None}
        if self.supervisor is not None:
            sup = self.supervisor.status()
            out.update(
                reason=sup.get("reason") or "",
                log_path=sup.get("log_path"),
                pid=sup.get("pid"),
                session=sup.get("session"),
                restarts=sup.get("restarts", 0),
            )
            out.update(_backend_figures(sup.get("backend") or {}))
        return out

    def run_doctor(self, extra_args: list[str] | None = None) -> None:
        """Run `python -m backend doctor --json` with the backend's interpreter, in the
        background (it imports torch); the tick collects the report."""
        if self._doctor_proc is not None:
            return
        env = dict(os.environ)
        paths = [str(ADDON_ROOT)]
        if self.config.own_python:
            paths += bundled_site_dirs()
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        args = [self.config.interpreter, "-m", "backend", "doctor", "--json"]
        args += ["--output-dir", str(self.config.output_dir)]
        for key in ("weights_dir", "trellis_checkout"):
            if self.config.engine_options.get(key):
                args += [f"--{key.replace('_', '-')}", self.config.engine_options[key]]
        args += extra_args or []
        self._doctor_out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by _poll_doctor
        self.doctor_text = "Running..."
        self.doctor_report = None
        try:
            self._doctor_proc = subprocess.Popen(
                args,
                cwd=str(ADDON_ROOT),
                env=env,
                stdout=self._doctor_out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            self._doctor_proc = None
            self.doctor_text = f"cannot run {self.config.interpreter}: {exc}"

    def _poll_doctor(self) -> bool:
        proc = self._doctor_proc
        if proc is None or proc.poll() is None:
            return False
        self._doctor_proc = None
        self._doctor_out.seek(0)
        text = self._doctor_out.read().decode("utf-8", "replace")
        self._doctor_out.close()
        start = text.find("{")
        try:
            self.doctor_report = json.loads(text[start:]) if start >= 0 else None
        except ValueError:
            self.doctor_report = None
        if self.doctor_report is None:
            self.doctor_text = text.strip()[-2000:] or f"doctor exited with {proc.returncode}"
        else:
            self.doctor_text = "OK" if self.doctor_report.get("ok") else "Problems found"
        return True

    def wait_doctor(self, timeout: float = 120.0) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while self._doctor_proc is not None and time.monotonic() < deadline:
            self.tick()
            time.sleep(0.05)
        return self.doctor_report

    def shutdown(self) -> None:
        """Everything off (unregister, Blender quitting): no orphan processes."""
        if self._doctor_proc is not None and self._doctor_proc.poll() is None:
            self._doctor_proc.kill()
            self._doctor_proc.wait()
        self._doctor_proc = None
        self.stop(timeout=None)


def _backend_figures(reply: dict[str, Any]) -> dict[str, Any]:
    """GPU name and VRAM from a backend `status` reply (docs/protocol.md)."""
    if not reply:
        return {}
    vram = reply.get("vram") or {}
    engine = reply.get("engine")
    return {
        "engine": engine.get("label") if isinstance(engine, dict) else engine,
        "gpu": vram.get("device") or "",
        "vram_used": vram.get("reserved") or vram.get("allocated"),
        "vram_total": vram.get("total"),
    }


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value)).lower()


def make_supervisor(config: BackendConfig) -> Any:
    """The real supervisor for a configuration (imported lazily: it needs pyzmq)."""
    from ..backend.supervisor import BackendSpec, RespawnPolicy, Supervisor

    run_dir = Path(tempfile.gettempdir()) / f"trellis2-blender-{os.getpid()}"
    extra = [str(ADDON_ROOT)]
    if config.own_python:
        # Blender's Python has the extension's wheels on sys.path; a child needs them spelled out.
        extra += bundled_site_dirs()
    spec = BackendSpec(
        python=config.interpreter,
        engine=config.engine,
        engine_options=dict(config.engine_options),
        output_dir=Path(config.output_dir),
        connection_file=run_dir / "connection.json",
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
