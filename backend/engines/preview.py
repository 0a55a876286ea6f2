"""The preview engine: a CPU-only, weight-free proxy that inflates the image's silhouette."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..checks import meshes
from ..errors import BackendError, ErrorCode, InputError
from ..params import GenerationParams
from ..safefs import Folder
from . import surface
from .base import Engine, Stage, StageContext

# Only numpy, Pillow and trimesh: this engine also runs in Blender's own Python with the
# bundled wheels, so no scipy, skimage or torch (and no trimesh feature that needs them).

CACHE_IMAGE = "preview_cache_image.png"
CACHE_MASK = "preview_cache_mask.png"

DEPTH_SCALE = 0.7  # a disc inflates to a sphere squashed to 70 % depth: plausible, not a card
ROUGHNESS = 0.8
METALLIC = 0.0
MR_TEXTURE_SIZE = 16  # metallic/roughness are constant here: a tiny texture says so
RIM = 2  # pixels: the silhouette's anti-aliased rim is geometry, not see-through material
MIN_CELLS = 8  # the coarsest grid (cells on the longest side) the face budget may force
_EMPTY_HINT = (
    "No subject was found. Use an image with a transparent background, or a subject that "
    "stands out clearly from a plain, evenly coloured background."
)

_MASK = Stage("mask", "Finding the subject", frozenset({"image_size"}))
_SHAPE = Stage("shape", "Inflating the silhouette", frozenset({"resolution", "decimation_target"}))
_PROJECT = Stage("project", "Projecting the image onto the mesh")
_TEXTURE = Stage("texture", "Painting the texture", frozenset({"texture_size"}))
_EXPORT = Stage("export", "Writing the GLB", frozenset({"texture_size", "decimation_target"}))


class PreviewEngine(Engine):
    """A quick, honest stand-in for TRELLIS.2: the foreground silhouette inflated into a closed,
    textured mesh, Y-up in the unit cube like TRELLIS.2 output.

    It is deterministic: the same image and parameters give the same GLB bytes, so the seed is
    deliberately ignored.
    """

    name = "preview"
    label = "Preview (no GPU)"
    uses_gpu = False
    capabilities = frozenset({"resolution", "image_size", "texture_size", "decimation_target"})
    stages = (_MASK, _SHAPE, _TEXTURE, _EXPORT)

    def __init__(self, **options: Any):
        # The server passes engine options generically; none of them concern this engine.
        self.options = dict(options)

    def load(self, progress: Callable[[float, str], None] | None = None) -> None:
        # trimesh (with networkx, ~27,000 objects) imported at start-up, which heap.settle()
        # freezes: else the full collection after every job walks it (~12 ms, GIL held).
        import trimesh  # noqa: F401

    def stages_for(self, kind: str) -> tuple[Stage, ...]:
        if kind == "generate":
            return self.stages
        if kind == "reexport":
            return (_SHAPE, _TEXTURE, _EXPORT)
        if kind == "texture":
            return (_MASK, _PROJECT, _TEXTURE, _EXPORT)
        return super().stages_for(kind)

    def run_stage(
        self, stage: str, state: dict[str, Any], params: GenerationParams, ctx: StageContext
    ) -> None:
        handlers = {
            "mask": _mask_stage,
            "shape": _shape_stage,
            "project": _project_stage,
            "texture": _texture_stage,
            "export": _export_stage,
        }
        handler = handlers.get(stage)
        if handler is None:
            raise BackendError(ErrorCode.INTERNAL, f"the preview engine has no stage {stage!r}")
        handler(state, params, ctx)

    def save_cache(self, state: dict[str, Any], directory: Path) -> None:
        mask = Image.fromarray(np.asarray(state["preview_mask"], dtype=np.uint8) * 255, "L")
        # Through a folder handle: a link planted at a cache name is replaced, never written
        # through (the cache holds a copy of the input image: 0600 like the input).
        with Folder.at(directory, create=True) as folder:
            folder.write(CACHE_IMAGE, _png(state["preview_rgba"]))
            folder.write(CACHE_MASK, _png(mask))

    def load_cache(self, directory: Path) -> dict[str, Any]:
        directory = Path(directory)
        try:
            with Folder.at(directory) as folder:
                image_data, mask_data = folder.read(CACHE_IMAGE), folder.read(CACHE_MASK)
        except FileNotFoundError:
            raise BackendError(
                ErrorCode.NOT_FOUND,
                f"no preview cache in {directory}",
                "This job has nothing to re-export; generate it again.",
            ) from None
        except OSError as exc:  # a link or another user's file: never followed
            raise BackendError(
                ErrorCode.NOT_FOUND,
                f"the preview cache in {directory} is unreadable: {exc}",
                "Generate this job again.",
            ) from None
        try:
            with Image.open(io.BytesIO(image_data)) as im:
                rgba = im.convert("RGBA")
            with Image.open(io.BytesIO(mask_data)) as im:
                mask = np.asarray(im.convert("L")) >= 128
        except OSError as exc:
            raise BackendError(
                ErrorCode.NOT_FOUND,
                f"the preview cache in {directory} is unreadable: {exc}",
                "Generate this job again.",
            ) from None
        if mask.shape != (rgba.height, rgba.width) or not mask.any():
            raise BackendError(
                ErrorCode.NOT_FOUND,
                f"the preview cache in {directory} is inconsistent",
                "Generate this job again.",
            )
        return {"preview_rgba": rgba, "preview_mask": mask}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # a cache: speed over size
    return buf.getvalue()


# --------------------------------------------------------------------------- mask stage


def _mask_stage(state: dict[str, Any], params: GenerationParams, ctx: StageContext) -> None:
    image = state.get("image")
    if not isinstance(image, Image.Image):
        raise InputError(ErrorCode.BAD_IMAGE, "the preview engine needs an image")
    ctx.progress(0, 4, "reading the image")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    rgba = image.convert("RGBA")
    longest = max(rgba.size)
    if longest > params.image_size:
        scale = params.image_size / longest
        size = (max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale)))
        rgba = rgba.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    arr = np.array(rgba)
    ctx.progress(1, 4, "finding the subject")
    alpha = arr[..., 3]
    if has_alpha and alpha.min() < 255:
        solid = alpha >= 128
        if not solid.any():
            raise InputError(ErrorCode.EMPTY_ALPHA, "the image's alpha channel hides everything")
        mask = _drop_specks(solid)
        arr[solid & ~mask, 3] = 0
    else:
        # No transparency (or an alpha that hides nothing): cut the subject off its background.
        mask = _remove_background(arr[..., :3])
        arr[..., 3] = np.where(mask, 255, 0).astype(np.uint8)
    if mask.sum() < 16:
        raise InputError(ErrorCode.EMPTY_ALPHA, "no subject found in the image", _EMPTY_HINT)
    ctx.progress(2, 4, "cropping to the subject")
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    margin = max(2, round(0.04 * max(y1 - y0, x1 - x0)))
    box = (x0 - margin, y0 - margin, x1 + margin, y1 + margin)
    crop = Image.fromarray(arr, "RGBA").crop(box)  # outside the image: transparent
    padded = np.pad(mask, margin)
    crop_mask = padded[y0 : y1 + 2 * margin, x0 : x1 + 2 * margin]
    state["preview_rgba"] = crop
    state["preview_mask"] = np.ascontiguousarray(crop_mask)
    state["preview_crop"] = box  # in the (downscaled) input image's pixels
    ctx.progress(4, 4, f"subject {x1 - x0}x{y1 - y0} px")


def _remove_background(rgb: np.ndarray) -> np.ndarray:
    """Foreground = pixels far from the border colour, largest component, holes filled."""
    h, w = rgb.shape[:2]
    b = max(1, min(h, w) // 64)
    border = np.concatenate(
        [
            rgb[:b].reshape(-1, 3),
            rgb[-b:].reshape(-1, 3),
            rgb[:, :b].reshape(-1, 3),
            rgb[:, -b:].reshape(-1, 3),
        ]
    ).astype(np.float32)
    background = np.median(border, axis=0)
    spread = np.sqrt(((border - background) ** 2).sum(axis=1))
    # Noise or a gentle gradient in the border widens the threshold; a subject touching the
    # border must not blow it up, hence the percentile and the cap.
    threshold = float(np.clip(3.0 * np.percentile(spread, 90), 24.0, 96.0))
    diff = rgb.astype(np.float32) - background
    far = (diff * diff).sum(axis=2) > threshold * threshold
    if not far.any():
        raise InputError(ErrorCode.EMPTY_ALPHA, "no subject found on the background", _EMPTY_HINT)
    return _fill_holes(_largest_component(far))


# Connected components on row runs: far fewer runs than pixels, and each step is vectorised.


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # row-major order pairs each start with its end
    return rows, starts, ends


def _run_components(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int):
    """Root label per run; runs in adjacent rows that overlap are 4-connected."""
    n = len(rows)
    stride = width + 2
    start_key = rows * stride + starts
    end_key = rows * stride + ends
    prev = (rows - 1) * stride
    first = np.searchsorted(end_key, prev + starts, side="right")
    last = np.searchsorted(start_key, prev + ends, side="left") - 1
    counts = np.maximum(last - first + 1, 0)
    total = int(counts.sum())
    b = np.repeat(np.arange(n), counts)
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    a = np.repeat(first, counts) + offsets
    parent = np.arange(n)
    while True:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            return parent
        # Hook the larger root under the smaller one, then flatten (pointer jumping).
        np.minimum.at(
            parent, np.maximum(pa[differ], pb[differ]), np.minimum(pa[differ], pb[differ])
        )
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def _paint_runs(shape, rows, starts, ends) -> np.ndarray:
    h, w = shape
    acc = np.zeros((h, w + 1), np.int8)
    acc[rows, starts] = 1
    acc[rows, ends] = -1
    return np.cumsum(acc, axis=1, dtype=np.int8)[:, :w] > 0


def _component_sizes(mask: np.ndarray):
    rows, starts, ends = _runs(mask)
    roots = _run_components(rows, starts, ends, mask.shape[1])
    sizes = np.bincount(roots, weights=ends - starts, minlength=len(rows))
    return rows, starts, ends, roots, sizes


def _largest_component(mask: np.ndarray) -> np.ndarray:
    rows, starts, ends, roots, sizes = _component_sizes(mask)
    keep = roots == np.argmax(sizes)
    return _paint_runs(mask.shape, rows[keep], starts[keep], ends[keep])


def _drop_specks(mask: np.ndarray) -> np.ndarray:
    """Keep every real part of an alpha cut-out, drop stray specks (< 1 % of the largest)."""
    rows, starts, ends, roots, sizes = _component_sizes(mask)
    keep = sizes[roots] >= max(16.0, 0.01 * sizes.max())
    if keep.all():
        return mask
    return _paint_runs(mask.shape, rows[keep], starts[keep], ends[keep])


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    rows, starts, ends = _runs(~mask)
    if len(rows) == 0:
        return mask
    roots = _run_components(rows, starts, ends, w)
    touches = (rows == 0) | (rows == h - 1) | (starts == 0) | (ends == w)
    outside = np.zeros(len(rows), bool)
    outside[np.unique(roots[touches])] = True
    hole = ~outside[roots]
    if not hole.any():
        return mask
    return mask | _paint_runs(mask.shape, rows[hole], starts[hole], ends[hole])


# --------------------------------------------------------------------------- shape stage

# Marching squares cell corners a, b, c, d (clockwise on screen from top-left) are slots 0-3;
# the edge crossings ab, bc, cd, da are slots 4-7. For each of the 16 cases: the fan of
# triangles covering the inside part of the cell, always fanned from an inside corner so that
# no triangle lies entirely on the rim (it would be shared by the front and the back).


def _case_fans() -> list[list[tuple[int, int, int]]]:
    fans: list[list[tuple[int, int, int]]] = [[]]
    for case in range(1, 16):
        inside = [bool(case >> k & 1) for k in range(4)]
        polygon: list[int] = []
        for k in range(4):
            if inside[k]:
                polygon.append(k)
            if inside[k] != inside[(k + 1) % 4]:
                polygon.append(4 + k)
        first = next(i for i, slot in enumerate(polygon) if slot < 4)
        polygon = polygon[first:] + polygon[:first]
        fans.append([(polygon[0], polygon[i], polygon[i + 1]) for i in range(1, len(polygon) - 1)])
    return fans


_FANS = _case_fans()
_FAN_SIZE = np.array([len(f) for f in _FANS])


class _Lattice:
    """Silhouette coverage sampled on a lattice of cell corners over the cropped mask."""

    def __init__(self, mask: np.ndarray, cells: int):
        h, w = mask.shape
        image = Image.fromarray(mask.astype(np.uint8) * 255, "L")
        # Tiny masks: upsample first so coverage varies smoothly between lattice corners.
        self.upscale = max(1.0, 2.0 * cells / max(h, w))
        if self.upscale > 1.0:
            w = round(w * self.upscale)
            h = round(h * self.upscale)
            image = image.resize((w, h), Image.Resampling.BILINEAR)
        c = max(h, w) / cells
        self.cols = math.ceil(w / c) + 2  # one empty cell on every side keeps the rim closed
        self.rows = math.ceil(h / c) + 2
        self.x0 = (w - self.cols * c) / 2
        self.y0 = (h - self.rows * c) / 2
        self.cell = c
        pad = math.ceil(2 * c) + 2
        padded = Image.new("L", (w + 2 * pad, h + 2 * pad), 0)
        padded.paste(image, (pad, pad))
        box = (
            self.x0 - c / 2 + pad,
            self.y0 - c / 2 + pad,
            self.x0 + self.cols * c + c / 2 + pad,
            self.y0 + self.rows * c + c / 2 + pad,
        )
        # BOX-filtered coverage at each corner: linear across a straight edge, so the 0.5
        # crossing on a lattice edge lands on the true silhouette, not on a staircase.
        sampled = padded.resize((self.cols + 1, self.rows + 1), Image.Resampling.BOX, box=box)
        self.coverage = np.asarray(sampled, dtype=np.float64) / 255.0
        self.inside = self.coverage > 0.5
        a, b = self.inside[:-1, :-1], self.inside[:-1, 1:]
        cc, d = self.inside[1:, 1:], self.inside[1:, :-1]
        self.case = a * 1 + b * 2 + cc * 4 + d * 8

    def face_count(self) -> int:
        return int(2 * _FAN_SIZE[self.case].sum())


def _crossings(cov0: np.ndarray, cov1: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (0.5 - cov0) / (cov1 - cov0)
    return np.nan_to_num(t, nan=0.5, posinf=0.5, neginf=0.5)


def _inflate(lat: _Lattice, ctx: StageContext, step: int, total: int) -> np.ndarray:
    """Solve -laplace(u) = 4 inside with u = 0 on the silhouette; sqrt(u) inflates a disc of
    radius R into a sphere of radius R and a strip into an ellipse, so thin parts stay thin."""
    inside = lat.inside
    cov = lat.coverage
    # Sub-cell Dirichlet boundary via ghost values: an outside neighbour at boundary distance
    # theta adds (1 - theta) / theta to the diagonal, which keeps the system symmetric.
    tx = np.clip(_crossings(cov[:, :-1], cov[:, 1:]), 0.05, 0.95)
    ty = np.clip(_crossings(cov[:-1, :], cov[1:, :]), 0.05, 0.95)
    diag = np.where(inside, 4.0, 1.0)
    right = inside[:, :-1] & ~inside[:, 1:]
    left = inside[:, 1:] & ~inside[:, :-1]
    down = inside[:-1, :] & ~inside[1:, :]
    up = inside[1:, :] & ~inside[:-1, :]
    diag[:, :-1] += np.where(right, (1 - tx) / tx, 0.0)
    diag[:, 1:] += np.where(left, tx / (1 - tx), 0.0)
    diag[:-1, :] += np.where(down, (1 - ty) / ty, 0.0)
    diag[1:, :] += np.where(up, ty / (1 - ty), 0.0)
    weight = inside.astype(np.float64)

    def apply(u: np.ndarray) -> np.ndarray:
        out = diag * u
        out[:, :-1] -= u[:, 1:]
        out[:, 1:] -= u[:, :-1]
        out[:-1, :] -= u[1:, :]
        out[1:, :] -= u[:-1, :]
        return out * weight

    # Jacobi-preconditioned conjugate gradients; each iteration is a few array passes over
    # the lattice, so checking in every 16 iterations keeps cancel well under 100 ms.
    rhs = 4.0 * weight
    u = np.zeros_like(rhs)
    r = rhs.copy()
    z = r / diag
    p = z.copy()
    rz = float((r * z).sum())
    target = 1e-6 * math.sqrt(float((rhs * rhs).sum()))
    limit = 20 * max(lat.rows, lat.cols) + 200
    for it in range(limit):
        if it % 16 == 0:
            ctx.progress(step, total, f"inflating (iteration {it})")
        ap = apply(p)
        alpha = rz / float((p * ap).sum())
        u += alpha * p
        r -= alpha * ap
        if math.sqrt(float((r * r).sum())) <= target:
            break
        z = r / diag
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return np.sqrt(np.maximum(u, 0.0)) * weight


def _build_mesh(lat: _Lattice, height: np.ndarray, ctx: StageContext, step: int, total: int):
    """Front surface + mirrored back surface sharing the rim vertices: closed by construction."""
    inside, cov, c = lat.inside, lat.coverage, lat.cell
    rows_n, cols_n = inside.shape
    ii, jj = np.nonzero(inside)
    k = len(ii)
    front = np.full(inside.shape, -1, np.int64)
    front[ii, jj] = np.arange(k)
    back = np.where(inside, front + k, -1)

    hx = inside[:, :-1] != inside[:, 1:]
    vy = inside[:-1, :] != inside[1:, :]
    hi, hj = np.nonzero(hx)
    vi, vj = np.nonzero(vy)
    hidx = np.full(hx.shape, -1, np.int64)
    hidx[hi, hj] = 2 * k + np.arange(len(hi))
    vidx = np.full(vy.shape, -1, np.int64)
    vidx[vi, vj] = 2 * k + len(hi) + np.arange(len(vi))

    # Crossing positions keep away from the corners so that no triangle degenerates.
    th = np.clip(_crossings(cov[hi, hj], cov[hi, hj + 1]), 0.02, 0.98)
    tv = np.clip(_crossings(cov[vi, vj], cov[vi + 1, vj]), 0.02, 0.98)
    depth = DEPTH_SCALE * c
    corner_xyz = np.stack([lat.x0 + jj * c, lat.y0 + ii * c, depth * height[ii, jj]], axis=1)
    back_xyz = corner_xyz * np.array([1.0, 1.0, -1.0])
    h_xyz = np.stack([lat.x0 + (hj + th) * c, lat.y0 + hi * c, np.zeros_like(th)], axis=1)
    v_xyz = np.stack([lat.x0 + vj * c, lat.y0 + (vi + tv) * c, np.zeros_like(tv)], axis=1)
    points = np.concatenate([corner_xyz, back_xyz, h_xyz, v_xyz]) / lat.upscale
    ctx.progress(step, total, "triangulating")

    front_faces, back_faces = [], []
    for case in range(1, 16):
        ci, cj = np.nonzero(lat.case == case)
        if len(ci) == 0:
            continue
        corners_f = (front[ci, cj], front[ci, cj + 1], front[ci + 1, cj + 1], front[ci + 1, cj])
        corners_b = (back[ci, cj], back[ci, cj + 1], back[ci + 1, cj + 1], back[ci + 1, cj])
        edges = (hidx[ci, cj], vidx[ci, cj + 1], hidx[ci + 1, cj], vidx[ci, cj])
        slots_f = corners_f + edges
        slots_b = corners_b + edges
        for p0, p1, p2 in _FANS[case]:
            # Screen order a->b->c->d is clockwise seen from +Z once Y points up, so the
            # front (normal +Z) reverses it and the back keeps it.
            front_faces.append(np.stack([slots_f[p0], slots_f[p2], slots_f[p1]], axis=1))
            back_faces.append(np.stack([slots_b[p0], slots_b[p1], slots_b[p2]], axis=1))
    faces = np.concatenate(front_faces + back_faces)
    return points, faces


def _shape_stage(state: dict[str, Any], params: GenerationParams, ctx: StageContext) -> None:
    mask = state["preview_mask"]
    total = 4
    ctx.progress(0, total, "sampling the silhouette")
    cells = max(MIN_CELLS, params.resolution // 8)
    while True:
        lat = _Lattice(mask, cells)
        faces = lat.face_count()
        if faces <= params.decimation_target or cells <= MIN_CELLS:
            break
        cells = max(MIN_CELLS, int(cells * math.sqrt(params.decimation_target / faces) * 0.97))
        ctx.progress(0, total, f"coarsening the grid to {cells} cells for the face budget")
    if not lat.inside.any():
        raise InputError(
            ErrorCode.EMPTY_ALPHA, "the subject is too thin or too small to inflate", _EMPTY_HINT
        )
    ctx.progress(1, total, f"grid of {lat.cols}x{lat.rows} cells")
    height = _inflate(lat, ctx, 2, total)
    points, faces = _build_mesh(lat, height, ctx, 3, total)
    h, w = mask.shape
    uv = np.stack([points[:, 0] / w, 1.0 - points[:, 1] / h], axis=1)
    # Image axes to Y-up world axes, then centre in the unit cube with the longest side 1.
    world = points * np.array([1.0, -1.0, 1.0])
    low, high = world.min(axis=0), world.max(axis=0)
    world = (world - (low + high) / 2) / float((high - low).max())
    state["preview_vertices"] = world
    state["preview_faces"] = faces
    state["preview_uv"] = np.clip(uv, 0.0, 1.0)
    ctx.progress(total, total, f"{len(faces)} faces")


# --------------------------------------------------------------------------- texture jobs


def _project_stage(state: dict[str, Any], params: GenerationParams, ctx: StageContext) -> None:
    """The image projected from the front (+Z) onto the mesh, which stays where it is. A mesh
    with UVs keeps them (the texture stage paints the projection into its UV layout); one
    without gets the projection itself as UVs."""
    ctx.progress(0, 2, "reading the mesh")
    fmt = str(state.get("mesh_format", "")).lower()
    data = state.get("mesh_bytes")
    if not isinstance(data, (bytes, bytearray)):
        raise InputError(ErrorCode.BAD_MESH_INPUT, "the mesh must be GLB or PLY bytes")
    mesh = meshes.read_mesh(bytes(data), fmt)
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    kept_uv = getattr(mesh.visual, "uv", None)
    ctx.progress(1, 2, "projecting the image")
    mask = state["preview_mask"]
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    sub_w, sub_h = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
    sub_cx, sub_cy = (xs.max() + 1 + xs.min()) / 2, (ys.max() + 1 + ys.min()) / 2
    low, high = vertices[:, :2].min(axis=0), vertices[:, :2].max(axis=0)
    extent = np.maximum(high - low, 1e-12)
    scale = min(sub_w / extent[0], sub_h / extent[1])  # fit the mesh's front view to the subject
    centre = (low + high) / 2
    state["preview_projection"] = (float(centre[0]), float(centre[1]), float(scale), sub_cx, sub_cy)
    state["preview_vertices"] = vertices
    state["preview_faces"] = faces
    if kept_uv is not None:
        state["preview_uv"] = np.asarray(kept_uv, dtype=np.float64)
        state["preview_kept_uv"] = True
    else:
        px, py = _project(state["preview_projection"], vertices)
        state["preview_uv"] = np.clip(np.stack([px / w, 1.0 - py / h], axis=1), 0.0, 1.0)
    kept = "its own UVs" if kept_uv is not None else "projected UVs"
    ctx.progress(2, 2, f"{len(faces)} faces, {kept}")


def _project(projection: tuple[float, ...], points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Front (+Z) view of 3D points, in the cropped image's pixels (x right, y down)."""
    cx, cy, scale, sub_cx, sub_cy = projection
    return sub_cx + (points[:, 0] - cx) * scale, sub_cy - (points[:, 1] - cy) * scale


