"""Checks on what enters and leaves the backend: input images, generated meshes and GLB files."""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import ErrorCode, InputError, OutputError

# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 12_000
    min_side: int = 8


# Only formats a user plausibly feeds to image-to-3D. Pillow would otherwise also try EPS
# (which shells out to Ghostscript), PSD, FITS, DDS and others: more attack surface, no gain.
# (MPO, a JPEG variant from cameras, comes through the JPEG opener.)
_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "ICO", "TGA", "AVIF")


def _open_formats() -> list[str]:
    # Pillow raises KeyError for a format it has no plugin for (AVIF is new in Pillow 11.2).
    Image.init()
    return [name for name in _IMAGE_FORMATS if name in Image.OPEN]


# TRELLIS.2's preprocessing crops the bounding box of alpha > 0.8 * 255; with no such pixel
# the crop is empty and it crashes, so such an image is refused up front.
_ALPHA_CROP_THRESHOLD = int(0.8 * 255)  # 204: a pixel counts when alpha > 204

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _bad_image(message: str, hint: str | None = None) -> InputError:
    return InputError(ErrorCode.BAD_IMAGE, message, hint)


def _too_large(message: str) -> InputError:
    return InputError(
        ErrorCode.IMAGE_TOO_LARGE,
        message,
        "Scale the image down (for example to 2048 px on its longer side) and try again.",
    )


def _check_dimensions(width: int, height: int, limits: ImageLimits, what: str = "image") -> None:
    if width * height > limits.max_pixels:
        raise _too_large(
            f"The {what} is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {limits.max_pixels:,}."
        )
    if max(width, height) > limits.max_side:
        raise _too_large(
            f"The {what} is {width}x{height}; no side may exceed {limits.max_side} px."
        )
    if min(width, height) < limits.min_side:
        raise _bad_image(
            f"The {what} is {width}x{height}; each side needs at least {limits.min_side} px.",
            "Use a larger image (at least 256 px on each side works best).",
        )


def _check_ico_entries(data: bytes, limits: ImageLimits) -> None:
    """ICO files may embed PNGs whose real size differs from the directory entry, and Pillow
    decodes the embedded PNG before noticing: check those PNG headers ourselves first."""
    if len(data) < 6:
        return
    _reserved, _kind, count = struct.unpack_from("<HHH", data, 0)
    for i in range(min(count, 256)):
        entry = 6 + 16 * i
        if entry + 16 > len(data):
            return
        offset = struct.unpack_from("<I", data, entry + 12)[0]
        head = data[offset : offset + 24]
        if len(head) == 24 and head.startswith(b"\x89PNG\r\n\x1a\n"):
            width, height = struct.unpack(">II", head[16:24])
            _check_dimensions(width, height, limits, what="image inside the icon")


