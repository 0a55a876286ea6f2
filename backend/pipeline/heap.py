"""The backend's own memory between jobs: what a long-lived process must do so that its RSS
stays flat over thousands of jobs.

Two things made it grow (measured in docs/RELIABILITY.md): libraries that leave reference
cycles holding large arrays behind every job (trimesh's cached meshes, a class built per
`jsonify` call), which only a full collection frees and CPython runs one rarely; and glibc
keeping freed heap pages instead of returning them to the OS.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable

_malloc_trim: Callable[[int], int] | None | bool = None
# Objects settle() froze, counted once there: gc.get_freeze_count() walks every one of them
# (60-77 ms on the control loop with TRELLIS.2 loaded, GPU run 12), and `status` shows it.
_frozen = 0


def settle() -> None:
    """After start-up (imports, engine load): move every object alive now out of the
    collector's sight, so the full collection after each job walks only what jobs created
    (well under a millisecond instead of 15-20 ms with the preview engine loaded, more with
    torch)."""
    global _frozen
    gc.collect()
    gc.freeze()
    _frozen = gc.get_freeze_count()


def release_after_job(collect: bool = True) -> None:
    """Free what the finished job left in reference cycles, then hand freed heap back to the
    OS. `collect=False` when the caller has just run a full collection itself."""
    if collect:
        gc.collect()
    trim()


def figures() -> dict[str, int | None]:
    """What `status` reports: resident memory (Linux only, else None) and how many start-up
    objects `settle()` froze (0 until the engine has loaded). Cheap: it walks nothing."""
    return {"rss_bytes": _rss_bytes(), "gc_frozen": _frozen}


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def trim() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim); a no-op elsewhere."""
    global _malloc_trim
    if not sys.platform.startswith("linux"):
        return
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # musl or another libc: nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
