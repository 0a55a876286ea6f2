"""GPU hygiene: allocator setup, VRAM figures, cleanup, error classification and a health probe.

Torch is never imported here. Every function looks torch up in `sys.modules`, so importing this
module (or calling it from a CPU-only backend) costs nothing and initialises no CUDA context.

The rule that keeps VRAM from leaking through errors: never keep an exception object (or its
traceback) past `cleanup()`. A traceback holds every frame of the failed stage, and the frames
hold the stage's tensors, so a stored exception pins GPU memory (seen on the H100/H200: 2 GiB
stayed allocated for as long as the exception was referenced). Keep the type and message as text.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
import threading
import time
import traceback
from types import ModuleType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

# Exit status of a backend whose CUDA context is broken. The supervisor respawns on it and
# retries the job once. 75 is EX_TEMPFAIL from sysexits.h: "try again later".
POISONED_EXIT_CODE = 75

# torch >= 2.9 reads PYTORCH_ALLOC_CONF first and falls back to the older name
_ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
_EXPANDABLE = "expandable_segments"


def loaded_torch() -> ModuleType | None:
    """The torch module if something already imported it, else None (never imports it)."""
    return sys.modules.get("torch")


def _with_expandable(value: str) -> tuple[str, bool]:
    """Add expandable_segments:True to an allocator setting string, keeping the user's other
    options. An explicit user choice for expandable_segments (either value) is respected."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    for part in parts:
        key, _, setting = part.partition(":")
        if key.strip() == _EXPANDABLE:
            return value, setting.strip().lower() == "true"
    return ",".join([*parts, f"{_EXPANDABLE}:True"]), True


def configure_allocator() -> bool:
    """Ask the CUDA caching allocator for expandable segments (less fragmentation, fewer
    false OOMs). Only effective before torch is imported; returns whether it is now on."""
    if loaded_torch() is not None:
        return False
    enabled = True
    for name in _ALLOC_VARS:
        current = os.environ.get(name)
        if current is None and name != "PYTORCH_CUDA_ALLOC_CONF":
            continue  # only touch the newer variable when the user set it (it takes precedence)
        new, on = _with_expandable(current or "")
        os.environ[name] = new
        enabled = enabled and on
    if not enabled:
        log.info("expandable_segments left off because the user's allocator setting says so")
    return enabled


def cuda_ready() -> bool:
    """Torch is loaded, CUDA is available and its context already exists in this process."""
    torch = loaded_torch()
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_initialized())
    except Exception:
        return False


def _cuda(init: bool) -> ModuleType | None:
    torch = loaded_torch()
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        if not init and not torch.cuda.is_initialized():
            return None
    except Exception:
        return None
    return torch


# -- memory cap (emulating a smaller card) ------------------------------------------------

_cap_bytes: int | None = None


def set_memory_cap(cap_bytes: int | None) -> float:
    """Limit this process to `cap_bytes` of the current GPU (None or 0 lifts the limit), e.g. to
    emulate a 16 GB card on an 80 GB one. Allocations beyond it raise a real OutOfMemoryError.
    Returns the fraction set. VRAM figures from `vram()` are then reported against the cap."""
    global _cap_bytes
    torch = _cuda(init=True)
    if torch is None:
        raise RuntimeError("a VRAM cap needs a CUDA device")
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if not cap_bytes or cap_bytes >= total:
        fraction, _cap_bytes = 1.0, None
    else:
        if cap_bytes < 0:
            raise ValueError("a VRAM cap must be positive")
        fraction, _cap_bytes = cap_bytes / total, int(cap_bytes)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def memory_cap() -> int | None:
    return _cap_bytes


# -- figures --------------------------------------------------------------------------------


