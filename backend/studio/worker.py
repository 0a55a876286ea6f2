"""A GPU worker of the studio server: a Celery worker (one job at a time) that owns one GPU
through its own supervised backend, pinned with CUDA_VISIBLE_DEVICES, so the ladder, cleanup
and respawn work as they do on an artist's machine (docs/SCALE.md).

A job is a folder of the shared job store. The worker takes its lease in Redis, marks it
running, sends its input to the local backend over the usual protocol, relays the backend's
events (with the shared job id), renews the lease, passes a cancel on, and when the local job
ends copies the result into the shared folder and writes the one outcome. A worker that dies
leaves a lapsing lease and an unacknowledged message, which Celery hands to another worker.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.exceptions import LockError

from ..errors import BackendError, ErrorCode
from ..store.jobs import MESH_STEM, RESULT, STATS, JobRecord, JobStore, outcome_event
from ..supervision.backend_process import BackendSpec
from ..supervision.supervisor import RespawnPolicy, Supervisor, SupervisorEvent, SupervisorState
from ..wire import protocol
from ..wire.client import ClientTimeout
from .coord import Coordinator, Lease
from .dispatch import TASK_NAME, Timing, make_celery, queues_for_card

log = logging.getLogger(__name__)

# Local events passed on to the gateway; queued/started/outcomes are the worker's own.
RELAYED = ("job_progress", "job_retry")
SUBMIT_PATIENCE = 300.0  # seconds to wait for a restarting local backend to take the job
LOCAL_CHECK = 0.25  # seconds between looks at the local job's record
LOCAL_ENDS = ("job_done", "job_failed", "job_cancelled")


@dataclass
class WorkerConfig:
    name: str
    broker: str  # redis://... (the broker, and the coordination keys)
    store: Path  # the shared job store (the gateway's --store)
    work_dir: Path  # this worker's private folder: its backend's own job store and logs
    vram_gb: float
    gpu: int | None = None
    engine: str = "preview"
    engine_options: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable
    min_free_disk_mb: float | None = None
    timing: Timing = field(default_factory=Timing)
    policy: RespawnPolicy = field(default_factory=RespawnPolicy)

    @property
    def queues(self) -> list[str]:
        return queues_for_card(self.vram_gb, self.name)


class _LeaseLost(Exception):
    """Another worker took the job over: this one must not write its outcome."""


class _HandBack(Exception):
    """The job goes back on the queue (this worker is stopping or its backend is dead)."""


class WorkerRuntime:
    """Owns this worker's supervised backend (one thread at a time, under `lock`), its view of
    the shared store and its Redis coordinator."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.timing = config.timing
        env = {"CUDA_VISIBLE_DEVICES": str(config.gpu)} if config.gpu is not None else {}
        self.spec = BackendSpec(
            output_dir=config.work_dir / "backend",
            connection_file=config.work_dir / "run" / "backend.json",
            python=config.python,
            engine=config.engine,
            engine_options=config.engine_options,
            env=env,
            min_free_disk_mb=config.min_free_disk_mb,
        )
        self.sup = Supervisor(self.spec, config.policy)
        self.lock = threading.Lock()
        self.shared = JobStore(config.store)
        self.local = JobStore(self.spec.output_dir)  # read only: the backend owns it
        self.coord = Coordinator(config.broker, self.timing)
        self.engine: dict[str, Any] = {}
        self.current: str | None = None  # the shared job id being run
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        self.sup.start_and_wait()
        client = self.sup.client
        if client is not None:
            self.engine = client.hello(timeout=10.0).get("engine") or {}
        self._announce()
        self._keeper = threading.Thread(target=self._keep, name="worker-keeper", daemon=True)
        self._keeper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=5.0)
        try:
            self.coord.withdraw_worker(self.config.name)
        except Exception as exc:  # Redis may be gone already; the entry lapses by itself
            log.warning("cannot withdraw worker %s: %s", self.config.name, exc)
        with self.lock:
            self.sup.stop(timeout=30.0)
        self.coord.close()

    def _keep(self) -> None:
        """Between jobs: tick the supervisor (respawns happen) and announce this worker."""
        next_announce = 0.0
        while not self._stop.wait(0.05):
            if self.current is None and self.lock.acquire(timeout=0.05):
                try:
                    for event in self.sup.tick():
                        if isinstance(event, SupervisorEvent):
                            log.info("backend %s: %s", event.kind, event.reason)
                finally:
                    self.lock.release()
            now = time.monotonic()
            if now >= next_announce:
                next_announce = now + self.timing.registry_renew
                try:
                    self._announce()
                except Exception as exc:  # Redis away for a moment: the next round retries
                    log.warning("cannot announce worker: %s", exc)

    def _announce(self) -> None:
        self.coord.announce_worker(
            self.config.name,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "gpu": self.config.gpu,
                "vram_gb": self.config.vram_gb,
                "queues": self.config.queues,
                "engine": self.engine,
                "state": self.sup.state.value,
                "job": self.current,
            },
        )

    # -- one job -----------------------------------------------------------------------------

    def run(self, task: Any, job_id: str) -> str:
        """The Celery task's body. Returns what happened (for the worker's log)."""
        from celery.exceptions import Reject

        try:
            record = self.shared.get(job_id)
        except BackendError as exc:
            log.warning("job %s: %s; dropping its message", job_id, exc.message)
            return "missing"
        if record.terminal:
            return f"already {record.state.value}"
        if self.sup.state is SupervisorState.DEAD:
            self._stop_worker(f"the local backend is dead: {self.sup.state_reason}")
            raise Reject("local backend dead", requeue=True)
        lease = self.coord.lease(job_id)
        if not lease.acquire():
            # Redelivered while another worker runs it (a visibility timeout during a long job):
            # look again later, so the job still runs if that worker dies.
            raise task.retry(countdown=self.timing.retry_countdown, max_retries=None)
        self.current = job_id
        try:
            return self._run_leased(job_id, lease)
        except _HandBack as exc:
            raise Reject(str(exc), requeue=True) from None
        except _LeaseLost:
            return "taken over by another worker"
        except Exception:
            # Leave the record `running`: whoever takes the job next counts this as a lost
            # run, so a job that breaks workers fails on its second loss.
            log.exception("job %s: worker error; handing the job back", job_id)
            raise Reject("worker error", requeue=True) from None
        finally:
            self.current = None
            lease.release()

    def _run_leased(self, job_id: str, lease: Lease) -> str:
        record = self._begin(job_id)
        if record is None:
            return "not started"
        self._publish(
            "job_started",
            {
                "job_id": job_id,
                "kind": record.kind,
                "engine": self.engine.get("name", ""),
                "worker": self.config.name,
            },
        )
        local_id, refused = self._submit(record, lease)
        if local_id is None:
            return self._finish(job_id, lease, None, refused)
        self.shared.update(job_id, extra={**self.shared.get(job_id).extra, "local_job": local_id})
        local = self._follow(job_id, local_id, lease)
        return self._finish(job_id, lease, local)

    def _begin(self, job_id: str) -> JobRecord | None:
        """Mark the job running on this worker (counting a run a lost worker left behind)."""
        with self.coord.state_lock(job_id):
            record = self.shared.get(job_id)
            if record.terminal:
                return None
            if self.coord.cancel_requested(job_id):
                self.shared.transition(job_id, "cancel")
                self.coord.remove_pending(job_id)
                self._publish("job_cancelled", {"job_id": job_id})
                return None
            runs = list(record.extra.get("runs") or [])
            if record.state.value == "running":  # its worker was lost mid-job
                lost = runs[-1] if runs else "?"
                if not record.may_run_again:
                    error = BackendError(
                        ErrorCode.BACKEND_DIED,
                        f"the worker running this job was lost twice (last: {lost})",
                        "See the workers' logs; the job may crash its GPU worker.",
                    ).to_dict()
                    self.shared.transition(job_id, "fail", error=error)
                    self.shared.append_log(job_id, f"failed: worker {lost} was lost again")
                    self._publish("job_failed", {"job_id": job_id, **error})
                    return None
                self.shared.transition(job_id, "requeue", recoveries=record.recoveries + 1)
                self.shared.append_log(job_id, f"worker {lost} was lost; running the job again")
                self._publish(
                    "job_retry", {"job_id": job_id, "reason": "worker_lost", "worker": lost}
                )
            extra = {**record.extra, "worker": self.config.name, "runs": [*runs, self.config.name]}
            record = self.shared.transition(job_id, "start", backend_pid=os.getpid(), extra=extra)
            self.coord.remove_pending(job_id)
        self.shared.append_log(job_id, f"started on worker {self.config.name}")
        return record

    def _submit(self, record: JobRecord, lease: Lease) -> tuple[str | None, BackendError | None]:
        """Send the job to the local backend: (local job id, None) or (None, why not)."""
        deadline = time.monotonic() + SUBMIT_PATIENCE
        while True:
            self._check(record.id, lease)
            try:
                with self.lock:
                    self.sup.tick()
                    client = self.sup.client
                    if client is None:
                        raise BackendError(ErrorCode.BUSY, f"local backend {self.sup.state.value}")
                    return self._send(client, record), None
            except ClientTimeout:
                # The backend may or may not have queued it: never send it twice. The job
                # goes back on the queue, counted as a lost run.
                self._give_back(record.id, lease, "no answer from its worker's backend")
            except BackendError as exc:
                if exc.code is ErrorCode.BUSY and time.monotonic() < deadline:
                    time.sleep(0.1)  # the local backend is (re)starting
                    continue
                return None, exc

    def _send(self, client, record: JobRecord) -> str:
        store = self.shared
        if record.kind == "reexport":
            parent = store.get(record.parent or "")
            if parent.extra.get("worker") != self.config.name or not parent.extra.get("local_job"):
                raise BackendError(
                    ErrorCode.NOT_FOUND,
                    f"job {parent.id}'s cache is not on worker {self.config.name}",
                )
            return client.reexport(parent.extra["local_job"], record.extra.get("changes") or {})
        image_path = store.input_path(record.id)
        if image_path is None:
            raise BackendError(ErrorCode.NOT_FOUND, f"job {record.id} has no input image")
        image = image_path.read_bytes()
        if record.kind == "texture":
            mesh_path = store.input_path(record.id, MESH_STEM)
            if mesh_path is None:
                raise BackendError(ErrorCode.NOT_FOUND, f"job {record.id} has no input mesh")
            return client.texture(
                image,
                mesh_path.read_bytes(),
                mesh_path.suffix.lstrip("."),
                record.params,
                record.filename or "image.png",
            )
        return client.generate(image, record.params, record.filename or "image.png")

    def _follow(self, job_id: str, local_id: str, lease: Lease) -> JobRecord:
        """Relay the local job's events until it ends; pass a cancel on; renew the lease."""
        next_check = 0.0
        cancel_sent = False
        while True:
            with self.lock:
                messages = self.sup.tick()
                dead = self.sup.state is SupervisorState.DEAD
            for message in messages:
                if message.content.get("job_id") != local_id:
                    continue
                if isinstance(message, protocol.Message) and message.msg_type in RELAYED:
                    self._publish(message.msg_type, {**message.content, "job_id": job_id})
                elif message.msg_type in LOCAL_ENDS:
                    next_check = 0.0  # look at the record now, not at the next round
            now = time.monotonic()
            if now >= next_check:
                next_check = now + LOCAL_CHECK
                local = self.local.get(local_id)
                if local.terminal:
                    return local
                if dead:
                    self._stop_worker(f"the local backend is dead: {self.sup.state_reason}")
                    self._give_back(job_id, lease, "its worker's backend stopped for good")
                if not cancel_sent and self.coord.cancel_requested(job_id):
                    cancel_sent = self._cancel_local(local_id)
                self._check(job_id, lease, local_id)
            time.sleep(0.02)

    def _cancel_local(self, local_id: str) -> bool:
        try:
            with self.lock:
                self.sup.cancel(local_id)
            return True
        except BackendError as exc:  # restarting: try again on the next round
            log.info("cancel of local job %s deferred: %s", local_id, exc.message)
            return False

    def _check(self, job_id: str, lease: Lease, local_id: str | None = None) -> None:
        """Renew the lease (or find it lost) and notice a stopping worker."""
        from celery.worker import state as worker_state

        try:
            lease.renew_if_due()
        except LockError as exc:  # not ours any more: another worker took the job over
            log.warning("job %s: lease lost (%s)", job_id, exc)
            if local_id is not None:
                self._cancel_local(local_id)
            raise _LeaseLost() from None
        # Celery's warm/cold shutdown flags hold an exit code (0 for a SIGTERM): set means
        # "not None and not False", as in celery.worker.state.maybe_shutdown.
        if any(
            flag is not None and flag is not False
            for flag in (worker_state.should_stop, worker_state.should_terminate)
        ):
            if local_id is not None:
                self._cancel_local(local_id)
            self._give_back(job_id, lease, "its worker is stopping", counted=False)

    def _give_back(self, job_id: str, lease: Lease, why: str, counted: bool = True) -> None:
        """Requeue the shared record and raise _HandBack (Celery requeues the message)."""
        with self.coord.state_lock(job_id):
            record = self.shared.get(job_id)
            if record.state.value == "running" and lease.owned():
                recoveries = record.recoveries + (1 if counted else 0)
                self.shared.transition(job_id, "requeue", recoveries=recoveries)
                self.coord.add_pending(job_id)
                self.shared.append_log(job_id, f"handed back: {why}")
        raise _HandBack(why)

    def _finish(
        self,
        job_id: str,
        lease: Lease,
        local: JobRecord | None,
        refused: BackendError | None = None,
    ) -> str:
        """Copy the result into the shared folder and write the one outcome."""
        if local is not None and local.state.value == "done":
            self._copy_results(job_id, local.id)
        if local is not None:
            excerpt = self.local.log_excerpt(local.id).strip()
            if excerpt:
                self.shared.append_log(job_id, f"--- worker {self.config.name} ---\n{excerpt}")
        with self.coord.state_lock(job_id):
            if not lease.owned():
                raise _LeaseLost()
            if local is None:
                error = refused or BackendError(ErrorCode.INTERNAL, "the job was not run")
                record = self.shared.transition(job_id, "fail", error=error.to_dict())
            else:
                record = self._settle(job_id, local)
        kind, content = outcome_event(record)
        self._publish(kind, content)
        return record.state.value

    def _settle(self, job_id: str, local: JobRecord) -> JobRecord:
        state = local.state.value
        fields: dict[str, Any] = {
            "attempts": local.attempts,
            "level": local.level,
            "final_params": local.final_params,
        }
        if state == "done":
            result = dict(local.result or {})
            result["glb_path"] = str(self.shared.path(job_id, RESULT))
            return self.shared.transition(job_id, "finish", result=result, **fields)
        if state == "failed":
            return self.shared.transition(job_id, "fail", error=local.error, **fields)
        return self.shared.transition(job_id, "cancel", **fields)

    def _copy_results(self, job_id: str, local_id: str) -> None:
        for name in (RESULT, STATS):
            source = self.local.path(local_id, name)
            if not source.is_file():
                continue
            target = self.shared.path(job_id, name)
            temp = target.with_name(f".{name}.{self.config.name}.tmp")
            shutil.copyfile(source, temp)  # then one rename: readers never see half a GLB
            os.replace(temp, target)

    def _publish(self, kind: str, content: dict[str, Any]) -> None:
        try:
            self.coord.publish_event(kind, content)
        except Exception as exc:  # events may drop; the job store is the truth
            log.warning("event %s not published: %s", kind, exc)

    def _stop_worker(self, why: str) -> None:
        log.error("stopping this worker: %s", why)
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown, after this task


