"""A mesh's texture as pure functions (numpy only): which texels its UV triangles cover, and
which glTF alpha mode its base colour calls for. Both engines use them where they write a GLB:
TRELLIS.2 marks every material OPAQUE whatever its texture's alpha says, so an importer would
drop real transparency."""

from __future__ import annotations

from typing import Any

import numpy as np

# Texels at or above this alpha are opaque: 8-bit rounding and TRELLIS.2's inpainted atlas
# borders stay above it on solid objects.
OPAQUE_ALPHA = 0.98
# The share of the covered surface that must be see-through before the material is: a few
# stray texels on a seam are not transparency an artist wants to pay for in sorting.
TRANSPARENT_SHARE = 0.005
CLEAR_ALPHA = 0.1  # a texel this clear is a hole (cut-out), not a tint
MASK_SHARE = 0.9  # see-through texels that are holes: the material is a cut-out (MASK)
MASK_CUTOFF = 0.5
COVERAGE_SIZE = 512  # texels per side when judging a texture's alpha (cheap, and enough)
_BUDGET = 1 << 22  # candidate texels per rasterisation chunk (bounds memory)


def rasterize_uv(uv: Any, faces: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre of a `size`² texture, and where in it.

    `uv` follows trimesh (v up, so row 0 of the image is v = 1). Returns `face` (size×size,
    int64, -1 where no triangle covers the texel) and `bary` (size×size×3, float32, the
    texel centre's barycentric coordinates in that triangle). Where triangles overlap in UV
    space the later one wins."""
    uv = np.asarray(uv, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    face_of = np.full((size, size), -1, dtype=np.int64)
    bary = np.zeros((size, size, 3), dtype=np.float32)
    if len(faces) == 0:
        return face_of, bary
    points = np.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], axis=1)
    tri = points[faces]  # (F, 3, 2) in texel units, x right, y down
    # Texel centres (c + 0.5) inside each triangle's bounding box.
    lo = np.ceil(tri.min(axis=1) - 0.5).astype(np.int64).clip(0, size - 1)
    hi = np.floor(tri.max(axis=1) - 0.5).astype(np.int64).clip(-1, size - 1)
    span = (hi - lo + 1).clip(0)
    e0, e1 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    den = e0[:, 0] * e1[:, 1] - e1[:, 0] * e0[:, 1]
    count = span[:, 0] * span[:, 1] * (np.abs(den) > 1e-12)
    order = np.nonzero(count)[0]
    ends = np.cumsum(count[order])
    start = 0
    while start < len(order):
        # The next chunk: as many triangles as fit the budget (at least one).
        before = ends[start] - count[order[start]]
        stop = max(start + 1, int(np.searchsorted(ends, before + _BUDGET, side="right")))
        ids = order[start:stop]
        start = stop
        n = count[ids]
        f = np.repeat(ids, n)
        k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        x = lo[f, 0] + k % span[f, 0]
        y = lo[f, 1] + k // span[f, 0]
        px = x + 0.5 - tri[f, 0, 0]
        py = y + 0.5 - tri[f, 0, 1]
        l1 = (px * e1[f, 1] - e1[f, 0] * py) / den[f]
        l2 = (e0[f, 0] * py - px * e0[f, 1]) / den[f]
        l0 = 1.0 - l1 - l2
        inside = (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
        x, y, f = x[inside], y[inside], f[inside]
        face_of[y, x] = f
        bary[y, x] = np.stack([l0[inside], l1[inside], l2[inside]], axis=1)
    return face_of, bary


def alpha_mode(alpha: Any) -> tuple[str, float | None]:
    """The glTF alpha mode for a surface whose base colour has these alpha values (0..1, one
    per covered texel): ("OPAQUE", None), ("MASK", cutoff) for cut-outs, ("BLEND", None)."""
    alpha = np.asarray(alpha, dtype=np.float64).ravel()
    if alpha.size == 0:
        return "OPAQUE", None
    clear = alpha < OPAQUE_ALPHA
    if clear.mean() < TRANSPARENT_SHARE:
        return "OPAQUE", None
    if (alpha[clear] <= CLEAR_ALPHA).mean() >= MASK_SHARE:
        return "MASK", MASK_CUTOFF
    return "BLEND", None


def covered_alpha(alpha_image: Any, uv: Any, faces: Any, size: int = COVERAGE_SIZE) -> np.ndarray:
    """The base colour's alpha (0..1) where the mesh's UV triangles cover a `size`² grid: the
    part of the texture the surface shows (atlas padding and empty space do not count)."""
    alpha_image = np.asarray(alpha_image, dtype=np.float64)
    if alpha_image.max(initial=0.0) > 1.0:
        alpha_image = alpha_image / 255.0
    face_of, _ = rasterize_uv(uv, faces, size)
    rows, cols = np.nonzero(face_of >= 0)
    h, w = alpha_image.shape[:2]
    r = ((rows + 0.5) * h / size).astype(np.int64).clip(0, h - 1)
    c = ((cols + 0.5) * w / size).astype(np.int64).clip(0, w - 1)
    return alpha_image[r, c]


def mark_alpha_mode(mesh: Any) -> str:
    """Set a textured trimesh's material alpha mode from what its base colour shows; returns
    the mode. Meshes without a base-colour texture or UVs keep the mode they have."""
    visual = getattr(mesh, "visual", None)
    material = getattr(visual, "material", None)
    texture = getattr(material, "baseColorTexture", None)
    uv = getattr(visual, "uv", None)
    if texture is None or uv is None or len(uv) != len(mesh.vertices):
        return str(getattr(material, "alphaMode", None) or "OPAQUE")
    if texture.mode not in ("RGBA", "LA"):
        mode, cutoff = "OPAQUE", None
    else:
        alpha = np.asarray(texture.getchannel("A"))
        mode, cutoff = alpha_mode(covered_alpha(alpha, uv, mesh.faces))
    material.alphaMode = mode
    material.alphaCutoff = cutoff
    return mode