def vram(init: bool = True) -> dict[str, Any] | None:
    """VRAM figures in bytes, or None without torch or CUDA.

    `free`/`total` are the device's, limited by a cap from `set_memory_cap`. `available` is how
    high `peak` (max_memory_allocated) can climb before an allocation fails: memory this process
    already holds plus what it may still take. `init=False` never creates a CUDA context (for a
    status request that must not block behind CUDA start-up)."""
    torch = _cuda(init)
    if torch is None or _probe.hung:
        return None  # a hung GPU would hang these queries too; status shows the probe instead
    try:
        dev = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        allocated = torch.cuda.memory_allocated(dev)
        reserved = torch.cuda.memory_reserved(dev)
        peak = torch.cuda.max_memory_allocated(dev)
    except Exception as exc:  # a poisoned context fails here too; the caller shows "no figures"
        log.debug("cannot read VRAM figures: %s", exc)
        return None
    device_free, device_total = int(free), int(total)
    if _cap_bytes is not None:
        total = min(device_total, _cap_bytes)
        free = max(0, min(device_free, _cap_bytes - reserved))
    return {
        "device": props.name,
        "capability": [props.major, props.minor],
        "allocated": int(allocated),
        "reserved": int(reserved),
        "peak": int(peak),
        "free": int(free),
        "total": int(total),
        "available": int(reserved + free),
        "device_free": device_free,
        "device_total": device_total,
        "cap": _cap_bytes,
    }


def device_key(figures: dict[str, Any] | None = None) -> str | None:
    """A stable name for this GPU (and cap) to key the memory profile, e.g.
    'NVIDIA H100 80GB HBM3 sm90 79GiB'. None without CUDA."""
    figures = figures if figures is not None else vram()
    if not figures:
        return None
    major, minor = figures["capability"]
    return f"{figures['device']} sm{major}{minor} {round(figures['total'] / 2**30)}GiB"


def peak_allocated() -> int | None:
    """max_memory_allocated since the last reset_peak(), or None without a CUDA context."""
    torch = _cuda(init=False)
    if torch is None or _probe.hung:
        return None
    try:
        return int(torch.cuda.max_memory_allocated())
    except Exception:  # a poisoned context fails here too
        return None


def release_cache() -> None:
    """Give the caching allocator's unused blocks back (no CUDA context is created)."""
    torch = _cuda(init=False)
    if torch is not None:
        try:
            torch.cuda.empty_cache()
        except Exception as exc:  # a poisoned context: the runner's cleanup reports it
            log.debug("cannot empty the CUDA cache: %s", exc)


def reset_peak() -> None:
    """Start a new peak measurement (max_memory_allocated restarts from the current value)."""
    torch = _cuda(init=False)
    if torch is not None:
        try:
            torch.cuda.reset_peak_memory_stats()
        except Exception as exc:
            log.debug("cannot reset peak memory stats: %s", exc)


# -- cleanup --------------------------------------------------------------------------------


def forget_exception(tb: TracebackType | None = None) -> None:
    """Drop the interpreter's references to the last exception and clear a traceback's frames,
    so the tensors those frames hold can be freed."""
    for name in ("last_value", "last_traceback", "last_type", "last_exc"):
        if hasattr(sys, name):
            try:
                delattr(sys, name)
            except AttributeError:
                pass
    if tb is not None:
        try:
            traceback.clear_frames(tb)
        except Exception:  # clear_frames skips running frames itself; never fail cleanup
            pass


def cleanup(engine: Any = None, tb: TracebackType | None = None) -> dict[str, Any] | None:
    """Give VRAM back after an attempt or a job: models to CPU (engine hook), references from
    the last exception dropped, garbage collected, the caching allocator emptied. Returns the
    VRAM figures afterwards (None without CUDA). Never raises."""
    forget_exception(tb)
    if engine is not None:
        try:
            engine.release_gpu()
        except Exception as exc:
            log.warning(
                "engine %s failed to release the GPU: %s: %s",
                getattr(engine, "name", "?"),
                type(exc).__name__,
                exc,
            )
            forget_exception(exc.__traceback__)
    gc.collect()
    torch = _cuda(init=False)
    if torch is not None:
        for step in (torch.cuda.synchronize, torch.cuda.empty_cache, torch.cuda.ipc_collect):
            try:
                step()
            except Exception as exc:  # a poisoned context raises on every call; keep going
                log.debug("cleanup step %s failed: %s", step.__name__, exc)
    return vram(init=False)


