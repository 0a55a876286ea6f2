"""Folder paths as people type them into settings, and whether an output folder can hold jobs.
Standard library only: the add-on (Blender's Python) and `doctor` both use it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def expand(text: str, home: Path | None = None, blend_dir: Path | None = None) -> str:
    """An absolute path for a typed one ("" stays ""). `~` is the home folder; `//` is
    Blender's "next to the .blend file" (the home folder while the file is unsaved); any other
    relative path is taken from the home folder - never from the working directory, which for
    Blender is wherever it happened to be launched (so no folder named `~` is ever made)."""
    text = text.strip()
    if not text:
        return ""
    home = Path(home) if home is not None else Path.home()
    if text.startswith("//"):
        path = (Path(blend_dir) if blend_dir is not None else home) / text[2:]
    elif text == "~" or text.startswith(("~/", "~\\")):
        path = home / text[2:]
    else:
        path = Path(os.path.expanduser(text))  # ~user/...
        if not path.is_absolute():
            path = home / path
    return os.path.normpath(path)


def output_dir_problem(path: str | Path) -> str | None:
    """Why `path` cannot hold job folders, or None when it can. It tries for real - makes the
    missing folders and a probe file, then removes what it made - because permission bits do
    not tell (root, read-only mounts, /proc)."""
    path = Path(path)
    if not path.is_absolute():
        return f"{path} is not an absolute path"
    existing = path
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return f"{path} is inside a file ({existing}), not a folder"
    except OSError as exc:
        return f"cannot look at {path}: {exc.strerror or exc}"
    # Missing folders are tried inside a scratch folder of this check's own, made where they
    # would be made: same names, same file system, and nothing another check (or the backend
    # starting at the same time) could create or remove under it.
    missing = path.relative_to(existing).parts
    scratch: str | None = None
    try:
        if missing:
            scratch = tempfile.mkdtemp(prefix=".trellis2-write-test-", dir=existing)
            where = Path(scratch).joinpath(*missing)
            where.mkdir(parents=True)
        else:
            where = path
        fd, probe = tempfile.mkstemp(prefix=".trellis2-write-test-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write to {path}: {exc.strerror or exc}"
    finally:
        if scratch is not None:  # leave no trace: the backend creates the folder when it starts
            shutil.rmtree(scratch, ignore_errors=True)
    return None
