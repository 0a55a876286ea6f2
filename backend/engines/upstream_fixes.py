"""Faults of the real upstream code, found on the GPU, and how the engine works around them
without changing upstream: zero normals in the GLB, torch's cache held where CuMesh needs the
memory, o-voxel crashing when asked for its timings, the bake writing into its input mesh
(docs/GPU.md, runs 6 to 8)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from ..pipeline import gpu


def unit_normals(mesh: Any) -> int:
    """glTF requires unit-length normals. Upstream's export leaves zero normals on vertices
    that only degenerate faces use (seen on the real code: the Khronos validator reported 10
    ACCESSOR_VECTOR3_NON_UNIT errors in a 432k-face GLB). Those get +Y; the rest are
    renormalised. Returns how many were repaired."""
    import numpy as np

    normals = np.asarray(mesh.vertex_normals, dtype=np.float64)
    if normals.size == 0:
        return 0
    length = np.linalg.norm(normals, axis=1)
    bad = ~np.isfinite(length) | (length < 1e-6)
    fixed = normals / np.where(bad, 1.0, length)[:, None]
    fixed[bad] = (0.0, 1.0, 0.0)
    mesh.vertex_normals = fixed
    return int(bad.sum())


# CuMesh steps that allocate with cudaMalloc, outside torch's caching allocator.
_CUMESH_STEPS = (("CuMesh", "init"), ("CuMesh", "simplify"), ("CuMesh", "uv_unwrap"))


@contextmanager
def cache_released_for_cumesh() -> Iterator[None]:
    """Give torch's cached blocks back before each CuMesh step of `to_glb`.

    CuMesh allocates with plain cudaMalloc. After the remesh, torch's allocator keeps the
    remesh's blocks cached (34 GiB at the 1536 cascade), where CuMesh's simplify cannot use
    them; measured on the real code, the card then needed the two added together (GPU run 7:
    51.7 GiB at 1536, 10.9 at 1024). Released before each step, the steps share that memory."""
    try:
        import cumesh
    except ImportError:
        yield
        return
    patched = []
    for owner_name, attr in _CUMESH_STEPS:
        owner = getattr(cumesh, owner_name, None)
        original = getattr(owner, attr, None) if owner is not None else None
        if original is None:
            continue

        def released(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            gpu.release_cache()
            return _original(*args, **kwargs)

        setattr(owner, attr, released)
        patched.append((owner, attr, original))
    try:
        yield
    finally:
        for owner, attr, original in patched:
            setattr(owner, attr, original)


def quiet_voxeliser(convert: Any) -> None:
    """o-voxel's `mesh_to_flexible_dual_grid` dies with SIGSEGV when asked to print its timings
    (GPU runs 6 and 7: every time with `timing=True`, never without), and upstream's texturing
    pipeline asks. Its calls go through the module attribute, so one wrapper quiets them all."""
    original = convert.mesh_to_flexible_dual_grid
    if getattr(original, "quiet", False):
        return

    def quiet(*args: Any, **kwargs: Any) -> Any:
        kwargs["timing"] = False
        return original(*args, **kwargs)

    quiet.quiet = True  # type: ignore[attr-defined]
    convert.mesh_to_flexible_dual_grid = quiet


def bake_input(mesh: Any) -> SimpleNamespace:
    """What upstream's texturing `postprocess_mesh` reads of a mesh (vertices, faces, vertex
    normals, UVs), as fresh writable arrays.

    When the mesh has UVs, `postprocess_mesh` swaps the axes of `mesh.vertices` and
    `mesh.vertex_normals` in place. trimesh's cached normals are read-only, so every mesh with
    UVs failed there ("assignment destination is read-only", GPU run 8), and the vertices of
    the job's prepared mesh would have been turned over for a second bake (an attempt resumed
    at the bake after an out-of-memory error). Without UVs upstream unwraps and copies."""
    import numpy as np

    uv = getattr(getattr(mesh, "visual", None), "uv", None)
    return SimpleNamespace(
        vertices=np.array(mesh.vertices, dtype=np.float64),
        faces=np.array(mesh.faces),
        vertex_normals=np.array(mesh.vertex_normals, dtype=np.float64),
        visual=SimpleNamespace(uv=None if uv is None else np.array(uv, dtype=np.float64)),
    )