# -- error classification ----------------------------------------------------------------

# Boilerplate that torch appends to every CUDA error. It mentions "device-side assertions",
# which must not make an ordinary out-of-memory error look like a poisoned context.
_BOILERPLATE = re.compile(
    r"^.*(CUDA_LAUNCH_BLOCKING|TORCH_USE_CUDA_DSA|asynchronously reported|"
    r"stacktrace below might be incorrect|Search for `cuda|Device-side assertion tracking).*$",
    re.MULTILINE | re.IGNORECASE,
)

# (kind, pattern) in priority order; the first match decides. Sticky CUDA errors first: once
# one happened the context is unusable, whatever else the message says. Then out-of-memory,
# which is not sticky and must win over the generic "CUDA error" rule below it.
MESSAGE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern, re.IGNORECASE))
    for kind, pattern in (
        ("poison", r"illegal memory access|cudaErrorIllegalAddress|CUDA_ERROR_ILLEGAL_ADDRESS"),
        ("poison", r"device-side assert(?!ions)"),
        ("poison", r"unspecified launch failure|cudaErrorLaunchFailure|CUDA_ERROR_LAUNCH_FAILED"),
        ("poison", r"invalid configuration argument|cudaErrorInvalidConfiguration"),
        ("poison", r"misaligned address|illegal instruction|invalid program counter"),
        ("poison", r"hardware stack error|uncorrectable ECC error|launch timed out"),
        ("poison", r"CUBLAS_STATUS_EXECUTION_FAILED|CUDNN_STATUS_EXECUTION_FAILED"),
        ("poison", r"CUDNN_STATUS_MAPPING_ERROR|CUDA error: unknown error"),
        ("poison", r"GPU is lost|cudaErrorDevicesUnavailable|CUDA_ERROR_ECC_UNCORRECTABLE"),
        ("oom", r"out of memory|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY"),
        # cuBLAS/cuDNN report a failed workspace or handle allocation this way.
        ("oom", r"CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED"),
        ("oom", r"CUBLAS_STATUS_NOT_INITIALIZED"),  # cublasCreate fails when VRAM is full
        # Not the context's fault: a missing kernel fails the same way in a fresh process.
        ("error", r"no kernel image is available"),
        # Any other CUDA error: assume the worst. A needless respawn costs seconds; serving
        # more jobs from a broken context fails every one of them.
        ("poison", r"CUDA error|CUDA driver error|\[CuMesh\].*CUDA"),
    )
)

# By class name (any class in the MRO), so it works with stand-ins when torch is absent.
CLASS_RULES: tuple[tuple[str, str], ...] = (
    ("OutOfMemoryError", "oom"),  # torch.OutOfMemoryError == torch.cuda.OutOfMemoryError
    ("AcceleratorError", "poison"),  # torch >= 2.8: a CUDA error (message may still say OOM)
)
_SEVERITY = {None: 0, "oom": 1, "poison": 2}


def _classify_one(exc: BaseException) -> str | None:
    # Host RAM exhaustion (MemoryError, "DefaultCPUAllocator: can't allocate memory") is not
    # a GPU OOM: lowering GPU quality would not help, and recording it in the memory profile
    # would teach it that levels fail which fit in VRAM. It is a plain engine error.
    if isinstance(exc, MemoryError):
        return None
    names = [cls.__name__ for cls in type(exc).__mro__]
    by_class = next((kind for name, kind in CLASS_RULES if name in names), None)
    if by_class == "oom":
        return "oom"
    text = _BOILERPLATE.sub("", str(exc))
    for kind, pattern in MESSAGE_RULES:
        if pattern.search(text):
            if kind == "error":
                return None
            return kind
    return by_class