def load_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode untrusted image bytes into a loaded 8-bit "RGB" or "RGBA" image (RGBA only when
    the alpha channel is actually used), or raise InputError. Sizes are checked before decoding."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _bad_image(f"Expected image bytes, got {type(data).__name__}.")
    data = bytes(data)
    if len(data) == 0:
        raise _bad_image("The image is empty (0 bytes).")
    if len(data) > limits.max_bytes:
        raise _too_large(
            f"The image file is {len(data):,} bytes; the limit is {limits.max_bytes:,}."
        )

    if data[:4] == b"\x00\x00\x01\x00":
        _check_ico_entries(data, limits)  # Pillow decodes icons inside Image.open already

    # Silence Pillow's warnings while decoding: DecompressionBombWarning because our own,
    # stricter limits decide; "corrupt EXIF" and the like because they only flood the log.
    # (catch_warnings is process-wide; a racing thread can at worst lose or show a warning.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data), formats=_open_formats())
        except Image.DecompressionBombError:
            raise _too_large(_BOMB_MESSAGE) from None
        except Image.UnidentifiedImageError:
            kind = _sniff(data)
            if kind:
                raise _bad_image(
                    f"The {kind} file is corrupt: its header cannot be read."
                ) from None
            raise _bad_image(
                "The data is not an image in a supported format "
                "(PNG, JPEG, WebP, GIF, BMP, TIFF, ICO, TGA)."
            ) from None
        except Exception as exc:  # Pillow raises many types on malformed headers
            raise _bad_image(f"The image header is corrupt: {_describe(exc)}.") from None

        try:
            width, height = image.size
            _check_dimensions(width, height, limits)
            if getattr(image, "is_animated", False):
                image.seek(0)  # animations: the first frame is the picture
            image.load()
            if image.size != (width, height):  # some decoders only learn the size when loading
                _check_dimensions(*image.size, limits)
        except InputError:
            raise
        except Image.DecompressionBombError:
            raise _too_large(_BOMB_MESSAGE) from None
        except MemoryError:
            raise _too_large("Not enough memory to decode the image.") from None
        except Exception as exc:  # truncated data, bad CRC, zlib errors, broken frames...
            raise _bad_image(f"The image is truncated or corrupt: {_describe(exc)}.") from None

        image = _apply_orientation(image)
        try:
            out = _to_8bit(image)
        except Exception as exc:
            raise _bad_image(
                f"The image's pixel format cannot be used: {_describe(exc)}."
            ) from None

    if out.mode == "RGBA":
        alpha = np.asarray(out.getchannel("A"))
        if int(alpha.min()) == 255:
            return out.convert("RGB")  # an alpha channel that hides nothing is no alpha
        peak = int(alpha.max())
        if peak == 0:
            raise InputError(ErrorCode.EMPTY_ALPHA, "The image is fully transparent.")
        if peak <= _ALPHA_CROP_THRESHOLD:
            raise InputError(
                ErrorCode.EMPTY_ALPHA,
                f"The image is almost fully transparent (highest alpha {peak} of 255; "
                f"the subject needs alpha above {_ALPHA_CROP_THRESHOLD}).",
                "Make the subject opaque, or remove the alpha channel to let the "
                "background be removed automatically.",
            )
    return out


_BOMB_MESSAGE = "The image declares an enormous number of pixels (a decompression bomb?)."

_SIGNATURES = (
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:200]


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        rotated = ImageOps.exif_transpose(image)
    except Exception:
        return image  # corrupt EXIF: show the pixels as stored rather than refuse the image
    return rotated if rotated is not None else image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to a new 8-bit RGB or RGBA image, scaling wide modes."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            values = _stretch(values.astype(np.float64))
        else:
            # 16-bit levels to 8-bit, rounding (Pillow's own convert("L") clips at 255)
            values = (values * 255 + 32767) // 65535
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            levels = np.round(values * 255.0)
        else:
            levels = _stretch(values)
        return Image.fromarray(levels.astype(np.uint8)).convert("RGB")
    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        return image.convert("RGBA" if has_alpha else "RGB")
    if mode in _ALPHA_MODES:
        return image.convert("RGBA")
    if mode in ("L", "1") and "transparency" in image.info:
        return image.convert("RGBA")
    return image.convert("RGB")  # RGB (a copy), L, 1, CMYK, YCbCr, LAB, HSV, RGBX...


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return np.round((values - low) * (255.0 / (high - low)))


def has_usable_alpha(image: Image.Image) -> bool:
    """True when the image carries an alpha channel that both hides something and keeps
    something (some pixel below 255, some above TRELLIS.2's crop threshold)."""
    if image.mode == "P":
        if "transparency" not in image.info:
            return False
        image = image.convert("RGBA")
    elif image.mode not in _ALPHA_MODES:
        return False
    alpha = np.asarray(image.getchannel(image.getbands()[-1]))
    if alpha.size == 0:
        return False
    return int(alpha.min()) < 255 and int(alpha.max()) > _ALPHA_CROP_THRESHOLD


# ----------------------------------------------------------------------------------------------
# Meshes
# ----------------------------------------------------------------------------------------------

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
        raise _bad_mesh(f"Mesh arrays cannot be read: {_describe(exc)}") from None
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


# ----------------------------------------------------------------------------------------------
# GLB
# ----------------------------------------------------------------------------------------------
# A hand-written structural checker. The Python options do not catch broken files:
# pygltflib's validator reports "0 errors" on truncated files and out-of-range indices, and
# trimesh loads some broken files silently (reference/feasibility.md §5). The Khronos
# validator (node) is used in tests, but the backend must not depend on node at run time.

