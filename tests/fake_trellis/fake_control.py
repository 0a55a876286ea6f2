"""Test controls for the fake TRELLIS.2: failure injection, call log, import-time env."""

from __future__ import annotations

import os

import torch

# Each entry: {"where": <point>, "kind": "oom" | "cumesh_oom" | "illegal", "times": n}.
# Points: conditioning, rembg, sparse_structure, shape, texture, decode, export,
# encode (texturing), bake (texturing).
FAIL: list[dict] = []
EMPTY_STRUCTURE = False  # the sparse-structure decoder then predicts no occupied voxel
ZERO_NORMALS = 0  # to_glb leaves this many vertex normals at zero, as the real export does
CALLS: list[tuple[str, dict]] = []
IMPORT_ENV: dict[str, str | None] = {}
FORWARDS: dict[str, int] = {}


def reset() -> None:
    global EMPTY_STRUCTURE, ZERO_NORMALS
    ZERO_NORMALS = 0
    FAIL.clear()
    CALLS.clear()
    FORWARDS.clear()
    EMPTY_STRUCTURE = False


def record_import_env() -> None:
    for name in ("ATTN_BACKEND", "SPARSE_ATTN_BACKEND", "SPARSE_CONV_BACKEND", "HF_HUB_OFFLINE"):
        IMPORT_ENV[name] = os.environ.get(name)


def count(where: str) -> None:
    FORWARDS[where] = FORWARDS.get(where, 0) + 1


def maybe_fail(where: str) -> None:
    for entry in FAIL:
        if entry["where"] == where and entry.get("times", 1) > 0:
            entry["times"] = entry.get("times", 1) - 1
            kind = entry.get("kind", "oom")
            if kind == "oom":
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate 2.00 GiB (fake, at {where})"
                )
            if kind == "cumesh_oom":
                raise RuntimeError("[CuMesh] CUDA error: out of memory (fake)")
            if kind == "illegal":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            raise RuntimeError(f"fake failure at {where}")


def placement_of(device) -> str:
    """The logical device a move asks for (tensors themselves stay on the CPU)."""
    return str(device) if device is not None else "cpu"
