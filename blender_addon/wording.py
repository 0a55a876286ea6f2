"""How the add-on words things for one label (no bpy, no I/O): a message on one line, a size in
bytes, an engine's name."""

from __future__ import annotations

from typing import Any

ENGINES = (
    ("preview", "Preview (no GPU)", "A quick CPU proxy with no weights: not TRELLIS.2"),
    ("trellis2", "TRELLIS.2", "The real model: needs an NVIDIA GPU and a TRELLIS.2 environment"),
)
# Engine settings the preview engine ignores (the panel says so).
PREVIEW_IGNORES = "seed, steps and guidance"


def engine_label(name: str) -> str:
    return next((label for key, label, _ in ENGINES if key == name), name)


def one_line(text: Any, limit: int = 200) -> str:
    """A message fit for one label: first line, no traceback, bounded."""
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):
        lines = [lines[-1]]  # the exception itself, e.g. "ModuleNotFoundError: No module ..."
    return (lines[0] if lines else "")[:limit]


def format_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
