"""A job as the panel shows it, and the table that changes it: events and replies in, view
state out (no bpy, no I/O).

The controller turns what happens to a job (the user's Generate and Cancel, the backend's replies
and events, the supervisor's notices, the result's download) into the events below and calls
`step()`; the step changes the view and names the actions the controller must take (send a
`cancel`, fetch the result, import it). Rules, as in h11's state machine:

1. Every change of a JobView's state is a row of TRANSITIONS: (state, event) -> (next state, what
   the event writes on the view, actions). A pair with no row leaves the view as it was: a late
   or unknown event changes nothing.
2. Terminal states are sticky, as in the job store: their only row is an import's failure, which
   adds a message to a done job and leaves it done.
3. The few flags that choose between two rows (the user cancelled meanwhile, the job was never
   sent, its result is to be imported) are read in one place, `_refine()`, before the lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .wording import format_bytes, one_line

# -- states -----------------------------------------------------------------------------------

WAITING = "waiting"  # for a backend that answers: not sent yet, or its backend went away
SUBMITTING = "submitting"  # sent, no reply yet
QUEUED = "queued"
RUNNING = "running"
DOWNLOADING = "downloading"  # done on the backend; its result comes here to be imported
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL = (DONE, FAILED, CANCELLED)
STATES = (WAITING, SUBMITTING, QUEUED, RUNNING, DOWNLOADING, *TERMINAL)

# -- events -----------------------------------------------------------------------------------

# The add-on's own
SENT = "sent"  # the generate/reexport/texture request went out
ACCEPTED = "accepted"  # its reply: the backend has the job (content: the reply)
REFUSED = "refused"  # its reply is an error, or none came (message, hint)
CANCEL = "cancel"  # the user pressed Cancel
PARKED = "parked"  # the backend that has it went (Stop, Restart, another backend) (label)
NOT_SENT = "not_sent"  # the supervisor gave up before it was sent (message, hint)
RETRIED = "retried"  # supervisor_job_retried: its backend died; the next one settles it
RECORD_QUEUED = "record_queued"  # a `job` check found it queued
RECORD_RUNNING = "record_running"  # ... running
RECORD_GONE = "record_gone"  # ... not_found (message)
CANCEL_GONE = "cancel_gone"  # the `cancel` reply: not_found (message)
FILE_PROGRESS = "file_progress"  # the result's download moved (fraction, size)
FILE_ARRIVED = "file_arrived"  # the result is here (path)
FILE_FAILED = "file_failed"  # it could not be brought here (message)
IMPORT_FAILED = "import_failed"  # importing it raised (message)
# The backend's events (docs/protocol.md), by their msg_type
JOB_QUEUED = "job_queued"
JOB_STARTED = "job_started"
JOB_PROGRESS = "job_progress"
JOB_RETRY = "job_retry"
JOB_DONE = "job_done"
JOB_FAILED = "job_failed"
JOB_CANCELLED = "job_cancelled"  # also a `cancel` reply that says "cancelled"
EVENTS = (SENT, ACCEPTED, REFUSED, CANCEL, PARKED, NOT_SENT, RETRIED, RECORD_QUEUED)
EVENTS += (RECORD_RUNNING, RECORD_GONE, CANCEL_GONE, FILE_PROGRESS, FILE_ARRIVED, FILE_FAILED)
EVENTS += (IMPORT_FAILED, JOB_QUEUED, JOB_STARTED, JOB_PROGRESS, JOB_RETRY, JOB_DONE, JOB_FAILED)
EVENTS += (JOB_CANCELLED,)
# What _refine() makes of an event when a flag says so
REFUSED_CANCELLED = "refused_cancelled"  # REFUSED of a job the user cancelled meanwhile
CANCEL_UNSENT = "cancel_unsent"  # CANCEL of a job never sent
JOB_DONE_IMPORT = "job_done_import"  # JOB_DONE of a job whose result is imported here

# -- actions: what the controller does after a step --------------------------------------------

ENDED = "ended"  # the job has just ended: it is the last outcome, the history is stale
SEND_CANCEL = "send_cancel"  # ask the backend to cancel it (only named for a cancelled job)
UNQUEUE = "unqueue"  # never send it
DOWNLOAD = "download"  # fetch its result.glb
STOP_DOWNLOAD = "stop_download"  # forget the result's download (nothing is imported)
IMPORT = "import"  # the result is here: import it


@dataclass
class JobView:
    """One job as the panel shows it: requests, replies and events folded into a few fields.
    `key` is the add-on's own id (stable from Generate on); `job_id` is the backend's, once
    its reply or events named it."""

    key: str
    name: str
    kind: str = "generate"
    job_id: str = ""
    state: str = "waiting"  # one of STATES; only step() and merge() change it
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


# -- what each event writes on the view -------------------------------------------------------
# A write returns (message, hint) when its row ends the job: _end() words them.

Write = Callable[[JobView, dict[str, Any]], "tuple[str, str | None] | None"]


def _sending(view: JobView, content: dict[str, Any]) -> None:
    view.label = "Sending to the backend"


def _accepted(view: JobView, content: dict[str, Any]) -> None:
    view.label, view.position = "", content.get("position")


def _cancelling(view: JobView, content: dict[str, Any]) -> None:
    view.cancel_requested, view.label = True, "Cancelling"


def _queued(view: JobView, content: dict[str, Any]) -> None:
    view.label, view.position = "", content.get("position")
    view.kind = content.get("kind") or view.kind


def _started(view: JobView, content: dict[str, Any]) -> None:
    view.label, view.position = "", None


def _progress(view: JobView, content: dict[str, Any]) -> None:
    view.stage = content.get("stage") or view.stage
    view.label = content.get("label") or view.stage
    view.fraction = float(content.get("fraction") or 0.0)
    view.level = int(content.get("level") or view.level or 0)


# job_retry reasons that run the job again as it was, on a new process (no quality step)
_RUN_AGAIN = frozenset({"gpu_poisoned", "job_process_died"})


def _retry(view: JobView, content: dict[str, Any]) -> None:
    reason = content.get("reason")
    if reason in _RUN_AGAIN:
        view.message = f"running again: {content.get('message') or reason}"
        return
    view.level = int(content.get("level") or view.level or 0)
    view.message = f"retrying at quality level {view.level} ({reason})"


def _result(view: JobView, content: dict[str, Any]) -> None:
    view.result = content
    view.level = int(content.get("oom_quality_degradation_level") or 0)
    view.seed = (content.get("final_params") or {}).get("seed", view.seed)


def _download(view: JobView, content: dict[str, Any]) -> None:
    _result(view, content)
    view.label, view.fraction = "Downloading the result", 0.0


def _file_progress(view: JobView, content: dict[str, Any]) -> None:
    view.fraction = content.get("fraction", view.fraction)
    view.label = f"Downloading the result ({format_bytes(content.get('size'))})"


def _file_arrived(view: JobView, content: dict[str, Any]) -> None:
    view.glb_path = content.get("path")


def _import_failed(view: JobView, content: dict[str, Any]) -> None:
    view.message = f"import failed: {one_line(content.get('message'))}"


def _label(text: str) -> Write:
    def write(view: JobView, content: dict[str, Any]) -> None:
        view.label = text

    return write


def _parked(view: JobView, content: dict[str, Any]) -> None:
    view.label, view.stage = content.get("label") or "", ""
    view.fraction, view.position = 0.0, None


def _ends(message: str = "", hint: str = "") -> Write:
    """An ending whose words are fixed."""
    return lambda view, content: (message, hint)


def _done(view: JobView, content: dict[str, Any]) -> tuple[str, None]:
    _result(view, content)
    return "", None


def _failed(view: JobView, content: dict[str, Any]) -> tuple[str, str | None]:
    return content.get("message") or "failed", content.get("hint")


def _not_sent(view: JobView, content: dict[str, Any]) -> tuple[str, str | None]:
    return f"not sent: {content.get('message')}", content.get("hint")


def _record_gone(view: JobView, content: dict[str, Any]) -> tuple[str, str]:
    return (
        f"the job's record is gone: {content.get('message')}",
        "Its folder was removed, or the output folder changed or became unusable.",
    )


def _cancel_gone(view: JobView, content: dict[str, Any]) -> tuple[str, str]:
    return content.get("message") or "not found", "Its job folder is gone."


def _file_failed(view: JobView, content: dict[str, Any]) -> tuple[str, None]:
    return f"download failed: {one_line(content.get('message'))}", None


def _file_done(view: JobView, content: dict[str, Any]) -> tuple[str, None]:
    _file_arrived(view, content)
    return "", None


# -- the table ---------------------------------------------------------------------------------

Row = tuple[str, "Write | None", tuple[str, ...]]
_RECANCEL = (SEND_CANCEL,)  # a backend took a job the user cancelled: cancel it there

# Replies that end an active job, whatever it was doing: a Generate reported failed (an error,
# no reply in time, a backend that died) is never run or imported here, even when its events
# came first; a job whose record or folder is gone has failed.
_GONE: dict[str, Row] = {
    REFUSED: (FAILED, _failed, ()),
    REFUSED_CANCELLED: (CANCELLED, _ends("cancelled before the backend took it"), ()),
    RECORD_GONE: (FAILED, _record_gone, ()),
    CANCEL_GONE: (FAILED, _cancel_gone, ()),
}

# Rows every state of a job that a backend may still run shares: what its events do, whatever
# the add-on thought the job was doing.
_ON_A_BACKEND: dict[str, Row] = {
    **_GONE,
    JOB_QUEUED: (QUEUED, _queued, _RECANCEL),
    JOB_STARTED: (RUNNING, _started, _RECANCEL),
    JOB_PROGRESS: (RUNNING, _progress, ()),
    JOB_DONE: (DONE, _done, ()),
    JOB_DONE_IMPORT: (DOWNLOADING, _download, (DOWNLOAD,)),
    JOB_FAILED: (FAILED, _failed, ()),
    JOB_CANCELLED: (CANCELLED, None, ()),
    RETRIED: (WAITING, _label("Its backend died: waiting for the next one"), ()),
}

TRANSITIONS: dict[str, dict[str, Row]] = {
    WAITING: {
        **_ON_A_BACKEND,
        JOB_RETRY: (WAITING, _retry, ()),
        SENT: (SUBMITTING, _sending, ()),
        ACCEPTED: (WAITING, None, _RECANCEL),  # its events came first, then a respawn
        CANCEL: (WAITING, _cancelling, (SEND_CANCEL,)),  # waiting on a backend's store
        CANCEL_UNSENT: (CANCELLED, _ends("cancelled before it was sent"), (UNQUEUE,)),
        NOT_SENT: (FAILED, _not_sent, ()),
        RECORD_QUEUED: (QUEUED, _label(""), ()),
        RECORD_RUNNING: (RUNNING, _label(""), ()),
        PARKED: (WAITING, _parked, ()),
    },
    SUBMITTING: {
        **_ON_A_BACKEND,  # events may come before the reply
        JOB_RETRY: (SUBMITTING, _retry, ()),
        ACCEPTED: (QUEUED, _accepted, _RECANCEL),
        CANCEL: (SUBMITTING, _cancelling, (SEND_CANCEL,)),  # sent once the reply names it
    },
    QUEUED: {
        **_ON_A_BACKEND,
        JOB_RETRY: (QUEUED, _retry, ()),
        ACCEPTED: (QUEUED, None, _RECANCEL),
        CANCEL: (QUEUED, _cancelling, (SEND_CANCEL,)),
        RECORD_RUNNING: (RUNNING, _label(""), ()),
        PARKED: (WAITING, _parked, ()),
    },
    RUNNING: {
        **_ON_A_BACKEND,
        JOB_RETRY: (RUNNING, _retry, ()),
        ACCEPTED: (RUNNING, None, _RECANCEL),
        CANCEL: (RUNNING, _cancelling, (SEND_CANCEL,)),
        PARKED: (WAITING, _parked, ()),
    },
    DOWNLOADING: {  # done on the backend: its events are late ones
        **_GONE,
        ACCEPTED: (DOWNLOADING, None, ()),  # its events came first
        CANCEL: (
            DONE,
            _ends("done; not imported (cancelled while it downloaded)"),
            (STOP_DOWNLOAD,),
        ),
        FILE_PROGRESS: (DOWNLOADING, _file_progress, ()),
        FILE_ARRIVED: (DONE, _file_done, (IMPORT,)),
        FILE_FAILED: (DONE, _file_failed, ()),
    },
    DONE: {
        IMPORT_FAILED: (DONE, _import_failed, ()),
    },
    FAILED: {},
    CANCELLED: {},
}


def _refine(view: JobView, event: str, importing: bool) -> str:
    """The event as the table knows it: the flags that choose between two rows."""
    if event == REFUSED and view.cancel_requested:
        return REFUSED_CANCELLED
    if event == CANCEL and view.state == WAITING and not view.on_backend:
        return CANCEL_UNSENT
    if event == JOB_DONE and importing and view.auto_import and not view.cancel_requested:
        return JOB_DONE_IMPORT
    return event


def step(
    view: JobView,
    event: str,
    content: dict[str, Any] | None = None,
    *,
    now: float,
    importing: bool = True,
) -> tuple[str, ...] | None:
    """Fold one event into the view; returns the actions the controller takes, in order, or
    None when the view's state has no row for the event (nothing changed). `importing`: this
    add-on imports results (an import hook is set)."""
    row = TRANSITIONS.get(view.state, {}).get(_refine(view, event, importing))
    if row is None:
        return None
    target, write, actions = row
    words = write(view, content or {}) if write is not None else None
    ending = target in TERMINAL and view.state not in TERMINAL
    view.state = target
    if not view.cancel_requested:
        actions = tuple(a for a in actions if a != SEND_CANCEL)
    if ending:
        _end(view, *(words or ("", None)), now=now)
        return (ENDED, *actions)
    return actions


def _end(view: JobView, message: str, hint: str | None, now: float) -> None:
    view.finished = now
    view.position = None
    if view.state == DONE:
        view.fraction, view.label = 1.0, "Done"
    else:
        view.label = view.state.capitalize()
    if message:
        view.message = one_line(message, 300)
    view.hint = one_line(hint or "", 300)


# Fields a view that events made first hands to the view its reply names (one job, two views).
MERGED = ("state", "stage", "label", "fraction", "level", "position")
MERGED += ("glb_path", "result", "message", "hint", "finished")


def merge(view: JobView, other: JobView) -> None:
    """`other` was made for this job by its events before the reply named `view`: view takes
    what they wrote."""
    for name in MERGED:
        setattr(view, name, getattr(other, name))


def record_event(record: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The event a `job` reply's record stands for: a finished job's final event (a missed
    event, recovered), or that it is queued or running; None for anything else."""
    state = record.get("state")
    if state in TERMINAL:
        return event_from_record(record)
    if state == QUEUED:
        return RECORD_QUEUED, {}
    if state == RUNNING:
        return RECORD_RUNNING, {}
    return None


def event_from_record(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The terminal event a finished job record stands for (a missed event, recovered). A
    record names its job `job_id`, as every request, reply and event does (docs/protocol.md;
    its `id` is for older clients only)."""
    state = record.get("state")
    result = record.get("result") or {}
    if state == "done":
        return "job_done", {
            "job_id": record.get("job_id"),
            "glb_path": result.get("glb_path"),
            "mesh_stats": result.get("mesh_stats"),
            "oom_quality_degradation_level": record.get("level") or 0,
            "final_params": record.get("final_params"),
        }
    if state == "failed":
        return "job_failed", {"job_id": record.get("job_id"), **(record.get("error") or {})}
    return "job_cancelled", {"job_id": record.get("job_id")}
