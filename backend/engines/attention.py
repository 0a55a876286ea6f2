"""Choosing TRELLIS.2's attention backends (ATTN_BACKEND / SPARSE_ATTN_BACKEND) before import.

Dense attention (DINOv3 conditioning, the sparse-structure flow) always uses torch's `sdpa`,
a native upstream choice that works on every GPU. Sparse attention (the SLat flows, the
decoders) upstream accepts only flash_attn or xformers; ours adds `sdpa`, the fallback in
`sparse_attention.py`, so TRELLIS.2 runs with neither installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from typing import Any

from ..errors import BackendError, ErrorCode
from . import sparse_attention

log = logging.getLogger(__name__)

# Sparse attention backends, best first.
BACKENDS = ("flash_attn", "xformers", "sdpa")
DENSE_BACKEND = "sdpa"
# flash-attn 2 kernels exist only for Ampere (sm_80) and newer.
FLASH_ATTN_MIN_CAPABILITY = (8, 0)
# The module each backend needs at run time (sdpa needs only torch).
_MODULES = {"flash_attn": "flash_attn", "xformers": "xformers.ops"}


def choose_attention_backend(
    flash_attn_importable: bool,
    xformers_importable: bool,
    compute_capability: tuple[int, int] | None,
) -> str:
    """flash_attn on Ampere+, else xformers, else the SDPA fallback. Never spconv/torchsparse:
    the released conv weights load into them silently broken."""
    if (
        flash_attn_importable
        and compute_capability is not None
        and tuple(compute_capability) >= FLASH_ATTN_MIN_CAPABILITY
    ):
        return "flash_attn"
    if xformers_importable:
        return "xformers"
    return "sdpa"


def _importable(name: str) -> bool:
    if name == "flash_attn" and sparse_attention.installed():
        return False  # our SDPA fallback under flash-attn's name, not the real package
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def detect() -> dict[str, Any]:
    """The inputs of choose_attention_backend, found without importing flash-attn or xformers.
    Imports torch only if it is installed (set PYTORCH_CUDA_ALLOC_CONF before calling)."""
    capability = None
    gpu_name = None
    if "torch" in sys.modules or _importable("torch"):
        try:
            import torch

            if torch.cuda.is_available():
                capability = tuple(torch.cuda.get_device_capability(0))
                gpu_name = torch.cuda.get_device_name(0)
        except Exception:  # a broken torch install must not break the probe
            capability = None
    return {
        "flash_attn": _importable("flash_attn"),
        "xformers": _importable("xformers"),
        "compute_capability": capability,
        "gpu_name": gpu_name,
    }


def choose(probe: dict[str, Any] | None = None) -> str:
    probe = detect() if probe is None else probe
    return choose_attention_backend(
        probe["flash_attn"], probe["xformers"], probe["compute_capability"]
    )


def usable(backend: str, device: str | None = None) -> str | None:
    """None if `backend` works; else why not. Importing is not enough: a wheel built for
    another torch imports and then has no operators (PyPI's xformers 0.0.35 on torch
    2.11+cu130: "xFormers wasn't built with CUDA support", seen on the GPU machine at the
    first job). So one tiny varlen call runs on the GPU (or on `device`) before trellis2 is
    imported, not at the first job."""
    module = _MODULES.get(backend)
    if module is None:
        return None
    try:
        importlib.import_module(module)
        if device is None and "torch" in sys.modules:
            device = "cuda" if sys.modules["torch"].cuda.is_available() else None
        if device is not None:
            _PROBES[backend](device)
    except Exception as exc:  # ImportError, OSError from a .so, NotImplementedError from ops
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    return None


def _probe_xformers(device: str) -> None:
    import torch
    import xformers.ops as xops

    q = torch.randn(1, 8, 2, 64, device=device, dtype=torch.bfloat16)
    mask = xops.fmha.BlockDiagonalMask.from_seqlens([3, 5])  # how TRELLIS.2 calls it
    xops.memory_efficient_attention(q, q, q, mask)


def _probe_flash_attn(device: str) -> None:
    import flash_attn
    import torch

    qkv = torch.randn(8, 3, 2, 64, device=device, dtype=torch.bfloat16)
    cu = torch.tensor([0, 3, 8], device=device, dtype=torch.int32)
    flash_attn.flash_attn_varlen_qkvpacked_func(qkv, cu, 5)


_PROBES = {"xformers": _probe_xformers, "flash_attn": _probe_flash_attn}


def resolve(choice: str) -> tuple[str, str | None]:
    """The sparse backend to use for a user's choice ("auto" or a name) and, when the preferred
    one cannot import, the reason it was passed over (the SDPA fallback is then used)."""
    if choice not in ("auto", *BACKENDS):
        raise BackendError(
            ErrorCode.BAD_PARAMS,
            f"unknown attention backend {choice!r}",
            f"Use auto or one of {', '.join(BACKENDS)}.",
        )
    backend = choose() if choice == "auto" else choice
    problem = usable(backend)
    if problem is None:
        return backend, None
    log.warning("attention backend %s cannot be used (%s); using sdpa", backend, problem)
    return "sdpa", f"{backend} cannot be used ({problem})"


def apply(backend: str) -> None:
    """Set both variables before trellis2 is imported (its config reads them once). For the
    SDPA fallback sparse attention is set to flash_attn, whose calls `sparse_attention.install`
    then routes to SDPA. The sparse conv is pinned to flex_gemm."""
    if backend not in BACKENDS:
        raise BackendError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"unsupported attention backend {backend!r}",
            f"Use one of {', '.join(BACKENDS)}.",
        )
    os.environ["ATTN_BACKEND"] = DENSE_BACKEND
    os.environ["SPARSE_ATTN_BACKEND"] = "flash_attn" if backend == "sdpa" else backend
    os.environ["SPARSE_CONV_BACKEND"] = "flex_gemm"
