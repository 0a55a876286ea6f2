"""Jobs that belong together, as plain data (no bpy): the seeds of one Variations action and the
images of one Batch. A group feeds its jobs to the controller a few at a time (the backend's
queue stays open for other work), knows where each result goes (a row, a grid) and what its
batch log says. Pure functions, except `write_log` (the log file is the edge)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .views import TERMINAL

VARIATIONS_COLLECTION = "Variations"
IN_FLIGHT = 2  # a group's jobs on the backend at once: one running, one ready behind it
SPACING = 1.25  # results are about one unit (TRELLIS.2's unit cube): a quarter apart
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tga", ".tif", ".tiff")
LOG_PREFIX = "trellis2-batch-"


@dataclass
class GroupItem:
    """One seed or one image of a group, and what became of it."""

    index: int
    label: str  # "seed 42" or the image's file name
    seed: int | None = None
    path: str = ""  # a batch's image file
    key: str = ""  # the controller's job key, once submitted
    job_id: str = ""
    state: str = "pending"  # pending (not sent yet), then the job's state
    error: str = ""
    glb_path: str = ""
    object: str = ""  # the imported object's name

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL


@dataclass
class Group:
    key: str
    kind: str  # "variations" | "batch"
    name: str  # the image's or the folder's name
    collection: str
    items: list[GroupItem]
    params: dict[str, Any]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the 3D cursor at the action
    spacing: float = SPACING
    image: bytes = b""  # variations: the one image every seed uses
    filename: str = "image.png"
    auto_import: bool = True  # a batch may only write files (Import When Done off)
    folder: str = ""  # a batch's folder
    ignored: list[str] = field(default_factory=list)  # a batch folder's files that are no images
    started: float = 0.0  # wall-clock seconds (for the log)
    finished: float | None = None
    cancelled: bool = False
    log_path: str = ""
    log_error: str = ""

    @property
    def columns(self) -> int:
        """Variations side by side in one row; a batch in a square-ish grid."""
        if self.kind == "variations":
            return max(1, len(self.items))
        return max(1, math.ceil(math.sqrt(len(self.items))))

    def location(self, index: int) -> tuple[float, float, float]:
        """Where item `index` goes: rows along X, centred on the origin, later rows towards -Y."""
        cols = self.columns
        rows = max(1, math.ceil(len(self.items) / cols))
        col, row = index % cols, index // cols
        x = (col - (cols - 1) / 2) * self.spacing
        y = ((rows - 1) / 2 - row) * self.spacing
        ox, oy, oz = self.origin
        return (ox + x, oy + y, oz)

    def pending(self) -> list[GroupItem]:
        return [i for i in self.items if i.state == "pending"]

    def counts(self) -> dict[str, int]:
        out = {"total": len(self.items), "done": 0, "failed": 0, "cancelled": 0, "active": 0}
        for item in self.items:
            if item.state in ("done", "failed", "cancelled"):
                out[item.state] += 1
            elif item.state != "pending":
                out["active"] += 1
        return out

    @property
    def ended(self) -> bool:
        return all(i.ended for i in self.items)

    def item_for(self, key: str) -> GroupItem | None:
        return next((i for i in self.items if i.key == key), None)


def new_key(kind: str) -> str:
    """Unique across sessions: objects in a saved file carry it (Keep finds its row by it)."""
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def variations(
    name: str,
    image: bytes,
    filename: str,
    seeds: list[int],
    params: dict[str, Any],
    origin: tuple[float, float, float],
    spacing: float = SPACING,
) -> Group:
    items = [GroupItem(i, f"seed {s}", seed=s) for i, s in enumerate(seeds)]
    return Group(
        key=new_key("variations"),
        kind="variations",
        name=name,
        collection=VARIATIONS_COLLECTION,
        items=items,
        params=params,
        origin=origin,
        spacing=spacing,
        image=image,
        filename=filename,
        started=time.time(),
    )


def split_folder(names: list[str]) -> tuple[list[str], list[str]]:
    """(image files, other files) of a folder listing, sorted; hidden files and our own logs
    are neither."""
    images, others = [], []
    for name in sorted(names, key=str.lower):
        if name.startswith(".") or (name.startswith(LOG_PREFIX) and name.endswith(".json")):
            continue
        (images if Path(name).suffix.lower() in IMAGE_SUFFIXES else others).append(name)
    return images, others


def batch(
    folder: str,
    images: list[str],
    ignored: list[str],
    params: dict[str, Any],
    origin: tuple[float, float, float],
    spacing: float = SPACING,
) -> Group:
    name = Path(folder).name or folder
    items = [GroupItem(i, n, path=os.path.join(folder, n)) for i, n in enumerate(images)]
    return Group(
        key=new_key("batch"),
        kind="batch",
        name=name,
        collection=name,
        items=items,
        params=params,
        origin=origin,
        spacing=spacing,
        folder=folder,
        ignored=ignored,
        started=time.time(),
    )


def summary(group: Group, fraction: float = 0.0) -> tuple[str, float]:
    """The group's one progress line and its bar (0..1); `fraction` is the running job's."""
    c = group.counts()
    ended = c["done"] + c["failed"] + c["cancelled"]
    what = "Batch" if group.kind == "batch" else "Variations of"
    text = f"{what} {group.name}: {c['done']} of {c['total']} done"
    if c["failed"]:
        text += f", {c['failed']} failed"
    if c["cancelled"]:
        text += f", {c['cancelled']} cancelled"
    if group.cancelled and not group.ended:
        text += " (cancelling)"
    total = max(1, c["total"])
    return text, min(1.0, (ended + (fraction if c["active"] else 0.0)) / total)


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))


def batch_log(group: Group) -> dict[str, Any]:
    """The batch log: each image's job, state and error (JSON-ready)."""
    state = "running"
    if group.ended:
        state = "cancelled" if group.cancelled else "done"
    return {
        "folder": group.folder,
        "collection": group.collection,
        "state": state,
        "started": _iso(group.started),
        "finished": _iso(group.finished),
        "params": group.params,
        "counts": group.counts(),
        "images": [
            {
                "file": item.label,
                "job_id": item.job_id or None,
                "state": item.state,
                "error": item.error or None,
                "glb_path": item.glb_path or None,
                "object": item.object or None,
            }
            for item in group.items
        ],
        "ignored": group.ignored,
    }


def log_name(started: float) -> str:
    return f"{LOG_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}.json"


def write_log(group: Group) -> None:
    """Write the batch log atomically next to the images; a folder that cannot take it (read
    only) gets the log in the temporary folder instead, and the panel says where."""
    data = json.dumps(batch_log(group), indent=2).encode()
    candidates = [group.log_path] if group.log_path else []
    candidates += [os.path.join(group.folder, log_name(group.started))]
    candidates += [os.path.join(tempfile.gettempdir(), log_name(group.started))]
    for path in candidates:
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            group.log_error = f"{path}: {exc.strerror or exc}"
            try:
                os.unlink(tmp)
            except OSError:
                pass
            continue
        group.log_path = path
        return
