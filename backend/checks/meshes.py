"""Meshes sent for texturing: the GLB a client writes (positions, triangles, UVs) and the
reader both engines parse it with. One reader, so both engines keep the same things: the
triangles in place and the UVs when the mesh has them; materials and normals are dropped."""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import numpy as np

from ..errors import ErrorCode, InputError
from ..params import TEXTURE_MAX_FACES

FORMATS = ("glb", "ply")
MAX_UPLOAD_BYTES = 512 << 20  # the mesh of one texture request
_FLOAT, _UINT = 5126, 5125  # glTF component types
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963


def checked_upload(mesh_format: str, data: bytes) -> str:
    """The format of the mesh a texture request carries (lower case), or bad_mesh_input:
    the backend and the gateway refuse the same uploads before queueing anything."""
    fmt = mesh_format.lower()
    if fmt not in FORMATS:
        raise InputError(ErrorCode.BAD_MESH_INPUT, f"mesh_format must be one of {FORMATS}")
    if not data or len(data) > MAX_UPLOAD_BYTES:
        raise InputError(ErrorCode.BAD_MESH_INPUT, f"mesh of {len(data)} bytes")
    return fmt


def _pad(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def write_glb(positions: Any, triangles: Any, uv: Any | None = None) -> bytes:
    """A minimal GLB 2.0: one mesh of triangles, POSITION (Y-up, as glTF wants) and, when
    given, TEXCOORD_0. `uv` has v up (Blender's and trimesh's convention); glTF's v points
    down, so it is flipped here."""
    positions = np.ascontiguousarray(positions, dtype="<f4").reshape(-1, 3)
    triangles = np.ascontiguousarray(triangles, dtype="<u4").reshape(-1, 3)
    views, accessors, blobs = [], [], []
    offset = 0

    def add(array: np.ndarray, target: int, accessor: dict[str, Any]) -> int:
        nonlocal offset
        data = _pad(array.tobytes(), b"\0")
        views.append(
            {"buffer": 0, "byteOffset": offset, "byteLength": array.nbytes, "target": target}
        )
        accessors.append({"bufferView": len(views) - 1, **accessor})
        blobs.append(data)
        offset += len(data)
        return len(accessors) - 1

    attributes = {
        "POSITION": add(
            positions,
            _ARRAY_BUFFER,
            {
                "componentType": _FLOAT,
                "count": len(positions),
                "type": "VEC3",
                "min": positions.min(axis=0).tolist() if len(positions) else [0, 0, 0],
                "max": positions.max(axis=0).tolist() if len(positions) else [0, 0, 0],
            },
        )
    }
    if uv is not None:
        flipped = np.array(uv, dtype="<f4").reshape(-1, 2)
        flipped[:, 1] = 1.0 - flipped[:, 1]
        attributes["TEXCOORD_0"] = add(
            flipped, _ARRAY_BUFFER, {"componentType": _FLOAT, "count": len(flipped), "type": "VEC2"}
        )
    indices = add(
        triangles.ravel(),
        _ELEMENT_ARRAY_BUFFER,
        {"componentType": _UINT, "count": triangles.size, "type": "SCALAR"},
    )
    doc = {
        "asset": {"version": "2.0", "generator": "trellis2_blender"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
        # trimesh reads TEXCOORD_0 only from a primitive with a material: a plain one.
        "materials": [{"name": "input", "pbrMetallicRoughness": {}}],
        "meshes": [{"primitives": [{"attributes": attributes, "indices": indices, "material": 0}]}],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": offset}],
    }
    text = _pad(json.dumps(doc, separators=(",", ":")).encode(), b" ")
    binary = b"".join(blobs)
    total = 12 + 8 + len(text) + 8 + len(binary)
    return b"".join(
        (
            struct.pack("<4sII", b"glTF", 2, total),
            struct.pack("<I4s", len(text), b"JSON"),
            text,
            struct.pack("<I4s", len(binary), b"BIN\0"),
            binary,
        )
    )


def _bad(message: str) -> InputError:
    return InputError(ErrorCode.BAD_MESH_INPUT, message)


def _uv_of(mesh: Any) -> np.ndarray | None:
    uv = getattr(getattr(mesh, "visual", None), "uv", None)
    if uv is None:
        return None
    uv = np.asarray(uv, dtype=np.float64)
    if uv.shape != (len(mesh.vertices), 2) or not np.isfinite(uv).all():
        return None
    return uv


def _placed_faces(scene: Any) -> int:
    """Triangles of a scene as placed: each mesh's count times the nodes that place it."""
    total = 0
    for name, nodes in scene.graph.geometry_nodes.items():
        faces = getattr(scene.geometry.get(name), "faces", None)
        if faces is not None:
            total += len(faces) * len(nodes)
    return total


def read_mesh(data: bytes, fmt: str) -> Any:
    """The triangles of a GLB or PLY as one trimesh.Trimesh in the file's own frame, with its
    UVs (as `visual.uv`, v up) when every part has them. Bad input is BAD_MESH_INPUT."""
    import trimesh
    from trimesh.visual.texture import TextureVisuals

    fmt = (fmt or "").lower().lstrip(".")
    if fmt not in FORMATS:
        raise _bad(f"unsupported mesh format {fmt!r}; use one of {', '.join(FORMATS)}")
    try:
        loaded = trimesh.load(io.BytesIO(bytes(data)), file_type=fmt, process=False)
        if isinstance(loaded, trimesh.Scene):
            placed = _placed_faces(loaded)
            if placed > TEXTURE_MAX_FACES:  # before copying each placement: a small file
                # can place one mesh thousands of times
                raise _bad(f"the mesh has {placed:,} triangles; at most {TEXTURE_MAX_FACES:,}")
        parts = loaded.dump() if isinstance(loaded, trimesh.Scene) else [loaded]
    except InputError:
        raise
    except Exception as exc:  # trimesh raises many types on bad files; all mean the same
        # (an ImportError: trimesh reaching for an optional text decoder on a damaged file)
        reason = "it is damaged" if isinstance(exc, ImportError) else exc
        raise _bad(f"cannot read the {fmt} mesh: {reason}") from None
    parts = [p for p in parts if isinstance(p, trimesh.Trimesh) and len(p.faces)]
    if not parts:
        raise _bad("the mesh has no triangles")
    vertices, faces, uvs, base = [], [], [], 0
    for part in parts:
        vertices.append(np.asarray(part.vertices, dtype=np.float64))
        faces.append(np.asarray(part.faces, dtype=np.int64) + base)
        uvs.append(_uv_of(part))
        base += len(part.vertices)
    vertices, faces = np.concatenate(vertices), np.concatenate(faces)
    if len(faces) > TEXTURE_MAX_FACES:
        raise _bad(f"the mesh has {len(faces):,} triangles; at most {TEXTURE_MAX_FACES:,}")
    if not np.isfinite(vertices).all():
        raise _bad("the mesh has non-finite vertex positions")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise _bad("the mesh's triangles point past its vertices")
    if (vertices.max(0) - vertices.min(0)).max() <= 0:
        raise _bad("the mesh has zero size")
    visual = None
    if all(uv is not None for uv in uvs):
        visual = TextureVisuals(uv=np.concatenate(uvs))
    return trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)
