"""Small file helpers shared by the backend and the add-on (standard library only)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Temp file in the same folder + fsync + rename: readers see the old file or the new one,
    never half of one. `mode` (e.g. 0o600) is applied before any byte is written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def default_output_dir() -> Path:
    """Where job folders live unless told otherwise: TRELLIS2_OUTPUT_DIR, else the platform's
    per-user data folder."""
    env = os.environ.get("TRELLIS2_OUTPUT_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "trellis2-blender"