# --------------------------------------------------------------------------- texture stage


def _bleed(rgb: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Push-pull fill: every background pixel takes the colour of the nearby foreground."""
    colours = [rgb.astype(np.float32) * weight[..., None]]
    weights = [weight.astype(np.float32)]
    while max(weights[-1].shape) > 1:
        c, wt = colours[-1], weights[-1]
        ph, pw = wt.shape[0] % 2, wt.shape[1] % 2
        if ph or pw:
            c = np.pad(c, ((0, ph), (0, pw), (0, 0)))
            wt = np.pad(wt, ((0, ph), (0, pw)))
        colours.append(c[0::2, 0::2] + c[1::2, 0::2] + c[0::2, 1::2] + c[1::2, 1::2])
        weights.append(wt[0::2, 0::2] + wt[1::2, 0::2] + wt[0::2, 1::2] + wt[1::2, 1::2])
    filled = colours[-1] / np.maximum(weights[-1], 1e-6)[..., None]
    for c, wt in zip(reversed(colours[:-1]), reversed(weights[:-1]), strict=True):
        up = np.repeat(np.repeat(filled, 2, axis=0), 2, axis=1)[: wt.shape[0], : wt.shape[1]]
        here = c / np.maximum(wt, 1e-6)[..., None]
        filled = np.where(wt[..., None] > 0, here, up)
    return np.clip(np.rint(filled), 0, 255).astype(np.uint8)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        inner = out.copy()
        inner[1:] &= out[:-1]
        inner[:-1] &= out[1:]
        inner[:, 1:] &= out[:, :-1]
        inner[:, :-1] &= out[:, 1:]
        out = inner
    return out


def _material_alpha(state: dict[str, Any], alpha: np.ndarray) -> np.ndarray:
    """The image's alpha where it is the material's own transparency, opaque elsewhere.
    Generated meshes are the silhouette, so only alpha well inside it counts (the rim's
    anti-aliasing is the mesh's edge). A projected image says nothing outside the subject's
    outline, but a hole inside it is a hole."""
    mask = state["preview_mask"]
    region = _fill_holes(mask) if "preview_projection" in state else _erode(mask, RIM)
    return np.where(region, alpha, 255).astype(np.uint8)


def _sample(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of an (H, W, C) array at pixel coordinates (edges clamp)."""
    h, w = image.shape[:2]
    x = np.clip(x - 0.5, 0.0, w - 1.0)
    y = np.clip(y - 0.5, 0.0, h - 1.0)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _bake_into_uvs(
    state: dict[str, Any], rgb: np.ndarray, alpha: np.ndarray, size: int, ctx: StageContext
) -> Image.Image:
    """Paint the projected image into the mesh's own UV layout: each covered texel takes the
    image's colour where its surface point projects; uncovered texels take nearby colours."""
    faces, vertices = state["preview_faces"], state["preview_vertices"]
    face_of, bary = surface.rasterize_uv(state["preview_uv"], faces, size)
    ctx.check_cancelled()
    covered = face_of >= 0
    corners = vertices[faces[face_of[covered]]]  # (K, 3, 3)
    points = (corners * bary[covered][..., None]).sum(axis=1)
    px, py = _project(state["preview_projection"], points)
    image = np.concatenate([rgb, alpha[..., None]], axis=2).astype(np.float32)
    painted = np.zeros((size, size, 4), np.float32)
    painted[covered] = _sample(image, px, py)
    ctx.check_cancelled()
    filled = _bleed(painted, covered.astype(np.float32))  # seams sample a little outside
    return Image.fromarray(filled, "RGBA")


def _texture_stage(state: dict[str, Any], params: GenerationParams, ctx: StageContext) -> None:
    ctx.progress(0, 3, "filling the background with edge colours")
    rgba = np.asarray(state["preview_rgba"].convert("RGBA"))
    mask = state["preview_mask"]
    rgb = _bleed(rgba[..., :3], mask.astype(np.float32))
    alpha = _material_alpha(state, rgba[..., 3])
    if state.get("preview_kept_uv"):
        ctx.progress(1, 3, "painting the projection into the mesh's UVs")
        state["preview_texture"] = _bake_into_uvs(state, rgb, alpha, params.texture_size, ctx)
        ctx.progress(3, 3, f"{params.texture_size} px texture in the mesh's own UVs")
        return
    ctx.progress(1, 3, "resizing the texture")
    size = (params.texture_size, params.texture_size)
    # Colour and alpha resize separately: an RGBA resize premultiplies, which would turn the
    # filled background black again and bring the dark fringe back.
    colour = Image.fromarray(rgb, "RGB").resize(size, Image.Resampling.BICUBIC)
    colour.putalpha(Image.fromarray(alpha, "L").resize(size, Image.Resampling.BICUBIC))
    state["preview_texture"] = colour
    ctx.progress(3, 3, f"{params.texture_size} px texture")


# --------------------------------------------------------------------------- export stage


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = vertices[faces]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # area-weighted
    normals = np.zeros_like(vertices)
    for axis in range(3):
        for corner in range(3):
            normals[:, axis] += np.bincount(
                faces[:, corner], weights=face_n[:, axis], minlength=len(vertices)
            )
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return normals / np.where(length > 0, length, 1.0)


@functools.cache
def _one_material() -> type:
    """trimesh's PBRMaterial, hashed by identity. trimesh hashes a material to share it among a
    scene's meshes, by copying every texture's pixels into one bytes object: for a 2048²
    texture three 16 MiB copies and a hash(), 10-20 ms with the GIL held, a preview job's
    longest hold. A preview GLB has one mesh and one material: nothing to share."""
    from trimesh.visual.material import PBRMaterial

    class OneMaterial(PBRMaterial):
        __hash__ = object.__hash__

    return OneMaterial


def _export_stage(state: dict[str, Any], params: GenerationParams, ctx: StageContext) -> None:
    import trimesh
    from trimesh.visual.texture import TextureVisuals

    ctx.progress(0, 3, "building the mesh")
    vertices = state["preview_vertices"]
    faces = state["preview_faces"]
    texture = state["preview_texture"]
    # TRELLIS.2's layout, so one import path serves both engines:
    # roughness in G and metallic in B of a linear texture, factors 1.
    packed = (0, round(ROUGHNESS * 255), round(METALLIC * 255))
    material = _one_material()(
        name="preview",
        baseColorTexture=texture,
        metallicRoughnessTexture=Image.new("RGB", (MR_TEXTURE_SIZE,) * 2, packed),
        metallicFactor=1.0,
        roughnessFactor=1.0,
        doubleSided=False,
    )
    mesh = trimesh.Trimesh(
        vertices=vertices,
        faces=faces,
        vertex_normals=_vertex_normals(vertices, faces),
        visual=TextureVisuals(uv=state["preview_uv"], material=material),
        process=False,
    )
    surface.mark_alpha_mode(mesh)
    ctx.progress(1, 3, "encoding the GLB")
    data = mesh.export(file_type="glb", include_normals=True)
    ctx.progress(2, 3, "writing the GLB")
    path = Path(state["output_path"])
    path.write_bytes(data)
    state["glb_path"] = state["output_path"]  # the same object the runner handed in
    state["mesh_stats"] = {
        "vertices": len(vertices),
        "faces": len(faces),
        "texture_size": texture.width,
    }
    state["mesh_arrays"] = (vertices, faces)
    ctx.progress(3, 3, f"{len(data) // 1024} KiB")
