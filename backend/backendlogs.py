"""A backend's log file (its name, the private fallback folder, its last lines) and the note a
supervisor hands the next backend about the one that went before it. Standard library only:
the supervisor (in Blender's Python) and the backend both use it.

The supervisor never writes a job folder. When its backend goes, it tells the next one what it
knows, `Predecessor(pid, why, log_path)`: in the environment of a backend it spawns
(`settings.ENV_PREDECESSOR`, JSON) or in the `activate` request of a warm standby. That backend
applies the one recovery rule (`store.jobs.after_backend_died`) to the jobs it finds `running`
and writes the cause and the last lines of the dead backend's log into their job logs (and into
a failed job's error, `log_tail`).

The note is untrusted input, checked before use, and dropped whole when anything is off: at
most NOTE_CHARS of JSON, a positive pid, a reason cut to one line of WHY_CHARS, and a log path
that names a backend log (`backend-<stamp>-<pid>.log`) in a folder where supervisors write them
(the output folder's `logs`, or the private fallback in the temp folder). Only then is the log
read, through `safefs` (no link followed, the user's own regular file), at most TAIL_BYTES from
its end.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import settings
from .safefs import Folder

LOG_PREFIX = "backend-"
# backend-<YYYYmmdd-HHMMSS-micro>-<pid>.log (-active/-standby until it is named after its pid)
LOG_NAME = re.compile(r"^backend-\d{8}-\d{6}-\d{6}-(?:\d{1,10}|active|standby)\.log\Z")
TAIL_LINES = 40
TAIL_BYTES = 16_384
NOTE_CHARS = 4096  # a longer note is not one a supervisor wrote
WHY_CHARS = 300


def fallback_log_dir() -> Path:
    """Where backend logs go when the logs folder cannot be used: private to this user."""
    user = str(os.geteuid()) if hasattr(os, "geteuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"trellis2-logs-{user}"


def log_tail(path: Path | None, lines: int = TAIL_LINES, max_bytes: int = TAIL_BYTES) -> str:
    """The last lines of a log file ("" if it cannot be read; never through a link)."""
    if path is None:
        return ""
    try:
        with Folder.at(path.parent) as folder:
            data = folder.read_tail(path.name, max_bytes)
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def _one_line(text: str) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:WHY_CHARS]


@dataclass(frozen=True)
class Predecessor:
    """What a supervisor knows of the backend that went before the next one."""

    pid: int
    why: str
    log_path: Path | None = None

    @classmethod
    def make(cls, pid: int, why: str, log_path: Path | None) -> Predecessor:
        return cls(pid, _one_line(why) or "the backend stopped", log_path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "why": self.why,
            "log_path": str(self.log_path) if self.log_path else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Predecessor | None:
        """The note from a dict (an `activate` request's `predecessor`); None unless sound."""
        if not isinstance(data, dict):
            return None
        pid, why, log_path = data.get("pid"), data.get("why"), data.get("log_path")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31:
            return None
        if not isinstance(why, str) or not isinstance(log_path, (str, type(None))):
            return None
        path = Path(log_path) if log_path and "\x00" not in log_path else None
        if path is not None and not (path.is_absolute() and LOG_NAME.match(path.name)):
            path = None  # not a backend log: the note stands without it
        return cls.make(pid, why, path)

    @classmethod
    def from_json(cls, text: str | None) -> Predecessor | None:
        if not text or len(text) > NOTE_CHARS:
            return None
        try:
            return cls.from_dict(json.loads(text))
        except ValueError:
            return None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Predecessor | None:
        return cls.from_json(environ.get(settings.ENV_PREDECESSOR))

    def tail(self, output_dir: Path) -> str:
        """The dead backend's last log lines, when its log lies where supervisors write them
        for this output folder ("" otherwise, or when it cannot be read)."""
        path = self.log_path
        if path is None or path.parent not in (Path(output_dir) / "logs", fallback_log_dir()):
            return ""
        return log_tail(path)

    @property
    def hint(self) -> str:
        where = f"the backend log {self.log_path}" if self.log_path else "the backend log"
        return f"See {where}; its last lines are in the job log."

    def job_note(self, tail: str) -> str:
        """What the job's log says of the death."""
        text = f"backend pid {self.pid} went away during this job: {self.why}"
        if self.log_path is not None:
            text += f"\n--- last lines of {self.log_path.name} ---\n{tail}\n---"
        return text
