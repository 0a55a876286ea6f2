"""The job history as the panel shows it: one page of the backend's `jobs` reply, the search,
the clean-up's dry run and what the last delete did. Plain data and the few rules that change
it (no bpy, no I/O): the controller sends the requests this module words and hands it the
replies. The backend's job store is the truth; nothing here reads a job folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backend.wire.client import Pending
from .wording import format_bytes, one_line

HISTORY_PAGE = 8  # jobs per history page


@dataclass
class HistoryView:
    """One page of the job history, as the backend's last `jobs` reply gave it."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    page: int = 0
    query: str = ""
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    loaded: bool = False  # a listing arrived at least once
    stale: bool = True  # ask again as soon as a backend answers
    request: Pending | None = None
    page_size: int = HISTORY_PAGE
    prune_days: int = 30
    prune: dict[str, Any] | None = None  # the dry run: {count, bytes} older than prune_days
    notice: str = ""  # what the last delete did

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))

    @property
    def settled(self) -> bool:
        """Nothing to ask and nothing asked: the page is what the backend said last."""
        return not self.stale and self.request is None

    # -- what the user asks for -------------------------------------------------------------

    def refresh(self) -> None:
        self.stale = True

    def new_backend(self) -> None:
        """Another backend answers: its store may hold other jobs, and other old ones."""
        self.stale, self.prune = True, None

    def turn_to(self, page: int) -> None:
        self.page = max(0, min(page, self.pages - 1))
        self.stale = True

    def search(self, query: str) -> None:
        query = query.strip()
        if query != self.query:
            self.query, self.page = query, 0
            self.stale = True

    def set_prune_days(self, days: int) -> None:
        if days != self.prune_days:
            self.prune_days, self.prune = max(0, int(days)), None
            self.stale = True

    def entry(self, job_id: str) -> dict[str, Any] | None:
        return next((e for e in self.entries if e["job_id"] == job_id), None)

    # -- requests and replies ---------------------------------------------------------------

    def listing(self) -> dict[str, Any]:
        """The `jobs` request for this page (it is asked now: no longer stale)."""
        self.stale = False
        content: dict[str, Any] = {"limit": self.page_size, "offset": self.page * self.page_size}
        if self.query:
            content["query"] = self.query
        return content

    def prune_preview(self) -> dict[str, Any] | None:
        """The dry-run `delete_jobs` that sizes the clean-up, when it is not known yet."""
        if self.prune is not None:
            return None
        return {"older_than_days": self.prune_days, "dry_run": True}

    def on_listing(self, pending: Pending) -> bool:
        """Fold the `jobs` reply in; True when `entries` is a new page."""
        self.request = None
        if not pending.ok:
            self.error = one_line(pending.error.message)
            return False
        reply = pending.reply
        self.total = int(reply.get("total") or 0)
        if not reply.get("jobs") and self.page > 0 and self.total:  # the page emptied (deletes)
            self.page = self.pages - 1
            self.stale = True
            return False
        self.entries = [history_entry(j) for j in reply.get("jobs") or []]
        self.warnings = [one_line(w) for w in reply.get("warnings") or []]
        self.error = ""
        self.loaded = True
        if reply.get("total") is None and not reply.get("offset"):  # a gateway: one page
            self.total = len(self.entries)
        return True

    def on_prune_preview(self, pending: Pending) -> None:
        self.prune = pending.reply if pending.ok else None

    def on_deleted(self, pending: Pending) -> None:
        self.prune = None
        if pending.ok:
            count, size = pending.reply.get("count", 0), pending.reply.get("bytes", 0)
            self.notice = f"Deleted {count} job(s), {format_bytes(size)} freed"
        else:
            self.notice = f"Delete failed: {one_line(pending.error.message)}"
        self.stale = True


def delete_request(job_id: str | None = None, older_than_days: int | None = None) -> dict:
    """The `delete_jobs` request: one job, or those that ended more than N days ago."""
    content: dict[str, Any] = {"job_id": job_id} if job_id else {}
    if older_than_days is not None:
        content = {"older_than_days": int(older_than_days)}
    return content


def history_entry(summary: dict[str, Any]) -> dict[str, Any]:
    """A `jobs` summary as the history shows it (plain data, no disk reads)."""
    entry = dict(summary)
    filename = summary.get("filename") or ""
    entry["name"] = Path(filename).stem if filename else summary.get("job_id", "?")
    started, finished = summary.get("started"), summary.get("finished")
    entry["seconds"] = finished - started if started and finished else None
    entry["mesh_stats"] = summary.get("mesh_stats") or {}
    entry["label"] = (
        f"{entry['name']} (re-export of {summary['parent']})"
        if summary.get("kind") == "reexport" and summary.get("parent")
        else entry["name"]
    )
    return entry


def job_entry(reply: dict[str, Any]) -> dict[str, Any]:
    """A `job` reply (one record, its folder and file names) as a history entry."""
    record, folder = reply["job"], str(reply["folder"])
    names = reply.get("files") or {}
    inputs = sorted(n for n in names if n.startswith("input."))
    result = record.get("result") or {}
    return history_entry(
        {
            "job_id": record["job_id"],
            "kind": record.get("kind"),
            "state": record.get("state"),
            "filename": record.get("filename"),
            "preset": (record.get("params") or {}).get("preset"),
            "glb_path": result.get("glb_path"),
            "parent": record.get("parent"),
            "folder": folder,
            "input": inputs[0] if inputs else None,  # a name: fetched, never opened
        }
    )