def classify_error(exc: BaseException) -> str | None:
    """'oom' (retry lower on the ladder), 'poison' (the CUDA context is broken: fail the job,
    exit with POISONED_EXIT_CODE) or None (an ordinary error). Looks through the exception's
    cause/context chain and returns the most severe finding."""
    worst: str | None = None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        kind = _classify_one(current)
        if _SEVERITY[kind] > _SEVERITY[worst]:
            worst = kind
        current = current.__cause__ or current.__context__
    return worst


def exit_poisoned(message: str = "CUDA context poisoned") -> None:
    """Leave the process at once with POISONED_EXIT_CODE. os._exit skips atexit handlers and
    CUDA teardown, which may hang or fail on a broken context. Write the job's failure first."""
    log.critical("%s; exiting with code %d for a fresh process", message, POISONED_EXIT_CODE)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(POISONED_EXIT_CODE)


# -- health probe ---------------------------------------------------------------------------


class HealthProbe:
    """Runs a tiny CUDA op in a daemon thread and waits at most `timeout` for it, so a hung GPU
    makes `status` say so instead of hanging. Only one probe thread is ever in flight: while a
    hung one is still running, later probes report it again without starting another.

    The op runs on its own non-blocking stream and waits for that stream only, so a long kernel
    of the running job does not by itself look like a hang."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._result: dict[str, Any] | None = None
        self._timeout = 0.0

    @property
    def hung(self) -> bool:
        """A probe thread is still running past its timeout."""
        thread = self._thread
        return (
            thread is not None
            and thread.is_alive()
            and time.monotonic() - self._started > self._timeout
        )

    def _work(self, torch: ModuleType) -> None:
        began = time.perf_counter()
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                x = torch.ones(16, device="cuda")
                value = float((x * 2).sum().item())
            stream.synchronize()
            if value != 32.0:
                raise RuntimeError(f"probe computed {value}, expected 32.0")
            result: dict[str, Any] = {
                "ok": True,
                "gpu": True,
                "ms": round((time.perf_counter() - began) * 1000, 3),
            }
        except Exception as exc:
            result = {
                "ok": False,
                "gpu": True,
                "reason": "error",
                "detail": f"{type(exc).__name__}: {exc}"[:500],
                "kind": classify_error(exc),
            }
        self._result = result

    def probe(self, timeout: float = 2.0) -> dict[str, Any]:
        torch = _cuda(init=True)
        if torch is None:
            return {"ok": True, "gpu": False}
        with self._lock:
            running = self._thread
            if running is not None and running.is_alive():
                return {
                    "ok": False,
                    "gpu": True,
                    "reason": "timeout",
                    "detail": f"the previous probe has not returned for "
                    f"{time.monotonic() - self._started:.1f} s",
                }
            self._result = None
            self._started = time.monotonic()
            self._timeout = timeout
            thread = threading.Thread(
                target=self._work, args=(torch,), daemon=True, name="gpu-health-probe"
            )
            self._thread = thread
            thread.start()
        thread.join(timeout)
        if thread.is_alive():
            return {
                "ok": False,
                "gpu": True,
                "reason": "timeout",
                "detail": f"a tiny CUDA op did not finish within {timeout:g} s",
            }
        return self._result or {
            "ok": False,
            "gpu": True,
            "reason": "error",
            "detail": "the probe ended without a result",
        }


_probe = HealthProbe()


def probe_health(timeout: float = 2.0) -> dict[str, Any]:
    """{"ok": True, "ms": ...}, {"ok": False, "reason": "timeout"|"error", "detail": ...},
    or {"ok": True, "gpu": False} without CUDA. Never blocks longer than `timeout`."""
    return _probe.probe(timeout)
