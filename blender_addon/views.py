"""What the panel shows of a job, as plain data (no bpy, no I/O): a job as the add-on follows
it, and a finished job's record as the event it stands for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL = ("done", "failed", "cancelled")


@dataclass
class JobView:
    """One job as the panel shows it: requests, replies and events folded into a few fields.
    `key` is the add-on's own id (stable from Generate on); `job_id` is the backend's, once
    its reply or events named it."""

    key: str
    name: str
    kind: str = "generate"
    job_id: str = ""
    # waiting (for a backend), submitting (sent, no reply yet), queued, running, done, failed,
    # cancelled
    state: str = "waiting"
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
    cursor: tuple[float, float, float] | None = None  # where the 3D cursor was at Generate
    engine: str = ""  # the engine it runs on, as the panel names it
    parent: str = ""  # a re-export's source job
    group: str = ""  # the Variations or Batch group it belongs to (groups.Group.key)
    target: str = ""  # a texture job's object
    texture_result: str = ""  # APPLY (onto the object) or COPY (a textured copy beside it)
    uv_map: str = ""  # the UV map a texture job sent ("" when the mesh had none)
    modifiers_applied: bool = False  # a texture job sent the mesh with its modifiers applied
    object_name: str = ""  # what the import made
    on_backend: bool = False  # the backend has it (in its job store): never sent again
    cancel_requested: bool = False
    cancel_retry_at: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass
class Outgoing:
    """A generate or reexport waiting for a backend that answers."""

    key: str
    msg_type: str
    content: dict[str, Any]
    buffers: tuple[bytes, ...] = ()


def event_from_record(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The terminal event a finished job record stands for (a missed event, recovered)."""
    state = record.get("state")
    result = record.get("result") or {}
    if state == "done":
        return "job_done", {
            "job_id": record.get("id"),
            "glb_path": result.get("glb_path"),
            "mesh_stats": result.get("mesh_stats"),
            "oom_quality_degradation_level": record.get("level") or 0,
            "final_params": record.get("final_params"),
        }
    if state == "failed":
        return "job_failed", {"job_id": record.get("id"), **(record.get("error") or {})}
    return "job_cancelled", {"job_id": record.get("id")}