def register_task(app, runtime: WorkerRuntime):
    """The one task, bound to this process's runtime."""

    @app.task(name=TASK_NAME, bind=True, acks_late=True, max_retries=None)
    def run_job(task, job_id: str) -> str:
        return runtime.run(task, job_id)

    return run_job


def main(args: Any) -> int:
    """`python -m backend worker`: one Celery worker for one GPU."""
    timing = Timing(
        **{
            name: getattr(args, name)
            for name in Timing.__dataclass_fields__
            if getattr(args, name, None) is not None
        }
    )
    timing.check()
    name = args.name or f"gpu{args.gpu if args.gpu is not None else 0}-{socket.gethostname()}"
    policy = RespawnPolicy()
    if getattr(args, "heartbeat_timeout", None):
        policy.heartbeat_timeout = args.heartbeat_timeout
    options: dict[str, str] = {}
    for pair in args.engine_opt or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-opt expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = value
    config = WorkerConfig(
        name=name,
        broker=args.broker,
        store=Path(args.store),
        work_dir=Path(args.work_dir),
        vram_gb=args.vram_gb,
        gpu=args.gpu,
        engine=args.engine,
        engine_options=options,
        python=args.python or sys.executable,
        min_free_disk_mb=args.min_free_disk_mb,
        timing=timing,
        policy=policy,
    )
    runtime = WorkerRuntime(config)
    runtime.start()
    log.info("worker %s: card %s GB, queues %s", name, config.vram_gb, ", ".join(config.queues))
    app = make_celery(args.broker, timing)
    register_task(app, runtime)
    argv = [
        "worker",
        "--pool=solo",  # the job runs in the backend process; the pool adds nothing
        "--concurrency=1",
        f"--queues={','.join(config.queues)}",
        f"--hostname={name}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        f"--loglevel={'DEBUG' if getattr(args, 'verbose', False) else 'INFO'}",
    ]
    try:
        app.worker_main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        runtime.stop()
    return 0
