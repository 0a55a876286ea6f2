"""Choosing TRELLIS.2's attention backends (ATTN_BACKEND / SPARSE_ATTN_BACKEND) before import."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from .errors import BackendError, ErrorCode

BACKENDS = ("flash_attn", "xformers")
# flash-attn 2 kernels exist only for Ampere (sm_80) and newer.
FLASH_ATTN_MIN_CAPABILITY = (8, 0)


def choose_attention_backend(
    flash_attn_importable: bool,
    xformers_importable: bool,
    compute_capability: tuple[int, int] | None,
) -> str:
    """flash_attn on Ampere+, else xformers; never sdpa/spconv, which sparse attention and
    the released conv weights cannot use (reference/trellis2.md §4)."""
    if (
        flash_attn_importable
        and compute_capability is not None
        and tuple(compute_capability) >= FLASH_ATTN_MIN_CAPABILITY
    ):
        return "flash_attn"
    if xformers_importable:
        return "xformers"
    if flash_attn_importable:
        detail = (
            "flash-attn is installed but needs an Ampere or newer GPU"
            if compute_capability is not None
            else "flash-attn is installed but no CUDA GPU was found"
        )
    else:
        detail = "neither flash-attn nor xformers is installed"
    raise BackendError(
        ErrorCode.ENGINE_UNAVAILABLE,
        f"no usable attention backend for TRELLIS.2: {detail}",
        "Install xformers matching your torch build (pip install xformers), "
        "or flash-attn on an Ampere+ GPU (pip install flash-attn --no-build-isolation).",
    )


def _importable(name: str) -> bool:
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


def apply(backend: str) -> None:
    """Set both variables (sparse attention does not follow ATTN_BACKEND when that is
    sdpa) and pin the sparse conv to flex_gemm: spconv/torchsparse load the released
    weights silently broken. Must run before trellis2 is imported."""
    if backend not in BACKENDS:
        raise BackendError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"unsupported attention backend {backend!r}",
            f"Use one of {', '.join(BACKENDS)}.",
        )
    os.environ["ATTN_BACKEND"] = backend
    os.environ["SPARSE_ATTN_BACKEND"] = backend
    os.environ["SPARSE_CONV_BACKEND"] = "flex_gemm"
