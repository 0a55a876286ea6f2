"""The backend's state and the threads that change it: the engine loader, the job workers, the
GPU health prober, queue recovery, and the lanes that run slow requests off the control loop.
No socket is touched here: events and late replies leave through the `emit` callable the
server gives (`loop.py` is the I/O shell; `handlers.py` answers requests over this state)."""

from __future__ import annotations

import logging
import queue as queue_mod
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from enum import Enum
from typing import Any

from .. import settings
from ..backendlogs import Predecessor
from ..engines import create as create_engine
from ..engines import load_error
from ..errors import BackendError, ErrorCode
from ..pipeline import gpu, heap
from ..pipeline.runner import Runner, RunnerConfig
from ..store.jobs import JobRecord, JobState, JobStore, after_backend_died
from ..store.ownerlock import BACKEND_LOCK, OWNER_LOCK, OutputLock
from ..store.stats import StatsLog
from .jobhost import HostGone, HostSettings, JobHost

log = logging.getLogger(__name__)

Emit = Callable[..., None]  # emit(msg_type, content, parent=None)


class BackendState(str, Enum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    POISONED = "poisoned"
    STOPPING = "stopping"
    FAILED = "failed"  # the engine could not load; requests still answered


class ThreadLane:
    """Daemon threads that run submitted work in order (one thread: strictly FIFO). Daemon,
    so a slow `doctor` never holds up the process's exit."""

    def __init__(self, name: str, threads: int = 1):
        self._work: queue_mod.SimpleQueue[Callable[[], None]] = queue_mod.SimpleQueue()
        for i in range(threads):
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._work.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._work.get()
            try:
                fn()
            except Exception:  # the work reports its own errors; the lane must outlive them
                log.exception("lane work failed")


class Backend:
    """Everything a request handler reads or changes, and the threads that run jobs."""

    def __init__(
        self,
        config,
        emit: Emit,
        session_id: str,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.session_id = session_id  # new per process: clients see a restart
        self.clock = clock
        self.emit = emit
        self.started_at = time.monotonic()
        # The backend that runs jobs holds backend.lock; one run without a supervisor (no
        # parent) owns the folder itself too (owner.lock). Taken by claim(), at activation.
        locks = [OutputLock(config.output_dir, BACKEND_LOCK, "backend", config.connection_file)]
        if not config.parent_pid:
            locks.insert(
                0, OutputLock(config.output_dir, OWNER_LOCK, "backend", config.connection_file)
            )
        self.store = JobStore(config.output_dir, locks=locks)
        self.keys: dict[str, str] = {}  # idempotency key -> job id
        self.stats = StatsLog(config.state_dir / "stats.jsonl")
        self.state = BackendState.STARTING
        self.state_reason = "starting"
        self.engine = create_engine(config.engine, **config.engine_options)
        self.engine_error: dict[str, Any] | None = None
        self.profile = self._open_profile()
        self.runner = Runner(
            self.engine,
            self.store,
            self.stats,
            self.profile,
            RunnerConfig(min_free_disk=config.min_free_disk),
        )
        # What `status` shows of the GPU, refreshed off the loop (prober, loader, workers):
        # a status request must never wait on CUDA.
        self.health: dict[str, Any] = {"ok": True, "gpu": False}
        self.vram: dict[str, Any] | None = None
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.counts_lock = threading.Lock()  # counters are read by the reader lane
        self.queue: deque[str] = deque()
        self.queue_cv = threading.Condition()
        self.running: dict[str, threading.Event] = {}
        self.decoded: dict[str, Any] = {}  # job id -> input decoded at submit (saves a decode)
        self.ready = threading.Event()
        self.active = threading.Event()
        self.stopping = threading.Event()
        self.exit_code = 0
        self.stop_deadline = 0.0
        n = max(1, int(config.max_concurrent))
        if n > 1 and self.engine.uses_gpu:
            log.warning("GPU engines are not thread-safe; running one job at a time")
            n = 1
        self.max_concurrent = n
        # Several jobs at once run in job processes of their own (jobhost.py), so that they
        # never queue with the control loop for this interpreter's GIL; one runs on a thread.
        self.hosts: list[JobHost] = []
        if n > 1:
            host_settings = HostSettings(
                output_dir=config.output_dir,
                state_dir=config.state_dir,
                engine=config.engine,
                engine_options=dict(config.engine_options),
                min_free_disk=config.min_free_disk,
            )
            self.hosts = [
                JobHost(slot, host_settings, cancel_grace=config.job_cancel_grace)
                for slot in range(n)
            ]
        # What `status.current` shows: the latest progress of each running job, from its
        # events (the runner's on a thread, a job process's relayed).
        self.progress: dict[str, tuple[float, dict[str, Any]]] = {}  # job id -> (when, event)
        self._threads: list[threading.Thread] = []
        # `status.reader`: the server's reader process (loop.py sets it; None without one).
        self.reader_figures: Callable[[], dict[str, Any] | None] = lambda: None

    # -- state -------------------------------------------------------------------------

    def _open_profile(self):
        """The adaptive-start memory profile of this GPU (None for CPU engines)."""
        key = gpu.device_key() if self.engine.uses_gpu else None
        if key is None:
            return None
        from ..pipeline.memprofile import MemoryProfile

        return MemoryProfile(self.config.state_dir / "memory_profile.json", gpu_key=key)

    def current_progress(self) -> dict[str, Any] | None:
        """The latest `job_progress` of a running job (None when none has reported)."""
        reported = [self.progress[j] for j in list(self.running) if j in self.progress]
        return max(reported, key=lambda at_event: at_event[0])[1] if reported else None

    def host_figures(self) -> list[dict[str, Any]] | None:
        """`status.job_hosts`: each job process's slot, pid, job and restarts (None: jobs
        run on threads of this process)."""
        return [host.figures() for host in self.hosts] if self.hosts else None

    def current_state(self) -> BackendState:
        if self.state is BackendState.READY and self.running:
            return BackendState.BUSY
        return self.state

    def set_state(self, state: BackendState, reason: str) -> None:
        self.state = state
        self.state_reason = reason
        self.emit("backend_state", {"state": state.value, "reason": reason})

    def count(self, counter: Counter[str], name: str) -> None:
        with self.counts_lock:
            counter[name] += 1

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        with self.counts_lock:
            return dict(self.counters), dict(self.rejected)

    def queue_snapshot(self) -> list[str]:
        with self.queue_cv:
            return list(self.queue)

    def output_health(self) -> dict[str, Any]:
        problem = self.store.problem
        return {
            "ok": problem is None,
            "error": problem.to_dict() if problem else None,
            "unrecorded": self.store.pending(),  # outcomes kept in memory until writable
        }

    def _refresh_vram(self) -> None:
        if self.engine.uses_gpu:
            self.vram = gpu.vram(init=False)

    # -- lifecycle ---------------------------------------------------------------------

    def claim(self) -> None:
        """Take the output folder (its locks); raises OutputLocked when another process owns
        it. A standby claims it when activated."""
        if not self.config.standby:
            self.store.claim()

    def start(self) -> None:
        if not self.config.standby:
            self.activate()
        self._spawn(self._load_engine, "engine-loader")
        for slot in range(self.max_concurrent):
            self._spawn(lambda slot=slot: self._worker(slot), f"worker-{slot}")
        if self.engine.uses_gpu:
            self._spawn(self._watch_gpu, "gpu-health")

    def activate(self, predecessor: dict[str, Any] | None = None) -> None:
        """Take the folder and recover its queue. `predecessor`: what the supervisor knows of
        the backend before this one (a standby's `activate`; otherwise the environment)."""
        with self.queue_cv:
            if self.active.is_set():
                return
            self.store.claim()  # raises OutputLocked: the standby must not run anything
            records, _ = self.store.list()
            self.keys = {r.idempotency_key: r.id for r in records if r.idempotency_key}
            if self.config.recover:
                note = (
                    Predecessor.from_dict(predecessor)
                    if predecessor is not None
                    else Predecessor.from_env()
                )
                self._recover_jobs(records, note)
            self.active.set()
            self.queue_cv.notify_all()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def request_stop(
        self,
        reason: str,
        exit_code: int = settings.EXIT_OK,
        *,
        grace: float | None = None,
        escalate: bool = False,
    ) -> None:
        """Stop taking work; running jobs get `grace` seconds (the config's shutdown grace)
        to reach a checkpoint and requeue themselves. `escalate` (a signal after a
        `shutdown` request, or a second signal: the supervisor's next rung) stops waiting for
        them. A job that did not requeue is found `running` by the next backend, which runs
        it once more as a job whose backend died."""
        if self.stopping.is_set():
            if escalate:
                self.stop_deadline = time.monotonic()
            return
        self.exit_code = exit_code
        wait = self.config.shutdown_grace if grace is None else grace
        self.stop_deadline = time.monotonic() + wait
        if self.state is not BackendState.POISONED:
            self.set_state(BackendState.STOPPING, reason)
        self.stopping.set()
        with self.queue_cv:
            self.queue_cv.notify_all()

    def jobs_still_running(self) -> bool:
        """A stopping backend waits for its running jobs to reach a checkpoint (and requeue
        themselves), up to the shutdown grace."""
        return bool(self.running) and time.monotonic() < self.stop_deadline

    # -- jobs --------------------------------------------------------------------------

    def queued_event(self, record: JobRecord, position: int, **extra: Any) -> dict[str, Any]:
        """The one shape of `job_queued`, first queued or queued again."""
        return {
            "job_id": record.id,
            "kind": record.kind,
            "position": position,
            "filename": record.filename,
            **extra,
        }

    def _job_emit(self, msg_type: str, content: dict[str, Any], parent=None) -> None:
        """The runner's events; a job it puts back in the queue (the backend is stopping) is
        announced with the same fields as when it was first queued."""
        if msg_type == "job_progress":
            self.progress[content["job_id"]] = (time.monotonic(), content)
        if msg_type == "job_queued" and "kind" not in content:
            try:
                record = self.store.get(content["job_id"])
            except BackendError:
                pass
            else:
                ahead = len(self.queue) + sum(1 for j in self.running if j != record.id)
                content = self.queued_event(record, 1 + ahead, **content)
        self.emit(msg_type, content, parent)

    def _load_engine(self) -> None:
        began = time.monotonic()
        self.set_state(BackendState.LOADING, f"loading {self.engine.label or self.engine.name}")

        def progress(fraction: float, text: str = "") -> None:
            self.emit("backend_state", {"state": "loading", "fraction": fraction, "reason": text})

        try:
            if self.hosts:
                self._start_hosts(progress)
            else:
                if self.config.vram_cap_bytes:
                    import torch  # noqa: F401  (the allocator was configured before this import)

                    gpu.set_memory_cap(self.config.vram_cap_bytes)
                self.engine.load(progress)
        except Exception as exc:
            self._engine_failed(exc)
            return
        seconds = time.monotonic() - began
        self.runner.profile = self._open_profile()
        self._refresh_vram()
        if self.config.settle_heap:
            heap.settle()  # what start-up built lives as long as the process
        self.stats.append("ready", engine=self.engine.name, seconds=round(seconds, 4))
        self.set_state(BackendState.READY, f"ready in {seconds:.2f} s")
        self.ready.set()

    def _engine_failed(self, exc: BaseException) -> None:
        """The engine did not load (at start-up, or in a job process replacing one): the
        backend fails typed, no job process is left, and the queued jobs end with the error."""
        error = load_error(exc)
        if isinstance(exc, HostGone):  # its job process died before it could say why
            error = BackendError(error.code, f"the engine did not load: {exc.why}")
        self.engine_error = error.to_dict()
        log.error("engine failed to load: %s", error.message)
        for host in self.hosts:
            host.close()
        self.set_state(BackendState.FAILED, error.message)
        self._fail_queue(error)

    def _start_hosts(self, progress: Callable[..., None]) -> None:
        """Start every job process, then wait for each to load its engine (the first one's
        progress is shown)."""
        for host in self.hosts:
            host.launch()
        for host in self.hosts:
            host.wait_ready(progress if host.slot == 0 else None)

    def _restart_host(self, host: JobHost) -> bool:
        """A job process went: start another in its slot. When the engine no longer loads the
        backend fails as at start-up."""
        if self.stopping.is_set():
            return False
        try:
            host.start()
        except (BackendError, HostGone) as exc:
            if not self.stopping.is_set():  # not merely stopped while it loaded
                self._engine_failed(exc)
            return False
        return True

    def close(self, wait: float = 1.0) -> None:
        """Stop the job processes (the server's last step; each also exits when this process
        is gone). All are told at once, then waited for `wait` seconds together, so hung
        ones (killed then) cost the exit one wait, not one each."""
        for host in self.hosts:
            host.shut()
        deadline = time.monotonic() + wait
        for host in self.hosts:
            host.close(max(0.0, deadline - time.monotonic()))

    def _fail_queue(self, error: BackendError) -> None:
        with self.queue_cv:
            pending = list(self.queue)
            self.queue.clear()
        for job_id in pending:
            try:
                self.store.transition(job_id, "fail", error=error.to_dict())
            except BackendError as exc:
                self.end_unrecorded(job_id, exc)
                continue
            self.emit("job_failed", {"job_id": job_id, **error.to_dict()})

    def _worker(self, slot: int = 0) -> None:
        host = self.hosts[slot] if self.hosts else None
        while not self.stopping.is_set():
            if not (self.ready.wait(timeout=0.2) and self.active.wait(timeout=0.2)):
                continue
            if host is not None and not host.alive() and not self._restart_host(host):
                return  # it went between jobs and no other would load: the backend failed
            with self.queue_cv:
                while not self.queue and not self.stopping.is_set():
                    self.queue_cv.wait(timeout=0.5)
                if self.stopping.is_set():
                    return
                job_id = self.queue.popleft()
                image = self.decoded.pop(job_id, None)
                cancel = threading.Event()
                self.running[job_id] = cancel
            poisoned = False
            try:
                problem = self.store.problem
                if problem is not None:  # the folder cannot record it: it ends typed, now
                    reason = f"not run: the output folder cannot be used ({problem.message})"
                    self.end_unrecorded(job_id, BackendError(problem.code, reason, problem.hint))
                    continue
                if host is not None:
                    poisoned = self._run_on_host(host, job_id, cancel)
                else:
                    result = self.runner.run(
                        self.store.get(job_id),
                        emit=self._job_emit,
                        cancelled=cancel.is_set,
                        interrupted=self.stopping.is_set,
                        image=image,
                    )
                    poisoned = result.poisoned
            except BackendError as exc:  # the store could not write the job's record
                self.end_unrecorded(job_id, exc)
            except Exception as exc:
                log.exception("worker failed on job %s", job_id)
                self.end_unrecorded(job_id, BackendError(ErrorCode.INTERNAL, repr(exc)))
            finally:
                self.running.pop(job_id, None)
                self.progress.pop(job_id, None)
                self._refresh_vram()  # `status` right after a job shows what it left
            if poisoned:
                self.set_state(BackendState.POISONED, f"CUDA context broken during job {job_id}")
                self.request_stop("gpu poisoned", exit_code=settings.EXIT_POISONED)
                return

    def _run_on_host(self, host: JobHost, job_id: str, cancel: threading.Event) -> bool:
        """Run a job in this slot's job process (it reads its input from the job's folder);
        True when the CUDA context broke. A job whose process died is the job of a dead
        backend: it runs once more on a new process, then fails."""
        try:
            ended = host.run(job_id, self._job_emit, cancel, self.stopping)
        except HostGone as gone:
            log.warning("job %s: %s", job_id, gone.why)
            if host.is_shut:  # the stopping backend stopped it: its folder's locks are going
                log.warning("job %s left running for the next backend", job_id)
                return False
            # The worker starts another before its next job.
            self._lost_with_host(job_id, gone.why, cancelled=cancel.is_set())
            return False
        if ended.get("unrecorded"):
            self.end_unrecorded(job_id, BackendError.from_dict(ended["unrecorded"]))
        return bool(ended.get("poisoned"))

    def _lost_with_host(self, job_id: str, why: str, cancelled: bool = False) -> None:
        """A job whose job process went (it died, or hung past its cancel and was stopped).
        `cancelled`: the user cancelled it, whatever its record says yet (the cancel may have
        come before its process wrote it `running`, when it is not noted on disk)."""
        record = self.store.get(job_id)
        if record.terminal:
            return  # its outcome was written before its process went
        if cancelled:
            record.cancel_requested = True  # so the one rule cancels it
        if (record.state is JobState.RUNNING or cancelled) and not self._after_death(record, why):
            return
        with self.queue_cv:  # first in line again (it never started, or runs once more)
            self.queue.appendleft(job_id)
            self.queue_cv.notify()
        if record.state is JobState.RUNNING:
            retry = {"job_id": job_id, "reason": "job_process_died", "message": why}
            self.emit("job_retry", retry)
            self.emit("job_queued", self.queued_event(record, 1, reason=why))

    def _watch_gpu(self, interval: float = settings.GPU_HEALTH_INTERVAL) -> None:
        """Probe the GPU off the control loop, so `status` reports a hung GPU without hanging."""
        while not self.stopping.wait(interval):
            if self.ready.is_set():
                self.health = dict(gpu.probe_health(2.0), checked=self.clock())
                self._refresh_vram()

    def _recover_jobs(self, records: list[JobRecord], note: Predecessor | None = None) -> None:
        """Every job a dead backend left queued or running runs again (running ones only
        once); one the user cancelled while it ran stays cancelled. A job whose record cannot
        be written ends failed with the store's typed error. `note` (from the supervisor) says
        why that backend went: each running job's log gets the reason and its log's last
        lines, which a failed job's error carries too (`log_tail`)."""
        why = note.why if note is not None else "found running at start-up"
        tail: str | None = None  # read once, for the first job found running
        for record in sorted((r for r in records if not r.terminal), key=lambda r: r.created):
            try:
                if record.state is JobState.RUNNING:
                    if tail is None:
                        tail = note.tail(self.config.output_dir) if note is not None else ""
                    if note is not None:
                        self.store.append_log(record.id, note.job_note(tail))
                    hint = note.hint if note is not None else None
                    if not self._after_death(record, why, hint, tail):
                        continue
            except BackendError as exc:
                self.end_unrecorded(record.id, exc)
                continue
            self.queue.append(record.id)
            if record.state is JobState.RUNNING:
                self.emit("job_queued", self.queued_event(record, len(self.queue), reason=why))

    def _after_death(
        self, record: JobRecord, why: str, hint: str | None = None, tail: str | None = None
    ) -> bool:
        """A job left running by a process that died (the backend, or its job process): the
        one rule (`after_backend_died`) applied, written, logged and announced. True when it
        runs again (the caller queues it); its cancel or failure is announced here."""
        event, fields = after_backend_died(record, why, hint)
        if event == "fail" and tail is not None:
            fields["error"] = {**fields["error"], "log_tail": tail}
        self.store.transition(record.id, event, **fields)
        if event == "cancel":
            self.store.discard_output(record.id)  # a GLB it was writing when it went
            self.store.append_log(record.id, f"cancelled; its process went first ({why})")
            self.emit("job_cancelled", {"job_id": record.id})
            return False
        if event == "fail":
            self.store.append_log(record.id, f"failed: backend died again ({why})")
            self._job_stats(record, BackendError.from_dict(fields["error"]))
            self.emit("job_failed", {"job_id": record.id, **fields["error"]})
            return False
        self.store.append_log(record.id, f"its process died ({why}); running it again")
        return True

    def end_unrecorded(self, job_id: str, error: BackendError) -> None:
        """A job the store could not record (disk full, read-only or deleted folder) still
        ends: failed with that typed error, kept in memory until the folder is writable."""
        if error.code is ErrorCode.NOT_FOUND:
            error = BackendError(
                ErrorCode.OUTPUT_UNWRITABLE,
                f"the folder of job {job_id} is gone or its record was damaged: {error.message}",
            )
        if not self.store.settle(job_id, error):
            return  # it had ended already
        log.warning("job %s failed: %s", job_id, error.message)
        self.store.discard_output(job_id)
        try:
            self._job_stats(self.store.get(job_id), error)
        except BackendError:
            pass  # its folder is gone
        self.emit("job_failed", {"job_id": job_id, **error.to_dict()})

    def _job_stats(self, record: JobRecord, error: BackendError) -> None:
        """The stats line of a job that ended without running to its end."""
        self.stats.append(
            "job",
            job_id=record.id,
            engine=record.engine,
            job_kind=record.kind,
            params=record.params,
            attempts=record.attempts,
            outcome="failed",
            error_code=error.code.value,
        )
