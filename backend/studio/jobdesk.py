"""What the studio gateway answers about jobs: its request table, and one handler per job
request over the shared job store and Redis (validate, admit, write, queue; cancel; history;
result chunks). No sockets: `gateway.py` routes authenticated messages here and sends the
replies. A handler returns the reply's content and may add binary buffers to `buffers`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..checks import images, meshes
from ..errors import BackendError, ErrorCode
from ..params import parse_params, reexport_params
from ..pipeline.runner import check_disk
from ..server.handlers import clean_filename
from ..store.fetch import fetch
from ..store.jobs import JobRecord, JobStore
from ..store.listing import list_jobs, summary
from ..wire import protocol
from .coord import Coordinator
from .dispatch import TASK_NAME, can_serve, need_tier, queue_name, worker_queue

log = logging.getLogger(__name__)

MAX_VRAM_GB = 1024

_LOCAL = protocol.REQUESTS
# What an artist may ask the gateway: the local requests that make sense remotely, a card
# size for generate/texture, and `fetch` for result files (docs/protocol.md, "Gateway").
REQUESTS: dict[str, dict[str, Any]] = {
    "hello": _LOCAL["hello"],
    "ping": _LOCAL["ping"],
    "status": _LOCAL["status"],
    "generate": {
        "fields": {**_LOCAL["generate"]["fields"], "min_vram_gb": (int, False)},
        "buffers": _LOCAL["generate"]["buffers"],
    },
    "texture": {
        "fields": {**_LOCAL["texture"]["fields"], "min_vram_gb": (int, False)},
        "buffers": _LOCAL["texture"]["buffers"],
    },
    "reexport": _LOCAL["reexport"],
    "cancel": _LOCAL["cancel"],
    "jobs": _LOCAL["jobs"],
    "job": _LOCAL["job"],
    "stats": _LOCAL["stats"],
    "fetch": _LOCAL["fetch"],
}


class JobDesk:
    """The job requests of one gateway. `workers` is the live-worker list the gateway's Redis
    thread refreshes; `publish(msg_type, content, parent)` sends an event to every artist."""

    def __init__(
        self,
        store: JobStore,
        coord: Coordinator,
        celery: Any,
        publish: Callable[[str, dict[str, Any], dict | None], None],
        queue_depth: int,
        min_free_disk: int,
        image_limits: images.ImageLimits,
    ):
        self.store = store
        self.coord = coord
        self.celery = celery
        self.publish = publish
        self.queue_depth = queue_depth
        self.min_free_disk = min_free_disk
        self.image_limits = image_limits
        self.workers: list[dict[str, Any]] = []

    # -- views (the gateway reads these too) ---------------------------------------------

    def state(self) -> tuple[str, str]:
        if not self.workers:
            return "starting", "no GPU worker is running"
        return "ready", f"{len(self.workers)} GPU worker(s)"

    def engine(self) -> dict[str, Any]:
        for worker in self.workers:
            if worker.get("engine"):
                return dict(worker["engine"])
        return {"name": "remote", "label": "Studio server (no worker yet)", "capabilities": []}

    def running(self) -> list[str]:
        return [w["job"] for w in self.workers if w.get("job")]

    def pending_ids(self) -> list[str]:
        try:
            return self.coord.pending()
        except Exception:  # Redis away: status still answers
            return []

    # -- job requests ----------------------------------------------------------------------

    def on_generate(self, message, user, buffers) -> dict:
        params = parse_params(message.content.get("params")).to_dict()
        queue = self._admit(message.content.get("min_vram_gb", 0))
        image_bytes = message.buffers[0]
        image = images.load_image(image_bytes, self.image_limits)
        return self._submit(
            "generate",
            params,
            message,
            user,
            queue,
            image=image_bytes,
            image_ext=images.image_ext(image_bytes),
            thumbnail=images.thumbnail(image),
        )

    def on_texture(self, message, user, buffers) -> dict:
        params = parse_params(message.content.get("params")).to_dict()
        image_bytes, mesh = message.buffers
        fmt = meshes.checked_upload(message.content["mesh_format"], mesh)
        queue = self._admit(message.content.get("min_vram_gb", 0))
        image = images.load_image(image_bytes, self.image_limits)
        return self._submit(
            "texture",
            params,
            message,
            user,
            queue,
            image=image_bytes,
            image_ext=images.image_ext(image_bytes),
            thumbnail=images.thumbnail(image),
            mesh=mesh,
            mesh_ext=fmt,
        )

    def on_reexport(self, message, user, buffers) -> dict:
        parent = self.store.get(message.content["job_id"])
        if parent.state.value != "done" or parent.kind == "texture":
            raise BackendError(ErrorCode.BAD_PARAMS, f"job {parent.id} has no result to re-export")
        changes = message.content.get("params") or {}
        params = reexport_params(parent.params, parent.final_params, changes).to_dict()
        # The engine's cache (latents) stays on the worker that made the job.
        worker = parent.extra.get("worker")
        if not any(w.get("name") == worker for w in self.workers):
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"the worker that made job {parent.id} ({worker}) is not running",
                "Re-export needs that worker's cache: ask the admin to start it, or generate "
                "the model again.",
            )
        self._admit(0)
        thumb = self.store.path(parent.id, "thumbnail.png")
        return self._submit(
            "reexport",
            params,
            message,
            user,
            worker_queue(worker),
            thumbnail=thumb.read_bytes() if thumb.exists() else None,
            parent=parent.id,
            filename=parent.filename,
            extra={"changes": changes},
        )

    def _admit(self, min_vram_gb: int) -> str:
        """Refuse a job before any work is spent on it; returns its queue."""
        if not 0 <= min_vram_gb <= MAX_VRAM_GB:
            raise BackendError(ErrorCode.BAD_PARAMS, f"min_vram_gb must be 0..{MAX_VRAM_GB}")
        tier = need_tier(min_vram_gb)
        workers = self.workers
        if tier is None or not any(can_serve(w.get("vram_gb", 0), min_vram_gb) for w in workers):
            if not workers:
                raise BackendError(
                    ErrorCode.ENGINE_UNAVAILABLE,
                    "no GPU worker is running on the studio server",
                    "Ask the studio admin to start the workers (python -m backend worker).",
                )
            largest = max(w.get("vram_gb", 0) for w in workers)
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"this job needs a card with at least {min_vram_gb} GB; the largest card among "
                f"the {len(workers)} running worker(s) has {largest:g} GB",
                "Ask for a smaller card (lower quality settings fit: the ladder degrades "
                "instead of failing), or ask the admin for a worker with a larger card.",
            )
        if self.coord.pending_count() >= self.queue_depth:
            raise BackendError(
                ErrorCode.BUSY, f"the queue is full ({self.queue_depth} jobs waiting)"
            )
        check_disk(self.store.root, self.min_free_disk)
        return queue_name(tier)

    def _submit(
        self,
        kind: str,
        params: dict,
        message: protocol.Message,
        user: str,
        queue: str,
        *,
        image: bytes | None = None,
        image_ext: str = "png",
        thumbnail: bytes | None = None,
        mesh: bytes | None = None,
        mesh_ext: str = "glb",
        parent: str | None = None,
        filename: str | None = None,
        extra: dict | None = None,
    ) -> dict:
        name = clean_filename(message.content.get("filename") if filename is None else filename)
        record = self.store.create(
            kind,
            self.engine().get("name", "remote"),
            params,
            image=image,
            image_ext=image_ext,
            filename=name,
            thumbnail=thumbnail,
            mesh=mesh,
            mesh_ext=mesh_ext,
            parent=parent,
        )
        info = {
            "user": user,
            "min_vram_gb": message.content.get("min_vram_gb", 0),
            "queue": queue,
            **(extra or {}),
        }
        self.store.update(record.id, extra=info)
        self._enqueue(record.id, queue)
        position = self.coord.pending_count()
        self.publish(
            "job_queued",
            {"job_id": record.id, "kind": kind, "position": position, "filename": name},
            message.header,
        )
        return protocol.ok_reply(job_id=record.id, position=position, state="queued")

    def _enqueue(self, job_id: str, queue: str) -> None:
        """Queue a job just written; if Redis cannot take it, the job fails at once (the
        artist is told now rather than never)."""
        try:
            self._send(job_id, queue)
        except Exception as exc:
            error = BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"the job queue (Redis) cannot be reached: {exc}",
                "Ask the studio admin to check the Redis server.",
            )
            try:
                self.coord.remove_pending(job_id)
            except Exception:
                pass
            self.store.transition(job_id, "fail", error=error.to_dict())
            raise error from None

    def _send(self, job_id: str, queue: str) -> None:
        self.coord.add_pending(job_id)
        self.celery.send_task(TASK_NAME, args=[job_id], queue=queue, task_id=job_id)

    def reconcile(self) -> None:
        """A gateway that died between writing a job and queueing it: queue it now. (A job
        queued twice runs once: the worker checks its record and lease.)"""
        try:
            pending = set(self.coord.pending())
            for record in self.store.unfinished():
                if record.state.value == "queued" and record.id not in pending:
                    queue = record.extra.get("queue") or queue_name(need_tier(0))
                    log.info("queueing job %s, which was never queued", record.id)
                    self._send(record.id, queue)
        except Exception as exc:  # Redis away at start: the jobs wait for the next start
            log.warning("cannot reconcile the queue: %s", exc)

    def on_cancel(self, message, user, buffers) -> dict:
        job_id = message.content["job_id"]
        record = self.store.get(job_id)
        if record.terminal:
            return protocol.ok_reply(job_id=job_id, state=record.state.value)
        owner = record.extra.get("user")
        if owner and owner != user:
            raise BackendError(
                ErrorCode.BAD_PARAMS,
                f"job {job_id} belongs to {owner}; only they can cancel it",
            )
        self.coord.request_cancel(job_id)  # a worker running it (or about to) sees this
        with self.coord.state_lock(job_id):
            record = self.store.get(job_id)
            if record.state.value == "queued":
                self.store.transition(job_id, "cancel")
                self.store.append_log(job_id, f"cancelled by {user} while queued")
                self.coord.remove_pending(job_id)
                self.publish("job_cancelled", {"job_id": job_id})
                return protocol.ok_reply(job_id=job_id, state="cancelled")
        state = "cancelling" if record.state.value == "running" else record.state.value
        return protocol.ok_reply(job_id=job_id, state=state)

    def on_jobs(self, message, user, buffers) -> dict:
        """A page of the shared history, paged as a local backend's (docs/protocol.md)."""
        return list_jobs(self.store, message.content, _remote_summary)

    def on_job(self, message, user, buffers) -> dict:
        record = self.store.get(message.content["job_id"])
        folder = self.store.folder(record.id)
        files = {}
        for path in folder.iterdir():
            if path.name.startswith("."):
                continue
            try:
                if path.is_file() and not path.is_symlink():
                    files[path.name] = path.stat().st_size
            except FileNotFoundError:
                pass
        return protocol.ok_reply(
            job=record.to_wire(),
            folder=str(folder),
            files=files,
            log=self.store.log_excerpt(record.id) if message.content.get("log") else None,
        )

    def on_fetch(self, message, user, buffers) -> dict:
        reply, chunk = fetch(self.store, message.content)
        buffers.append(chunk)
        return reply


def _remote_summary(record: JobRecord) -> dict[str, Any]:
    return {
        **summary(record),
        "user": record.extra.get("user"),
        "worker": record.extra.get("worker"),
    }
