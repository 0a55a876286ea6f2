"""The active mesh object as a texture request sends it: modifiers applied, in world space,
converted to glTF's Y-up, with its UV map when it has one (backend.checks.meshes reads it), and why
it cannot be sent (the Texture button's poll message)."""

from __future__ import annotations

from dataclasses import dataclass

import bpy
import numpy as np

from ..backend.checks.meshes import write_glb
from ..backend.params import TEXTURE_MAX_FACES


@dataclass
class SentMesh:
    data: bytes  # the GLB
    triangles: int
    uv_map: str  # the UV map sent ("" when the mesh has none)
    modifiers_applied: bool


def triangle_count(mesh: bpy.types.Mesh) -> int:
    """Triangles after triangulation, without triangulating: every polygon of n corners
    makes n - 2 (O(1): two lengths)."""
    return len(mesh.loops) - 2 * len(mesh.polygons)


def render_uv_layer(mesh: bpy.types.Mesh):
    """The UV map a new material's textures use by default (the render-active one)."""
    return next((layer for layer in mesh.uv_layers if layer.active_render), mesh.uv_layers.active)


def evaluated_mesh(context: bpy.types.Context, obj: bpy.types.Object) -> bpy.types.Mesh:
    """The mesh with modifiers as last evaluated: the view layer's depsgraph, read without
    asking for an update (polls and drawing must not evaluate the scene)."""
    return obj.evaluated_get(context.view_layer.depsgraph).data


def split_at_seams(corners: np.ndarray, corner_uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One vertex per (vertex, UV) pair of the triangle corners: a UV seam splits a vertex in
    two. Returns the first corner of each new vertex and each corner's new vertex. (A sort on
    a 64-bit key of the UV's float bits: about 4x faster than np.unique over rows.)"""
    bits = np.ascontiguousarray(corner_uv, dtype=np.float32).view(np.uint32).astype(np.uint64)
    key = (bits[:, 0] << np.uint64(32)) | bits[:, 1]
    order = np.lexsort((key, corners))
    k, c = key[order], corners[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (k[1:] != k[:-1]) | (c[1:] != c[:-1])
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.cumsum(starts) - 1
    return order[starts], inverse


def problem(context: bpy.types.Context) -> str | None:
    """Why the active object cannot be textured (cheap enough for a poll)."""
    obj = context.active_object
    if obj is None:
        return "Select a mesh object to texture (it becomes the active object)"
    if obj.type != "MESH":
        return f"'{obj.name}' is {obj.type.lower()}, not a mesh: select a mesh object"
    count = triangle_count(evaluated_mesh(context, obj))
    if count <= 0:
        return f"'{obj.name}' has no faces to texture"
    if count > TEXTURE_MAX_FACES:
        return (
            f"'{obj.name}' has {count:,} triangles with its modifiers; the backend takes at "
            f"most {TEXTURE_MAX_FACES:,}: decimate it or lower its modifiers' levels"
        )
    return None


def export(context: bpy.types.Context, obj: bpy.types.Object) -> SentMesh:
    """The object's evaluated mesh as GLB bytes: world positions (Z-up to Y-up), triangles,
    and the render UV map's coordinates (vertices split where the UVs have seams)."""
    evaluated = obj.evaluated_get(context.evaluated_depsgraph_get())
    mesh = evaluated.to_mesh()
    try:
        mesh.calc_loop_triangles()
        count = len(mesh.loop_triangles)
        corners = np.empty(count * 3, np.int32)
        mesh.loop_triangles.foreach_get("vertices", corners)
        loops = np.empty(count * 3, np.int32)
        mesh.loop_triangles.foreach_get("loops", loops)
        co = np.empty(len(mesh.vertices) * 3, np.float32)
        mesh.vertices.foreach_get("co", co)
        matrix = np.array(obj.matrix_world, dtype=np.float64)
        world = co.reshape(-1, 3).astype(np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
        layer = render_uv_layer(mesh)
        uv = None
        if layer is not None:
            per_loop = np.empty(len(mesh.loops) * 2, np.float32)
            layer.uv.foreach_get("vector", per_loop)
            corner_uv = per_loop.reshape(-1, 2)[loops]
            first, inverse = split_at_seams(corners, corner_uv)
            positions, uv = world[corners[first]], corner_uv[first]
            triangles = inverse.reshape(-1, 3)
        else:
            positions, triangles = world, corners.reshape(-1, 3)
        y_up = np.column_stack([positions[:, 0], positions[:, 2], -positions[:, 1]])
        return SentMesh(
            data=write_glb(y_up, triangles, uv),
            triangles=count,
            uv_map=layer.name if layer is not None else "",
            modifiers_applied=any(m.show_viewport for m in obj.modifiers),
        )
    finally:
        evaluated.to_mesh_clear()
