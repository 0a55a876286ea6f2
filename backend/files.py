"""Where files go by default, shared by the backend and the add-on (standard library only).
File operations inside our folders live in `safefs`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import settings


def default_output_dir() -> Path:
    """Where job folders live unless told otherwise: TRELLIS2_OUTPUT_DIR, else the platform's
    per-user data folder."""
    env = os.environ.get(settings.ENV_OUTPUT_DIR)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "trellis2-blender"
