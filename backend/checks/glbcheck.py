"""GLB files: header, chunks, JSON, accessors and buffer views in bounds, images and
materials, checked structurally before a result is published."""

from __future__ import annotations

import base64
import binascii
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ErrorCode, OutputError, describe

# A hand-written structural checker. The Python options do not catch broken files:
# pygltflib's validator reports "0 errors" on truncated files and out-of-range indices, and
# trimesh loads some broken files silently. The Khronos
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
            ErrorCode.INVALID_GLB, f"Invalid GLB (could not check: {describe(exc)})."
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
            raise _Invalid(f"the JSON chunk does not parse: {describe(exc)}") from None
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
