"""Generated meshes: arrays present, finite, indices in range, degenerate faces; warnings for
odd face:vertex ratios. Output that fails is never returned as success."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ErrorCode, OutputError, describe

_FACE_CHUNK = 1 << 20  # faces per chunk when computing areas, to bound temporary memory


def _bad_mesh(message: str) -> OutputError:
    return OutputError(ErrorCode.INVALID_MESH, message)


def validate_mesh(vertices: Any, faces: Any) -> list[str]:
    """Check a triangle mesh ([V,3] float vertices, [F,3] int faces). Raises OutputError for a
    mesh that must not be exported; returns warnings for one that is usable but suspicious."""
    try:
        vertices = np.asarray(vertices)
        faces = np.asarray(faces)
    except Exception as exc:
        raise _bad_mesh(f"Mesh arrays cannot be read: {describe(exc)}") from None
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise _bad_mesh(f"Vertices must have shape [V, 3], got {list(vertices.shape)}.")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise _bad_mesh(f"Faces must have shape [F, 3], got {list(faces.shape)}.")
    if vertices.dtype.kind not in "fiu":
        raise _bad_mesh(f"Vertices must be real numbers, got dtype {vertices.dtype}.")
    if faces.dtype.kind not in "iu":
        raise _bad_mesh(f"Faces must be integer indices, got dtype {faces.dtype}.")
    n_vertices, n_faces = len(vertices), len(faces)
    if n_vertices == 0:
        raise _bad_mesh("The mesh has no vertices.")
    if n_faces == 0:
        raise _bad_mesh("The mesh has no faces.")
    finite = np.isfinite(vertices).all(axis=1)
    if not finite.all():
        raise _bad_mesh(f"{int((~finite).sum()):,} vertices have NaN or infinite coordinates.")
    low, high = int(faces.min()), int(faces.max())
    if low < 0:
        raise _bad_mesh(f"Face indices must not be negative (found {low}).")
    if high >= n_vertices:
        raise _bad_mesh(f"Face index {high} is out of range for {n_vertices:,} vertices.")

    points = vertices.astype(np.float64, copy=False)
    extent = float(np.linalg.norm(points.max(axis=0) - points.min(axis=0)))
    # Twice a triangle's area below this counts as zero: collinear points in float32 leave
    # crumbs far above 0 but many orders of magnitude below any real triangle.
    area_floor = (extent * extent) * 1e-12
    degenerate = 0
    for start in range(0, n_faces, _FACE_CHUNK):
        tri = faces[start : start + _FACE_CHUNK].astype(np.int64, copy=False)
        repeated = (tri[:, 0] == tri[:, 1]) | (tri[:, 1] == tri[:, 2]) | (tri[:, 0] == tri[:, 2])
        a, b, c = points[tri[:, 0]], points[tri[:, 1]], points[tri[:, 2]]
        doubled_area = np.linalg.norm(np.cross(b - a, c - a), axis=1)
        degenerate += int((repeated | (doubled_area <= area_floor)).sum())
    if degenerate == n_faces:
        raise _bad_mesh(f"All {n_faces:,} faces are degenerate (repeated vertices or zero area).")

    warnings_out: list[str] = []
    if degenerate:
        warnings_out.append(
            f"{degenerate:,} of {n_faces:,} faces are degenerate (repeated vertices or zero area)."
        )
    if n_faces > 10 * n_vertices:
        warnings_out.append(
            f"Unusual face:vertex ratio {n_faces / n_vertices:.1f}:1 "
            f"({n_faces:,} faces, {n_vertices:,} vertices); a closed mesh has about 2:1."
        )
    return warnings_out