_GLB_MAGIC = b"glTF"
_CHUNK_JSON = 0x4E4F534A
_CHUNK_BIN = 0x004E4942
_COMPONENT_SIZE = {5120: 1, 5121: 1, 5122: 2, 5123: 2, 5125: 4, 5126: 4}
_COMPONENT_DTYPE = {5120: "<i1", 5121: "<u1", 5122: "<i2", 5123: "<u2", 5125: "<u4", 5126: "<f4"}
_TYPE_COMPONENTS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}
_INDEX_COMPONENTS = (5121, 5123, 5125)
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)
_MATERIAL_TEXTURES = (
    ("pbrMetallicRoughness", "baseColorTexture"),
    ("pbrMetallicRoughness", "metallicRoughnessTexture"),
    (None, "normalTexture"),
    (None, "occlusionTexture"),
    (None, "emissiveTexture"),
)


class _Invalid(Exception):
    """Internal: what is wrong with the GLB (turned into OutputError at the API boundary)."""


def validate_glb(data: bytes) -> dict:
    """Check a GLB's structure and data bounds; return a summary report or raise OutputError."""
    try:
        return _GlbChecker(bytes(data)).run()
    except _Invalid as exc:
        raise OutputError(ErrorCode.INVALID_GLB, f"Invalid GLB: {exc}") from None
    except RecursionError:
        raise OutputError(ErrorCode.INVALID_GLB, "Invalid GLB: JSON nested too deeply.") from None
    except Exception as exc:
        # Safety net: a shape of JSON the checks above did not anticipate.
        raise OutputError(
            ErrorCode.INVALID_GLB, f"Invalid GLB (could not check: {_describe(exc)})."
        ) from None


