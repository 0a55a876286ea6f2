"""The add-on's runtime as plain Python (no bpy), so tests drive it directly: the one place that
wires the supervisor (or studio link), the job views' table (`views`), the history (`history`),
the downloads, the groups and the Doctor button (`doctor`) to the timer tick.

Blender calls `Controller.tick()` from a `bpy.app.timers` callback on the main thread; tests and
`blender -b` scripts call it in a loop (timers never fire in Blender-as-a-module). Nothing here
waits on the backend: every request is a `client.Pending` that a later tick resolves, Stop is a
shutdown ladder that the tick walks, and a job's view changes only through `views.step()` (the
controller turns replies and events into its events and does the actions it names). The add-on
speaks only the protocol; it never reads job folders. Only the methods under "blocking mode"
wait, for scripts and tests. Everything the panel shows lives in memory, not in Scene
properties, so progress never dirties the .blend file and drawing never touches a disk.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..backend.errors import BackendError, ErrorCode
from ..backend.paths import output_dir_problem
from ..backend.wire.client import ClientTimeout, Pending
from . import groups as grouping
from . import views
from .doctor import Doctor
from .downloads import FETCH_TIMEOUT, Download, Downloads
from .groups import Group
from .history import HistoryView, delete_request, job_entry
from .launch import (
    BackendConfig,
    default_cache_root,
    make_supervisor,
    remove_stale_run_dirs,
    run_dir,
)
from .views import JobView, Outgoing
from .wording import engine_label, one_line

log = logging.getLogger("trellis2_blender")

BUSY_INTERVAL = 0.1  # seconds between ticks while anything is queued, running or changing
IDLE_INTERVAL = 0.5
RECONCILE_EVERY = 2.0  # seconds between `job` checks of active jobs (PUB/SUB may drop events)
SUBMIT_TIMEOUT = 10.0  # a generate/reexport reply (the backend decodes the image first)
QUEUE_LIMIT = 8  # the backend's default queue depth
LIVE = ("loading", "ready", "busy")  # a backend that answers requests
CHANGING = ("starting", "loading", "restarting", "stopping")
RESULT = "result.glb"  # the file of a job folder that holds its model
REMOTE_ONLY_LOCAL = "Only for a backend on this computer (Preferences: Backend)"


def file_name(path: Any) -> str:
    """The last part of a path the backend named (its folder's separators may be either)."""
    return str(path or "").replace("\\", "/").rsplit("/", 1)[-1]


def random_seed() -> int:
    return random.randrange(0, 2**31 - 1)


def _msg_parts(message: Any) -> tuple[str, dict[str, Any], str | None]:
    """(msg_type, content, parent msg_id) of a protocol.Message or a supervisor event."""
    if isinstance(message, dict):
        msg_type = str(message.get("msg_type") or message.get("type") or "")
        return msg_type, dict(message.get("content") or message), message.get("parent_id")
    return (
        str(getattr(message, "msg_type", "") or ""),
        dict(getattr(message, "content", {}) or {}),
        getattr(message, "parent_id", None),
    )


class Controller:
    """Owns the supervisor and the jobs of this Blender session."""

    def __init__(
        self,
        config: BackendConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        supervisor_factory: Callable[[BackendConfig], Any] | None = None,
        cache_root: Path | None = None,
    ):
        self.config = config or BackendConfig()
        self.cache_root = Path(cache_root) if cache_root else default_cache_root()
        # Files fetched from the backend that answers (results, thumbnails, inputs).
        self.files = self._downloads(self.config)
        self._downloading: dict[str, Download] = {}  # job key -> its result on the way
        self.clock = clock
        self.supervisor_factory = supervisor_factory or make_supervisor
        self.supervisor: Any = None
        self.active_config: BackendConfig | None = None  # what `supervisor` was made with
        self._retired: list[Any] = []  # older supervisors walking their shutdown ladder
        self._start_wanted = False  # start a supervisor once the retired ones have gone
        self.jobs: dict[str, JobView] = {}  # this session's jobs by key, oldest first
        self._keys: dict[str, str] = {}  # backend job id -> key
        self._next_key = 0
        self._outbox: list[Outgoing] = []
        self._requests: list[tuple[Pending, Callable[[Pending], None]]] = []
        self._by_request: dict[str, str] = {}  # submit msg_id -> key (job_queued names its job)
        self._abandoned: dict[str, str] = {}  # submits reported failed whose outcome is unknown
        self._checking: set[str] = set()  # keys with a `job` request in flight
        self._cancelling: set[str] = set()  # keys with a cancel in flight
        self.groups: dict[str, Group] = {}  # Variations and Batches of this session, oldest first
        self.history = HistoryView()
        self.last_error = ""
        self.last_hint = ""
        self.last_outcome: str | None = None  # key of the job that ended last
        self.notes: list[str] = []  # supervisor/backend notices (newest last)
        self.sessions: list[str] = []  # backend sessions seen, in order (a restart adds one)
        self.doctor = Doctor()  # the Doctor button's run and what it found
        self._output_checked: tuple[str, str | None] | None = None  # (path, problem)
        self.tick_errors: list[str] = []
        self._reported: set[str] = set()
        # Hooks the add-on sets: import a finished job, redraw, load history thumbnails.
        self.on_job_done: Callable[[JobView], None] | None = None
        self.on_change: Callable[[], None] | None = None
        self.on_history: Callable[[list[dict[str, Any]]], None] | None = None
        self.on_file: Callable[[str], None] | None = None  # a thumbnail arrived (icons)
        self.ticks = 0
        self._next_reconcile = 0.0
        self._last_state = "stopped"
        self.run_dir = run_dir()
        remove_stale_run_dirs(self.run_dir)

    # -- state --------------------------------------------------------------------------

    @property
    def state(self) -> str:
        sup = self.supervisor
        if sup is None:
            if self._start_wanted:
                return "restarting" if self._retired else "starting"
            return "stopping" if self._retired else "stopped"
        state = _enum_value(getattr(sup, "state", "stopped"))
        if state == "stopped" and (getattr(sup, "stopping", False) or self._retired):
            return "stopping"
        return state

    @property
    def running(self) -> bool:
        return self.state not in ("stopped", "stopping", "dead")

    @property
    def config_changed(self) -> bool:
        """Settings differ from what the running backend was started with (Restart applies)."""
        return self.running and self.active_config is not None and self.config != self.active_config

    @property
    def remote(self) -> bool:
        """The jobs go to a studio server (the settings in use, else the chosen ones)."""
        config = self.active_config if self.running and self.active_config else self.config
        return config.remote

    def _remote_engine(self) -> dict[str, Any]:
        sup = self.supervisor if self.remote else None
        status = getattr(sup, "last_status", None) or {}
        return status.get("engine") or getattr(sup, "engine", None) or {}

    def next_engine(self) -> str:
        """The engine the next job runs on, as the panel names it."""
        if self.remote:
            label = self._remote_engine().get("label")
            return f"Studio server ({label})" if label else "Studio server"
        config = self.active_config if self.running and self.active_config else self.config
        return engine_label(config.engine)

    def running_engine(self) -> str | None:
        if not self.running or self.active_config is None:
            return None
        if self.remote:
            return self.next_engine()
        return engine_label(self.active_config.engine)

    def engine_ignores_settings(self) -> bool:
        """The engine the next job runs on ignores seed, steps and guidance."""
        if self.remote:
            return self._remote_engine().get("name") == "preview"
        config = self.active_config if self.running and self.active_config else self.config
        return config.engine == "preview"

    def configure(self, config: BackendConfig) -> None:
        self.config = config

    def output_problem(self) -> str | None:
        """Why the configured output folder cannot hold jobs (probed once per folder)."""
        path = str(self.config.output_dir)
        if self._output_checked is None or self._output_checked[0] != path:
            self._output_checked = (path, output_dir_problem(Path(path)))
        return self._output_checked[1]

    @property
    def known_output_problem(self) -> str | None:
        """The output folder's problem if it was probed already (memory only: for drawing)."""
        checked = self._output_checked
        if checked is not None and checked[0] == str(self.config.output_dir):
            return checked[1]
        return None

    def recheck_output(self) -> str | None:
        self._output_checked = None
        return self.output_problem()

    def _ready(self) -> bool:
        return self.supervisor is not None and self.state in ("ready", "busy")

    def _answers(self) -> bool:
        return self.supervisor is not None and self.state in LIVE

    def _note_session(self) -> None:
        session = getattr(self.supervisor, "session", None)
        if session and (not self.sessions or self.sessions[-1] != session):
            self.sessions.append(session)
            self.history.new_backend()
            self._next_reconcile = 0.0  # a new backend: check what it did with our jobs

    # -- backend lifecycle (all return at once) ------------------------------------------

    def start(self, wait: bool = False, timeout: float | None = None) -> None:
        """Start the backend with the current settings. Returns at once unless `wait` (scripts);
        a backend with other settings is stopped first (the tick starts the new one once the
        old one has gone, so two backends never share the job store)."""
        problem = None if self.config.remote else self.output_problem()
        if problem:
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"Output Directory: {problem}",
                "Choose another Output Directory in the add-on's preferences.",
            )
        self.last_error = self.last_hint = ""
        sup = self.supervisor
        if sup is not None and self.config == self.active_config:
            if _enum_value(sup.state) in ("stopped", "dead"):
                sup.start()  # it spawns once its old process has gone
        else:
            if sup is not None:
                self._retire_supervisor()
            self._start_wanted = True
            self._maybe_start()
        if wait:
            self._wait_until(self._ready, timeout or self.config.start_timeout + 5.0)

    def stop(self) -> None:
        """Stop the backend: the tick walks the shutdown ladder. Jobs on the backend stay in
        its job store and wait for the next backend; jobs not yet sent wait too."""
        self._start_wanted = False
        self._park_jobs("Waiting for the next backend")
        if self.supervisor is not None:
            self.supervisor.begin_stop()

    def restart(self, reason: str = "user") -> None:
        """A fresh backend process (VRAM back). New settings need a new supervisor."""
        sup = self.supervisor
        if sup is None or self.config != self.active_config or not self.running:
            self.start()
            return
        self._park_jobs("Waiting for the next backend")
        sup.restart(reason)

    def _retire_supervisor(self) -> None:
        self._park_jobs("Waiting for the next backend")
        self.files.fail_all(BackendError(ErrorCode.BACKEND_DIED, "another backend was chosen"))
        sup, self.supervisor = self.supervisor, None
        self.active_config = None
        sup.begin_stop()
        self._retired.append(sup)

    def _maybe_start(self) -> None:
        if not self._start_wanted or self._retired:
            return
        self._start_wanted = False
        self.supervisor = self.supervisor_factory(self.config)
        self.active_config = self.config
        if self.files.folder != self._downloads(self.config).folder:
            self.files = self._downloads(self.config)
        self.supervisor.start()

    def _park_jobs(self, label: str) -> None:
        """Jobs the backend has but will not run now: they wait for the next backend."""
        for view in self.active_jobs():
            if view.on_backend:
                self._step(view, views.PARKED, {"label": label})

    # -- jobs ----------------------------------------------------------------------------

    def submit(
        self,
        image: bytes,
        params: dict[str, Any],
        name: str,
        filename: str = "image.png",
        auto_import: bool = True,
        cursor: tuple[float, float, float] | None = None,
    ) -> JobView:
        """Queue a generation. Starts the backend if needed; never waits for it."""
        content = {"params": params, "filename": filename}
        view = self._enqueue("generate", content, (image,), name, auto_import, cursor)
        view.seed = params.get("seed")
        return view

    def reexport(
        self,
        job_id: str,
        params: dict[str, Any],
        name: str,
        auto_import: bool = True,
        cursor: tuple[float, float, float] | None = None,
    ) -> JobView:
        """Export a finished job again with new export settings; starts the backend if needed."""
        content = {"job_id": job_id, "params": params}
        view = self._enqueue("reexport", content, (), name, auto_import, cursor)
        view.parent = job_id
        return view

    def texture(
        self,
        image: bytes,
        mesh: bytes,
        params: dict[str, Any],
        name: str,
        target: str,
        filename: str = "image.png",
        result: str = "APPLY",
        uv_map: str = "",
        modifiers_applied: bool = False,
        auto_import: bool = True,
    ) -> JobView:
        """Queue texturing of a mesh (GLB bytes) with an image; the result goes onto `target`
        (APPLY) or beside it (COPY) when it comes. Starts the backend if needed."""
        content = {"params": params, "filename": filename, "mesh_format": "glb"}
        view = self._enqueue("texture", content, (image, mesh), name, auto_import, None)
        view.seed = params.get("seed")
        view.target, view.texture_result, view.uv_map = target, result, uv_map
        view.modifiers_applied = modifiers_applied
        return view

    # -- groups: Variations and Batches ----------------------------------------------------

    def start_group(self, group: Group) -> Group:
        """Run a group: its jobs go to the backend a few at a time (the tick feeds them), so
        a batch of hundreds never fills the backend's queue. Starts the backend if needed."""
        if not self.running:
            self.start()
        self.groups[group.key] = group
        self._feed_groups()
        self._sync_groups(force=True)
        self._changed()
        return group

    def active_groups(self) -> list[Group]:
        return [g for g in self.groups.values() if not g.ended]

    def cancel_group(self, key: str) -> Group | None:
        """Cancel every job of a group that has not ended; returns at once."""
        group = self.groups.get(key)
        if group is None:
            return None
        group.cancelled = True
        for item in group.items:
            if item.state == "pending":
                item.state, item.error = "cancelled", "cancelled before it was sent"
            elif item.key and not item.ended:
                self.cancel(item.key)
        self._sync_groups(force=True)
        return group

    def _feed_groups(self) -> None:
        for group in self.groups.values():
            if group.cancelled or not group.pending():
                continue
            if not self._ready() and any(i.key for i in group.items):
                continue  # the first job started the backend; the rest wait for it to answer
            in_flight = sum(1 for i in group.items if i.key and not i.ended)
            for item in group.pending()[: max(0, grouping.IN_FLIGHT - in_flight)]:
                if self.queue_full():
                    return  # the backend would answer `busy`: wait for room, fail nothing
                self._submit_item(group, item)

    def _submit_item(self, group: Group, item: grouping.GroupItem) -> None:
        if group.kind == "batch":
            try:
                image = Path(item.path).read_bytes()
            except OSError as exc:  # a file gone or unreadable: reported, the batch goes on
                item.state, item.error = "failed", f"cannot read it: {exc.strerror or exc}"
                return
            filename, name = item.label, Path(item.label).stem
        else:
            image, filename, name = group.image, group.filename, f"{group.name} seed {item.seed}"
        params = dict(group.params)
        if item.seed is not None:  # else the backend's default seed
            params["seed"] = item.seed
        content = {"params": params, "filename": filename}
        where = group.location(item.index)
        view = self._enqueue("generate", content, (image,), name, group.auto_import, where)
        view.seed, view.group = item.seed, group.key
        item.key, item.state = view.key, view.state

    def _sync_groups(self, force: bool = False) -> bool:
        """Fold the jobs' states into their groups; a batch's log follows every change."""
        changed = False
        for group in self.groups.values():
            moved = force and not group.finished
            for item in group.items:
                view = self.jobs.get(item.key) if item.key else None
                if view is None:
                    continue
                now = (view.state, view.job_id, view.glb_path or "", view.object_name)
                if now != (item.state, item.job_id, item.glb_path, item.object):
                    item.state, item.job_id = view.state, view.job_id
                    item.glb_path, item.object = view.glb_path or "", view.object_name
                    item.error = view.message if view.state in ("failed", "cancelled") else ""
                    moved = True
            if group.ended and group.finished is None:
                group.finished, moved = time.time(), True
            if moved and group.kind == "batch":
                grouping.write_log(group)
            changed = changed or moved
        return changed

    def item_of(self, view: JobView) -> tuple[Group | None, grouping.GroupItem | None]:
        group = self.groups.get(view.group) if view.group else None
        return group, group.item_for(view.key) if group is not None else None

    def _enqueue(self, msg_type, content, buffers, name, auto_import, cursor) -> JobView:
        if not self.running:
            self.start()  # raises (e.g. an unusable output folder) before any job exists
        self._next_key += 1
        view = JobView(
            key=f"job-{self._next_key}",
            name=name,
            kind=msg_type,
            auto_import=auto_import,
            submitted=self.clock(),
            cursor=cursor,
            engine=self.next_engine(),
            label="Waiting for the backend",
        )
        self.jobs[view.key] = view
        self._outbox.append(Outgoing(view.key, msg_type, content, tuple(buffers)))
        self._flush_outbox()
        self._changed()
        return view

    def _flush_outbox(self) -> None:
        if not self._ready():
            return
        while self._outbox:
            out = self._outbox.pop(0)
            view = self.jobs.get(out.key)
            if view is None or not self._step(view, views.SENT):
                continue
            pending = self.supervisor.request_nowait(
                out.msg_type, out.content, out.buffers, SUBMIT_TIMEOUT
            )
            if pending.msg_id:
                self._by_request[pending.msg_id] = view.key
            self._expect(pending, lambda p, key=view.key: self._on_submitted(key, p))

    def _on_submitted(self, key: str, pending: Pending) -> None:
        self._by_request.pop(pending.msg_id, None)
        view = self.jobs.get(key)
        if view is None:
            return
        if pending.ok:
            self._bind(view, pending.reply["job_id"])
            self._step(view, views.ACCEPTED, pending.reply)
            return
        error = pending.error
        if isinstance(error, ClientTimeout) or error.code is ErrorCode.BACKEND_DIED:
            # The backend may have queued it before going quiet: should its reply or its
            # job_queued event still come, that job is cancelled (apply), never run or imported.
            self._abandoned[pending.msg_id] = key
        self._step(view, views.REFUSED, {"message": error.message, "hint": error.hint})

    def _bind(self, view: JobView, job_id: str) -> None:
        """The backend named this view's job (it has it in its job store)."""
        other_key = self._keys.get(job_id)
        if other_key and other_key != view.key:  # events came first and made a view: take it
            views.merge(view, self.jobs.pop(other_key))
        view.job_id, view.on_backend = job_id, True
        self._keys[job_id] = view.key

    def find(self, ident: str) -> JobView | None:
        """A job by its key or its backend id."""
        return self.jobs.get(ident) or self.jobs.get(self._keys.get(ident, ""))

    def cancel(self, ident: str) -> JobView | None:
        """Cancel a job; returns at once (the tick finishes it when the backend confirms)."""
        view = self.find(ident)
        if view is not None:
            self._step(view, views.CANCEL)
        return view

    def _send_cancel(self, view: JobView) -> None:
        sup = self.supervisor or (self._retired[-1] if self._retired else None)
        if view.key in self._cancelling or sup is None or not view.job_id:
            return
        self._cancelling.add(view.key)
        view.cancel_retry_at = self.clock() + 1.0
        pending = sup.cancel_nowait(view.job_id)
        self._expect(pending, lambda p, key=view.key: self._on_cancel_reply(key, p))

    def _on_cancel_reply(self, key: str, pending: Pending) -> None:
        self._cancelling.discard(key)
        view = self.jobs.get(key)
        if view is None:
            return
        if pending.ok:
            if pending.reply.get("state") == "cancelled":
                self._step(view, views.JOB_CANCELLED)
            return  # "cancelling": the job_cancelled event ends it
        if pending.error.code is ErrorCode.NOT_FOUND:
            self._step(view, views.CANCEL_GONE, {"message": pending.error.message})
        # Otherwise (no backend right now): _retry_cancels sends it again.

    def _retry_cancels(self) -> None:
        now = self.clock()
        for view in self.active_jobs():
            if view.cancel_requested and view.job_id and now >= view.cancel_retry_at:
                self._send_cancel(view)

    def active_jobs(self) -> list[JobView]:
        return [v for v in self.jobs.values() if not v.terminal]

    def queue_full(self) -> bool:
        return len(self.active_jobs()) >= QUEUE_LIMIT

    def current_job(self) -> JobView | None:
        running = [v for v in self.jobs.values() if v.state == "running"]
        if running:
            return running[0]
        active = self.active_jobs()
        return active[0] if active else None

    def last_failure(self) -> JobView | None:
        """The job that ended last, when it failed (the main panel shows why)."""
        view = self.jobs.get(self.last_outcome or "")
        return view if view is not None and view.state == "failed" else None

    def dismiss_outcome(self) -> None:
        self.last_outcome = None

    # -- the tick ------------------------------------------------------------------------

    def tick(self) -> float:
        """One step that never waits: poll the backend, fold in its events, resolve replies,
        send what waited. Each part is guarded: an exception is reported once and the next
        part (and the next tick) still runs. Returns the seconds until the next tick."""
        self.ticks += 1
        changed = False
        for sup in list(self._retired):
            self._guard("stopping the old backend", lambda s=sup: self._tick_retired(s))
        if self.supervisor is not None:
            events = self._guard("polling the backend", self.supervisor.tick) or []
            for message in events:
                self._guard("reading a backend event", lambda m=message: self.apply(m))
            changed = bool(events)
        changed = bool(self._guard("resolving replies", self._resolve_requests)) or changed
        changed = bool(self._guard("watching the backend", self._watch_state)) or changed
        self._guard("starting the backend", self._maybe_start)
        self._guard("feeding groups", self._feed_groups)
        self._guard("sending jobs", self._flush_outbox)
        changed = bool(self._guard("downloading", self._follow_downloads)) or changed
        self._guard("cancelling jobs", self._retry_cancels)
        if self.clock() >= self._next_reconcile:
            self._guard("checking jobs", self._reconcile)
        self._guard("reading the history", self._refresh_history)
        changed = bool(self._guard("running the doctor", self.doctor.poll)) or changed
        changed = bool(self._guard("following groups", self._sync_groups)) or changed
        if changed:
            self._guard("redrawing", self._changed)
        busy = self.active_jobs() or self.active_groups() or self._requests or self.files.active
        busy = busy or self.state in CHANGING
        return BUSY_INTERVAL if busy else IDLE_INTERVAL

    def _guard(self, where: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # a timer that raises is dropped by Blender: never let it
            self.report_error(where, exc)
            return None

    def report_error(self, where: str, exc: BaseException) -> None:
        """An unexpected error: shown once in the panel, logged with its traceback once."""
        text = f"{where}: {type(exc).__name__}: {exc}"
        if text in self._reported:
            log.debug("again: %s", text)
            return
        if len(self._reported) < 200:
            self._reported.add(text)
        log.error("TRELLIS.2 add-on, %s", text, exc_info=exc)
        self.tick_errors.append(text)
        del self.tick_errors[:-20]
        self.last_error = f"Internal error while {one_line(text)}"
        self.last_hint = "The add-on keeps running; the system console has the details."

    def _tick_retired(self, sup: Any) -> None:
        sup.tick()  # a going backend's events are dropped
        if not getattr(sup, "stopping", False):
            self._retired.remove(sup)

    def _expect(self, pending: Pending, then: Callable[[Pending], None]) -> None:
        self._requests.append((pending, then))

    def _resolve_requests(self) -> bool:
        done = [(p, then) for p, then in self._requests if p.done]
        if not done:
            return False
        self._requests = [(p, then) for p, then in self._requests if not p.done]
        for pending, then in done:
            self._guard(f"handling the {pending.msg_type} reply", lambda p=pending, f=then: f(p))
        return True

    def _watch_state(self) -> bool:
        state = self.state
        self._note_session()
        if state == self._last_state:
            return False
        if state == "dead":
            self._on_dead()
        if state in ("stopped", "dead"):  # nothing more comes: downloads end (retried later)
            self.files.fail_all(BackendError(ErrorCode.BACKEND_DIED, f"the backend {state}"))
        if state in LIVE and self._last_state not in LIVE:
            self.history.refresh()
        self._last_state = state
        return True

    def _on_dead(self) -> None:
        """The supervisor gave up: say why; jobs never sent fail (they are never sent later);
        jobs the backend has wait for the next one."""
        sup = self.supervisor
        error = getattr(sup, "last_error", None)
        reason = getattr(error, "message", "") or getattr(sup, "state_reason", "")
        self.last_error = one_line(reason)
        self.last_hint = one_line(getattr(error, "hint", ""), 300)
        for out in list(self._outbox):
            view = self.jobs.get(out.key)
            if view is not None:
                self._step(
                    view, views.NOT_SENT, {"message": self.last_error, "hint": self.last_hint}
                )
        self._outbox.clear()
        for group in self.groups.values():
            for item in group.pending():
                item.state, item.error = "failed", f"not sent: {self.last_error}"
        self._park_jobs("Waiting for a backend: Restart it")

    def _reconcile(self) -> None:
        """Ask for the record of each active job now and then: the store is the truth."""
        self._next_reconcile = self.clock() + RECONCILE_EVERY
        if not self._answers():
            return
        for view in self.active_jobs():
            if view.job_id and view.key not in self._checking:
                self._checking.add(view.key)
                pending = self.supervisor.request_nowait("job", {"job_id": view.job_id})
                self._expect(pending, lambda p, key=view.key: self._on_job_record(key, p))

    def _on_job_record(self, key: str, pending: Pending) -> None:
        self._checking.discard(key)
        view = self.jobs.get(key)
        if view is None:
            return
        if not pending.ok:
            if pending.error.code is ErrorCode.NOT_FOUND:  # e.g. its folder was removed
                self._step(view, views.RECORD_GONE, {"message": pending.error.message})
            return
        event = views.record_event(pending.reply.get("job") or {})
        if event is not None:
            self._step(view, *event)

    def apply(self, message: Any) -> None:
        """Fold one backend message or supervisor event into the views."""
        msg_type, content, parent_id = _msg_parts(message)
        if msg_type.endswith("_reply"):  # a reply that came after its request was given up
            if self._abandoned.pop(parent_id or "", None) and content.get("job_id"):
                self._cancel_orphan(str(content["job_id"]))
            return
        job_id = content.get("job_id")
        if msg_type == "supervisor_job_retried" and isinstance(job_id, str):
            view = self.find(job_id)
            if view is not None:
                self._step(view, views.RETRIED)
            return
        if msg_type.startswith("job_") and isinstance(job_id, str):
            if parent_id and parent_id in self._abandoned:
                self._abandoned.pop(parent_id)
                self._cancel_orphan(job_id)
                return
            view = self.find(job_id)
            if view is None and parent_id in self._by_request:
                view = self.jobs.get(self._by_request[parent_id])
                if view is not None:
                    self._bind(view, job_id)
            if view is None:  # a job recovered from an earlier backend, or another client's
                view = self._adopt(job_id, content)
            self._step(view, msg_type, content)
            return
        if msg_type in ("backend_state", "heartbeat", "supervisor_state"):
            return  # the supervisor folds these into its own state
        text = content.get("message") or content.get("reason") or content.get("state")
        if msg_type and text:
            self.notes.append(f"{msg_type}: {one_line(text)}")
            del self.notes[:-20]

    def _adopt(self, job_id: str, content: dict[str, Any]) -> JobView:
        self._next_key += 1
        name = Path(str(content.get("filename") or job_id)).stem
        view = JobView(
            key=f"job-{self._next_key}",
            name=name,
            job_id=job_id,
            submitted=self.clock(),
            auto_import=False,  # never imported: nobody pressed Generate for it here
            on_backend=True,
            state="queued",
        )
        self.jobs[view.key] = view
        self._keys[job_id] = view.key
        return view

    def _cancel_orphan(self, job_id: str) -> None:
        if self.supervisor is not None:
            self._expect(self.supervisor.cancel_nowait(job_id), lambda p: None)
        self.notes.append(f"cancelled job {job_id}: its Generate was reported as failed")

    def _step(self, view: JobView, event: str, content: dict[str, Any] | None = None) -> bool:
        """Fold one event into a job's view (views.TRANSITIONS) and do what the step asks.
        False when the event changed nothing (late, or unknown in the view's state)."""
        importing = self.on_job_done is not None
        actions = views.step(view, event, content, now=self.clock(), importing=importing)
        for action in actions or ():
            if action == views.ENDED:
                self._outbox = [o for o in self._outbox if o.key != view.key]
                self.last_outcome = view.key
                self.history.refresh()
            elif action == views.UNQUEUE:
                self._outbox = [o for o in self._outbox if o.key != view.key]
            elif action == views.SEND_CANCEL:
                self._send_cancel(view)
            elif action == views.DOWNLOAD:
                self._download_result(view)
            elif action == views.STOP_DOWNLOAD:
                self._downloading.pop(view.key, None)
            elif action == views.IMPORT:
                self._import(view)
        return actions is not None

    def _download_result(self, view: JobView) -> None:
        """Bring the result here through `fetch` (never from the backend's path), then import
        it. The job stays active ("downloading") until then, so scripts' waits include it."""
        key = view.key
        self._downloading[key] = self.files.get(
            view.job_id, RESULT, lambda d: self._on_result_file(key, d)
        )

    def _on_result_file(self, key: str, download: Download) -> None:
        self._downloading.pop(key, None)
        view = self.jobs.get(key)
        if view is None:
            return
        if download.error is None:
            self._step(view, views.FILE_ARRIVED, {"path": download.path})
        elif self._step(view, views.FILE_FAILED, {"message": download.error.message}):
            self.last_error = view.message
            self.last_hint = one_line(download.error.hint or "", 300)
        # A job cancelled while its file came: the file stays in the cache, nothing imported.

    def _import(self, view: JobView) -> None:
        if self.on_job_done is None:
            return
        try:
            self.on_job_done(view)
        except Exception as exc:  # a failed import is reported, never raised in a timer
            self._step(view, views.IMPORT_FAILED, {"message": str(exc)})
            self.last_error = view.message

    def _follow_downloads(self) -> bool:
        moved = self.files.tick(self._send_fetch)
        for key, download in self._downloading.items():
            view = self.jobs.get(key)
            if view is not None and download.size:
                progress = {"fraction": download.fraction, "size": download.size}
                self._step(view, views.FILE_PROGRESS, progress)
        return moved

    def _send_fetch(self, content: dict[str, Any]) -> Pending | None:
        if not self._answers():
            return None  # the downloads wait for a backend that answers
        return self.supervisor.request_nowait("fetch", content, (), FETCH_TIMEOUT)

    def _downloads(self, config: BackendConfig) -> Downloads:
        return Downloads(self.cache_root / config.cache_key, guard=self._guard)

    def fetch_file(
        self, job_id: str, name: str, then: Callable[[Download], None] | None = None
    ) -> Download:
        """A job's file brought here (`then(download)` from the tick once it is, or at once
        when it is here already). Returns at once."""
        return self.files.get(job_id, name, then)

    def wait_file(self, job_id: str, name: str, timeout: float = 120.0) -> Download:
        """fetch_file() and tick until it is here or failed. Scripts only."""
        download = self.fetch_file(job_id, name)
        self._wait_until(lambda: download.done, timeout)
        return download

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- history (through the protocol) --------------------------------------------------

    def _refresh_history(self) -> None:
        h = self.history
        if not h.stale or h.request is not None or not self._answers():
            return
        h.request = self.supervisor.request_nowait("jobs", h.listing())
        self._expect(h.request, self._on_history)
        preview = h.prune_preview()
        if preview is not None and not self.remote:  # a gateway keeps its own store tidy
            pending = self.supervisor.request_nowait("delete_jobs", preview)
            self._expect(pending, lambda p: self.history.on_prune_preview(p))

    def _on_history(self, pending: Pending) -> None:
        if not self.history.on_listing(pending):
            return
        for entry in self.history.entries:
            self._fetch_thumbnail(entry)
        if self.on_history is not None:
            self.on_history(self.history.entries)

    def _fetch_thumbnail(self, entry: dict[str, Any]) -> None:
        """The entry's thumbnail, fetched into the cache; `thumbnail_file` once it is here."""
        name = file_name(entry.get("thumbnail"))
        if not name or not entry.get("job_id"):
            return

        def arrived(download: Download, entry=entry) -> None:
            if download.path:
                entry["thumbnail_file"] = download.path
                if self.on_file is not None:
                    self.on_file(download.path)

        self.files.get(entry["job_id"], name, arrived)

    def refresh_history(self) -> None:
        self.history.refresh()

    def history_page(self, page: int) -> None:
        self.history.turn_to(page)

    def history_search(self, query: str) -> None:
        self.history.search(query)

    def history_prune_days(self, days: int) -> None:
        self.history.set_prune_days(days)

    def history_entry(self, job_id: str) -> dict[str, Any] | None:
        return self.history.entry(job_id)

    def delete_jobs(self, job_id: str | None = None, older_than_days: int | None = None) -> None:
        """Remove one finished job, or those older than N days; returns at once."""
        if self.remote:
            raise BackendError(
                ErrorCode.UNKNOWN_REQUEST,
                "jobs on a studio server are removed by its admin",
                REMOTE_ONLY_LOCAL,
            )
        if not self._answers():
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                "the history is kept by the backend, which is not running",
                "Start the backend first.",
            )
        content = delete_request(job_id, older_than_days)
        pending = self.supervisor.request_nowait("delete_jobs", content)
        self._expect(pending, lambda p: self.history.on_deleted(p))

    # -- status and doctor ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Backend state plus GPU and VRAM from the supervisor's last `status` poll (memory)."""
        out: dict[str, Any] = {
            "state": self.state,
            "reason": "",
            "log_path": None,
            "pid": None,
            "engine": self.running_engine(),
        }
        if self.supervisor is not None:
            sup = self.supervisor.status()
            out.update(
                reason=sup.get("reason") or "",
                log_path=sup.get("log_path"),
                pid=sup.get("pid"),
                session=sup.get("session"),
                restarts=sup.get("restarts", 0),
                remote=sup.get("remote"),
            )
            out.update(_backend_figures(sup.get("backend") or {}))
        return out

    def run_doctor(self) -> None:
        """Run `python -m backend doctor` with the backend's interpreter, in the background
        (it imports torch); the tick collects the report."""
        self.doctor.start(self.config)

    # -- blocking mode (blender -b scripts, tests) ---------------------------------------

    def _wait_until(self, done: Callable[[], bool], timeout: float, sleep: float = 0.02) -> None:
        """Tick until `done()`; raises on a dead backend or at the timeout. Scripts only."""
        deadline = time.monotonic() + timeout
        while not done():
            self.tick()
            if done():
                return
            if self.state == "dead":
                error = getattr(self.supervisor, "last_error", None)
                raise error or BackendError(ErrorCode.BACKEND_DIED, "the backend stopped")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not done within {timeout:.0f} s (backend {self.state})")
            time.sleep(sleep)

    def wait(self, ident: str, timeout: float = 600.0) -> JobView:
        """Tick until the job ends (its key or backend id). Scripts only."""

        def ended() -> bool:
            view = self.find(ident)
            return view is None or view.terminal

        self._wait_until(ended, timeout)
        return self.find(ident)

    def wait_idle(self, timeout: float = 600.0) -> None:
        """Tick until no job is waiting, queued or running, and no group has jobs left to send.
        Scripts only."""
        self._wait_until(
            lambda: not self.active_jobs() and not self.active_groups() and not self.files.active,
            timeout,
        )

    def wait_group(self, key: str, timeout: float = 600.0) -> Group:
        """Tick until every job of the group has ended. Scripts only."""
        self._wait_until(lambda: self.groups[key].ended, timeout)
        return self.groups[key]

    def wait_ready(self, timeout: float | None = None) -> None:
        self._wait_until(self._ready, timeout or self.config.start_timeout + 5.0)

    def wait_stopped(self, timeout: float = 60.0) -> None:
        self._wait_until(lambda: self.state in ("stopped", "dead"), timeout)

    def generate_blocking(
        self,
        image: bytes,
        params: dict[str, Any],
        name: str,
        filename: str = "image.png",
        auto_import: bool = True,
        timeout: float = 600.0,
        cursor: tuple[float, float, float] | None = None,
    ) -> JobView:
        """Submit and wait, for `blender -b` scripts where no timer runs."""
        self.start(wait=True, timeout=self.config.start_timeout)
        view = self.submit(image, params, name, filename, auto_import, cursor)
        return self.wait(view.key, timeout)

    def history_blocking(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The current history page, fetched now (starts nothing). Scripts and tests."""
        self.history.refresh()
        self._wait_until(lambda: self.history.settled, timeout)
        return self.history.entries

    def job_entry_blocking(self, job_id: str, timeout: float = 30.0) -> dict[str, Any] | None:
        """A job as a history entry, asked for now (scripts: a job not on the history page)."""
        if not self._answers():
            return None
        pending = self.supervisor.request_nowait("job", {"job_id": job_id})
        self._wait_until(lambda: pending.done, timeout)
        if not pending.ok:
            return None
        return job_entry(pending.reply)

    def wait_doctor(self, timeout: float = 120.0) -> dict[str, Any] | None:
        self._wait_until(lambda: not self.doctor.running, timeout)
        return self.doctor.report

    def shutdown(self, timeout: float | None = None) -> None:
        """Everything off (unregister, Blender quitting): no orphan processes. This one waits
        (bounded by the shutdown ladder)."""
        self.doctor.kill()
        self._start_wanted = False
        for sup in [*self._retired, self.supervisor]:
            if sup is not None:
                try:
                    sup.stop(timeout)
                except Exception as exc:  # the process may already be gone; nothing to keep
                    log.warning("stopping the backend: %s", exc)
        self._retired.clear()
        try:
            self.run_dir.rmdir()  # the connection file is gone; leave no empty folder
        except OSError:
            pass


def _backend_figures(reply: dict[str, Any]) -> dict[str, Any]:
    """GPU name and VRAM from a backend `status` reply (docs/protocol.md)."""
    if not reply:
        return {}
    vram = reply.get("vram") or {}
    return {
        "gpu": vram.get("device") or "",
        "vram_used": vram.get("reserved") or vram.get("allocated"),
        "vram_total": vram.get("total"),
    }


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value)).lower()
