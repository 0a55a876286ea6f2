"""One owner per output folder: an OS lock (flock; msvcrt on Windows) held for a process's
life, with who holds it written inside so that a second process can name the owner.

Two lock files at the root of the output folder:
  owner.lock    the supervisor that owns the folder, or a backend (or CLI) run without one
  backend.lock  the one backend process that runs jobs from it (a warm standby takes it when
                it is activated)
The kernel drops a lock when its process dies, even by SIGKILL, so a crash never leaves a
folder locked. Standard library only: the supervisor uses this too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .. import settings
from ..errors import BackendError, ErrorCode
from ..safefs import Folder

OWNER_LOCK = "owner.lock"
BACKEND_LOCK = "backend.lock"
# `serve` exits with this when another process owns its output folder (sysexits EX_CANTCREAT).
LOCKED_EXIT_CODE = settings.EXIT_LOCKED
_INFO_BYTES = 4096
_WIN_LOCK_OFFSET = 1 << 20  # Windows locks a byte range: one far from the info we write


class OutputLocked(BackendError):
    """Another process owns the output folder; `owner` says who (pid, host, role, since,
    connection_file), so the add-on can offer to connect to it or to use another folder."""

    def __init__(self, folder: Path, owner: dict[str, Any]):
        who = describe(owner)
        hint = "Connect to the backend that runs there, or choose another output folder."
        if owner.get("connection_file"):
            hint += f" Its connection file is {owner['connection_file']}."
        super().__init__(
            ErrorCode.OUTPUT_LOCKED, f"the output folder {folder} is in use by {who}", hint
        )
        self.owner = owner

    def to_dict(self) -> dict:
        return {**super().to_dict(), "owner": self.owner}


def describe(owner: dict[str, Any]) -> str:
    if not owner.get("pid"):
        return "another process"
    where = f" on {owner['host']}" if owner.get("host") else ""
    since = f" since {owner['since']}" if owner.get("since") else ""
    return f"a {owner.get('role') or 'process'} (pid {owner['pid']}{where}{since})"


class OutputLock:
    """One lock file; `acquire` takes it without waiting or raises OutputLocked."""

    def __init__(
        self,
        folder: str | os.PathLike,
        name: str,
        role: str,
        connection_file: str | os.PathLike | None = None,
    ):
        self.folder = Path(os.fsdecode(folder))
        self.name = name
        self.role = role
        self.connection_file = str(connection_file) if connection_file else None
        self._file: Any = None  # a FileIO: closed (and so unlocked) even if never released

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        """Take the lock (a no-op while held). Raises OutputLocked, or OSError when the folder
        cannot hold a lock file (read-only, full, deleted parent)."""
        if self.current():
            return
        self.release()
        with Folder.root(self.folder, create=True) as root:
            fd = root.open_rw(self.name)
        f = os.fdopen(fd, "r+b", buffering=0)
        try:
            if not _try_lock(f.fileno()):
                os.lseek(f.fileno(), 0, os.SEEK_SET)
                raise OutputLocked(self.folder, _parse(os.read(f.fileno(), _INFO_BYTES)))
        except BaseException:
            f.close()
            raise
        self._file = f
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "role": self.role,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "output_dir": str(self.folder),
            "connection_file": self.connection_file,
        }
        try:  # who holds it, for the error a second process shows; the lock is what counts
            os.ftruncate(f.fileno(), 0)
            os.lseek(f.fileno(), 0, os.SEEK_SET)
            os.write(f.fileno(), json.dumps(info).encode("utf-8"))
        except OSError:
            pass

    def current(self) -> bool:
        """Held, and the lock file in the folder is still the one held (a deleted and remade
        output folder has a new, unlocked one)."""
        if self._file is None:
            return False
        try:
            mine = os.fstat(self._file.fileno())
            with Folder.root(self.folder, create=False) as root:
                there = root.lstat(self.name)
        except OSError:
            return False
        return there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)

    def recorded_owner(self) -> dict[str, Any]:
        """Who last took the lock, as written in the file ({} if unknown); for messages."""
        try:
            with Folder.root(self.folder, create=False) as root:
                return _parse(root.read(self.name, _INFO_BYTES))
        except OSError:
            return {}

    def release(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()  # closing the file drops the lock

    def __del__(self) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _parse(data: bytes) -> dict[str, Any]:
    try:
        owner = json.loads(data.decode("utf-8"))
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}