def validate_glb_file(path: str | Path) -> dict:
    """validate_glb on a file's contents; an unreadable file is an invalid GLB too."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise OutputError(ErrorCode.INVALID_GLB, f"Cannot read GLB {path}: {exc}") from None
    return validate_glb(data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _GlbChecker:
    def __init__(self, data: bytes):
        self.data = data
        self.warnings: list[str] = []
        self.bin: bytes | None = None
        self.buffers: list[bytes] = []
        self.doc: dict = {}

    # -- helpers ------------------------------------------------------------------------------

    def _array(self, key: str) -> list[dict]:
        value = self.doc.get(key, [])
        if not isinstance(value, list):
            raise _Invalid(f"'{key}' must be an array.")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise _Invalid(f"{key}[{i}] must be an object.")
        return value

    @staticmethod
    def _index(owner: dict, key: str, where: str, size: int, target: str, required=False):
        if key not in owner:
            if required:
                raise _Invalid(f"{where} has no '{key}'.")
            return None
        value = owner[key]
        if not _is_int(value) or not 0 <= value < size:
            raise _Invalid(
                f"{where}.{key} = {value!r} is not a valid {target} index (0..{size - 1})."
            )
        return value

    @staticmethod
    def _int(owner: dict, key: str, where: str, default: int | None = None, minimum: int = 0):
        value = owner.get(key, default)
        if value is None:
            raise _Invalid(f"{where} has no '{key}'.")
        if not _is_int(value) or value < minimum:
            raise _Invalid(f"{where}.{key} = {value!r} must be an integer >= {minimum}.")
        return value

    # -- container ----------------------------------------------------------------------------

    def _read_container(self) -> bytes:
        data = self.data
        if len(data) < 12:
            raise _Invalid(f"{len(data)} bytes is too short for a GLB header (12 bytes).")
        magic, version, length = struct.unpack_from("<4sII", data, 0)
        if magic != _GLB_MAGIC:
            raise _Invalid(f"bad magic {magic!r} (expected b'glTF').")
        if version != 2:
            raise _Invalid(f"container version {version} (expected 2).")
        if length != len(data):
            raise _Invalid(f"header says {length} bytes but the file has {len(data)}.")
        json_bytes: bytes | None = None
        offset, index = 12, 0
        while offset < len(data):
            remaining = len(data) - offset
            if remaining < 8:
                # Padding belongs inside chunks; Blender's importer fails on a partial chunk
                # header and the Khronos validator reports GLB_UNEXPECTED_END_OF_CHUNK_HEADER.
                raise _Invalid(f"{remaining} stray bytes after the last chunk.")
            chunk_length, chunk_type = struct.unpack_from("<II", data, offset)
            start, end = offset + 8, offset + 8 + chunk_length
            if end > len(data):
                raise _Invalid(f"chunk {index} ({chunk_length} bytes) runs past the end of file.")
            if chunk_length % 4:
                raise _Invalid(f"chunk {index} length {chunk_length} is not a multiple of 4.")
            if index == 0:
                if chunk_type != _CHUNK_JSON:
                    raise _Invalid("the first chunk is not the JSON chunk.")
                json_bytes = data[start:end]
            elif index == 1 and chunk_type == _CHUNK_BIN:
                self.bin = data[start:end]
            elif chunk_type in (_CHUNK_JSON, _CHUNK_BIN):
                raise _Invalid(
                    f"unexpected {'JSON' if chunk_type == _CHUNK_JSON else 'BIN'} "
                    f"chunk at position {index}."
                )
            else:
                self.warnings.append(f"unknown chunk type 0x{chunk_type:08x} ignored.")
            offset, index = end, index + 1
        if json_bytes is None:
            raise _Invalid("no JSON chunk.")
        return json_bytes

    def _parse_json(self, raw: bytes) -> None:
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Invalid(f"the JSON chunk does not parse: {_describe(exc)}") from None
        if not isinstance(doc, dict):
            raise _Invalid(f"the JSON chunk is a {type(doc).__name__}, not an object.")
        asset = doc.get("asset")
        if not isinstance(asset, dict):
            raise _Invalid("no 'asset' object.")
        if asset.get("version") != "2.0":
            raise _Invalid(f"asset.version is {asset.get('version')!r}, expected '2.0'.")
        self.doc = doc

    # -- buffers, views, accessors --------------------------------------------------------------

    def _load_buffers(self) -> None:
        for i, buf in enumerate(self._array("buffers")):
            where = f"buffers[{i}]"
            length = self._int(buf, "byteLength", where, minimum=1)
            uri = buf.get("uri")
            if uri is None:
                if i != 0:
                    raise _Invalid(f"{where} has no uri; only buffer 0 may live in the BIN chunk.")
                if self.bin is None:
                    raise _Invalid(f"{where} refers to the BIN chunk, but there is none.")
                if length > len(self.bin):
                    raise _Invalid(
                        f"{where}.byteLength {length} exceeds the BIN chunk "
                        f"({len(self.bin)} bytes)."
                    )
                content = self.bin
            else:
                content = self._data_uri(uri, where)
                if len(content) < length:
                    raise _Invalid(
                        f"{where} holds {len(content)} bytes, less than its byteLength {length}."
                    )
            self.buffers.append(content[:length])
        if self.bin is not None and (not self.buffers or self.doc["buffers"][0].get("uri")):
            self.warnings.append("the BIN chunk is not used by any buffer.")

    @staticmethod
    def _data_uri(uri: Any, where: str) -> bytes:
        if not isinstance(uri, str):
            raise _Invalid(f"{where}.uri must be a string.")
        if not uri.startswith("data:"):
            raise _Invalid(
                f"{where} refers to an external file ({uri[:60]!r}); a GLB result "
                "must be self-contained."
            )
        header, _, payload = uri.partition(",")
        if not header.endswith(";base64"):
            raise _Invalid(f"{where}.uri is a data URI without base64 encoding.")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _Invalid(f"{where}.uri has invalid base64 data.") from None

    def _check_views(self) -> list[dict]:
        views = self._array("bufferViews")
        for i, view in enumerate(views):
            where = f"bufferViews[{i}]"
            buf = self._index(view, "buffer", where, len(self.buffers), "buffer", required=True)
            offset = self._int(view, "byteOffset", where, default=0)
            length = self._int(view, "byteLength", where, minimum=1)
            if offset + length > len(self.buffers[buf]):
                raise _Invalid(
                    f"{where} (bytes {offset}..{offset + length}) runs past the end "
                    f"of buffer {buf} ({len(self.buffers[buf])} bytes)."
                )
            if "byteStride" in view:
                stride = view["byteStride"]
                if not _is_int(stride) or not 4 <= stride <= 252 or stride % 4:
                    raise _Invalid(
                        f"{where}.byteStride {stride!r} must be a multiple of 4 in 4..252."
                    )
        return views

    @staticmethod
    def _element_size(component: int, kind: str) -> int:
        size, count = _COMPONENT_SIZE[component], _TYPE_COMPONENTS[kind]
        # Matrix columns start 4-byte aligned, which pads 1- and 2-byte matrices.
        if kind == "MAT2" and size == 1:
            return 8
        if kind == "MAT3" and size in (1, 2):
            return 12 * size
        return size * count

    def _check_accessors(self, views: list[dict]) -> list[dict]:
        accessors = self._array("accessors")
        for i, acc in enumerate(accessors):
            where = f"accessors[{i}]"
            component = acc.get("componentType")
            if not _is_int(component) or component not in _COMPONENT_SIZE:
                raise _Invalid(f"{where}.componentType {component!r} is not valid.")
            kind = acc.get("type")
            if not isinstance(kind, str) or kind not in _TYPE_COMPONENTS:
                raise _Invalid(f"{where}.type {kind!r} is not valid.")
            count = self._int(acc, "count", where, minimum=1)
            offset = self._int(acc, "byteOffset", where, default=0)
            if offset % _COMPONENT_SIZE[component]:
                raise _Invalid(f"{where}.byteOffset {offset} is not aligned to its component size.")
            if "bufferView" in acc:
                view_index = self._index(acc, "bufferView", where, len(views), "bufferView")
                view = views[view_index]
                element = self._element_size(component, kind)
                stride = view.get("byteStride", element)
                if stride < element:
                    raise _Invalid(
                        f"{where}: bufferView {view_index} byteStride {stride} is "
                        f"smaller than one element ({element} bytes)."
                    )
                needed = offset + stride * (count - 1) + element
                if needed > view["byteLength"]:
                    raise _Invalid(
                        f"{where} needs {needed} bytes but bufferView {view_index} "
                        f"has {view['byteLength']}."
                    )
            if "sparse" in acc:
                self._check_sparse(acc, where, count, views)
        return accessors

    def _check_sparse(self, acc: dict, where: str, count: int, views: list[dict]) -> None:
        sparse = acc["sparse"]
        if not isinstance(sparse, dict):
            raise _Invalid(f"{where}.sparse must be an object.")
        n = self._int(sparse, "count", f"{where}.sparse", minimum=1)
        if n > count:
            raise _Invalid(f"{where}.sparse.count {n} exceeds the accessor count {count}.")
        for part in ("indices", "values"):
            block = sparse.get(part)
            if not isinstance(block, dict):
                raise _Invalid(f"{where}.sparse has no '{part}' object.")
            self._index(
                block,
                "bufferView",
                f"{where}.sparse.{part}",
                len(views),
                "bufferView",
                required=True,
            )

    def _read(self, acc: dict, views: list[dict]) -> np.ndarray:
        """The accessor's elements as a [count, components] array (zeros when it has no view)."""
        component, kind, count = acc["componentType"], acc["type"], acc["count"]
        ncomp = _TYPE_COMPONENTS[kind]
        dtype = np.dtype(_COMPONENT_DTYPE[component])
        if "bufferView" not in acc:
            return np.zeros((count, ncomp), dtype=dtype)
        view = views[acc["bufferView"]]
        buffer = self.buffers[view["buffer"]]
        start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        stride = view.get("byteStride", dtype.itemsize * ncomp)
        return np.ndarray(
            shape=(count, ncomp),
            dtype=dtype,
            buffer=buffer,
            offset=start,
            strides=(stride, dtype.itemsize),
        )

    # -- meshes, materials, images --------------------------------------------------------------

    def _check_meshes(self, accessors: list[dict], views: list[dict], n_materials: int):
        meshes = self._array("meshes")
        n_primitives = n_vertices = n_triangles = 0
        for m, mesh in enumerate(meshes):
            prims = mesh.get("primitives")
            if not isinstance(prims, list) or not prims:
                raise _Invalid(f"meshes[{m}] has no primitives.")
            for p, prim in enumerate(prims):
                where = f"meshes[{m}].primitives[{p}]"
                if not isinstance(prim, dict):
                    raise _Invalid(f"{where} must be an object.")
                attributes = prim.get("attributes")
                if not isinstance(attributes, dict) or "POSITION" not in attributes:
                    raise _Invalid(f"{where} has no POSITION attribute.")
                pos_index = self._index(
                    attributes, "POSITION", f"{where}.attributes", len(accessors), "accessor"
                )
                position = accessors[pos_index]
                if position["type"] != "VEC3" or position["componentType"] != 5126:
                    raise _Invalid(f"{where}: POSITION must be float VEC3.")
                if not (
                    isinstance(position.get("min"), list) and isinstance(position.get("max"), list)
                ):
                    raise _Invalid(f"{where}: POSITION accessor {pos_index} has no min/max.")
                n_points = position["count"]
                for name in attributes:
                    acc_index = self._index(
                        attributes, name, f"{where}.attributes", len(accessors), "accessor"
                    )
                    if accessors[acc_index]["count"] != n_points:
                        raise _Invalid(
                            f"{where}: attribute {name} has "
                            f"{accessors[acc_index]['count']} elements, POSITION has "
                            f"{n_points}."
                        )
                if not np.isfinite(self._read(position, views)).all():
                    raise _Invalid(f"{where}: POSITION has NaN or infinite values.")
                mode = prim.get("mode", 4)
                if not _is_int(mode) or not 0 <= mode <= 6:
                    raise _Invalid(f"{where}.mode {mode!r} is not valid.")
                self._index(prim, "material", where, n_materials, "material")
                n_elements = n_points
                if "indices" in prim:
                    idx_index = self._index(prim, "indices", where, len(accessors), "accessor")
                    indices = accessors[idx_index]
                    if (
                        indices["type"] != "SCALAR"
                        or indices["componentType"] not in _INDEX_COMPONENTS
                    ):
                        raise _Invalid(f"{where}: indices must be unsigned integer scalars.")
                    view = views[indices["bufferView"]] if "bufferView" in indices else {}
                    if "byteStride" in view:
                        raise _Invalid(f"{where}: the indices' bufferView must not have a stride.")
                    values = self._read(indices, views)
                    n_elements = indices["count"]
                    top = int(values.max())
                    if top >= n_points:
                        raise _Invalid(
                            f"{where}: index {top} is out of range for {n_points} vertices."
                        )
                if mode == 4:
                    if n_elements % 3:
                        raise _Invalid(f"{where}: {n_elements} indices is not a multiple of 3.")
                    n_triangles += n_elements // 3
                elif mode in (5, 6):
                    n_triangles += max(n_elements - 2, 0)
                n_primitives += 1
                n_vertices += n_points
        return len(meshes), n_primitives, n_vertices, n_triangles

    def _check_images(self, views: list[dict], used: list) -> list[str]:
        mimes = []
        for i, image in enumerate(self._array("images")):
            where = f"images[{i}]"
            if "bufferView" in image:
                view_index = self._index(image, "bufferView", where, len(views), "bufferView")
                view = views[view_index]
                start = view.get("byteOffset", 0)
                content = self.buffers[view["buffer"]][start : start + 16]
                declared = image.get("mimeType")
                if declared is None:
                    raise _Invalid(f"{where} is stored in a bufferView but has no mimeType.")
            elif "uri" in image:
                content = self._data_uri(image["uri"], where)[:16]
                declared = image.get("mimeType")
            else:
                raise _Invalid(f"{where} has neither a bufferView nor a uri.")
            actual = next((mime for magic, mime in _IMAGE_MAGIC if content.startswith(magic)), None)
            if actual is None and content[:4] == b"RIFF" and content[8:12] == b"WEBP":
                if "EXT_texture_webp" not in used:
                    raise _Invalid(f"{where} is WebP but EXT_texture_webp is not used.")
                actual = "image/webp"
            if actual is None:
                raise _Invalid(f"{where} is neither PNG nor JPEG (starts {content[:8]!r}).")
            if declared is not None and declared != actual:
                raise _Invalid(f"{where} declares {declared!r} but contains {actual}.")
            mimes.append(actual)
        return mimes

    def _check_textures(self, n_images: int) -> int:
        textures = self._array("textures")
        n_samplers = len(self._array("samplers"))
        for i, texture in enumerate(textures):
            where = f"textures[{i}]"
            self._index(texture, "source", where, n_images, "image")
            self._index(texture, "sampler", where, n_samplers, "sampler")
            extensions = texture.get("extensions", {})
            if isinstance(extensions, dict):
                for name in ("EXT_texture_webp", "KHR_texture_basisu"):
                    ext = extensions.get(name)
                    if isinstance(ext, dict):
                        self._index(ext, "source", f"{where}.extensions.{name}", n_images, "image")
        return len(textures)

    def _check_materials(self, n_textures: int) -> int:
        materials = self._array("materials")
        for i, material in enumerate(materials):
            for group, key in _MATERIAL_TEXTURES:
                owner = material.get(group, {}) if group else material
                where = f"materials[{i}]" + (f".{group}" if group else "")
                if not isinstance(owner, dict):
                    raise _Invalid(f"{where} must be an object.")
                info = owner.get(key)
                if info is None:
                    continue
                if not isinstance(info, dict):
                    raise _Invalid(f"{where}.{key} must be an object.")
                self._index(info, "index", f"{where}.{key}", n_textures, "texture", required=True)
        return len(materials)

    def _check_nodes(self, n_meshes: int) -> None:
        nodes = self._array("nodes")
        for i, node in enumerate(nodes):
            self._index(node, "mesh", f"nodes[{i}]", n_meshes, "mesh")
            children = node.get("children", [])
            if not isinstance(children, list) or not all(
                _is_int(c) and 0 <= c < len(nodes) for c in children
            ):
                raise _Invalid(f"nodes[{i}].children has an invalid node index.")
        scenes = self._array("scenes")
        for i, scene in enumerate(scenes):
            roots = scene.get("nodes", [])
            if not isinstance(roots, list) or not all(
                _is_int(c) and 0 <= c < len(nodes) for c in roots
            ):
                raise _Invalid(f"scenes[{i}].nodes has an invalid node index.")
        self._index(self.doc, "scene", "the document", len(scenes), "scene")

    def _extension_lists(self) -> tuple[list, list]:
        lists = []
        for key in ("extensionsUsed", "extensionsRequired"):
            value = self.doc.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _Invalid(f"'{key}' must be an array of strings.")
            lists.append(value)
        used, required = lists
        missing = [name for name in required if name not in used]
        if missing:
            raise _Invalid(f"extensionsRequired lists {missing} but extensionsUsed does not.")
        if "EXT_texture_webp" in required:
            self.warnings.append(
                "EXT_texture_webp is required: Blender before 4.2 cannot import WebP textures."
            )
        return used, required

    def run(self) -> dict:
        self._parse_json(self._read_container())
        used, required = self._extension_lists()
        self._load_buffers()
        views = self._check_views()
        accessors = self._check_accessors(views)
        mimes = self._check_images(views, used)
        n_textures = self._check_textures(len(mimes))
        n_materials = self._check_materials(n_textures)
        n_meshes, n_primitives, n_vertices, n_triangles = self._check_meshes(
            accessors, views, n_materials
        )
        self._check_nodes(n_meshes)
        if n_meshes == 0:
            self.warnings.append("the file contains no meshes.")
        return {
            "meshes": n_meshes,
            "primitives": n_primitives,
            "vertices": n_vertices,
            "triangles": n_triangles,
            "images": len(mimes),
            "image_mime_types": mimes,
            "materials": n_materials,
            "extensions_required": list(required),
            "warnings": list(self.warnings),
        }


__all__ = [
    "ImageLimits",
    "load_image",
    "has_usable_alpha",
    "validate_mesh",
    "validate_glb",
    "validate_glb_file",
]
