"""Import a generated GLB into the scene: placement, collection, scale, alpha fix-up, selection."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import bpy
from mathutils import Vector

COLLECTION = "TRELLIS.2"


@dataclass
class ImportOptions:
    collection: str = COLLECTION
    at_cursor: bool = True
    scale_to: float | None = None  # longest side in scene units; None keeps the GLB's size
    fix_alpha: bool = True


def _gltf_kwargs(filepath: str) -> dict:
    """Only options this Blender's importer knows (4.2 is the oldest we support)."""
    wanted = {"filepath": filepath, "merge_vertices": False, "import_shading": "NORMALS"}
    known = set(bpy.ops.import_scene.gltf.get_rna_type().properties.keys())
    return {k: v for k, v in wanted.items() if k in known}


def _ensure_collection(scene: bpy.types.Scene, name: str) -> bpy.types.Collection:
    coll = bpy.data.collections.get(name)
    if coll is None:
        coll = bpy.data.collections.new(name)
    if coll not in scene.collection.children_recursive:
        scene.collection.children.link(coll)
    return coll


def _world_bounds(objects) -> tuple[Vector, Vector] | None:
    lo = Vector((float("inf"),) * 3)
    hi = Vector((float("-inf"),) * 3)
    found = False
    for obj in objects:
        if obj.type != "MESH":
            continue
        for corner in obj.bound_box:
            world = obj.matrix_world @ Vector(corner)
            lo = Vector(map(min, lo, world))
            hi = Vector(map(max, hi, world))
            found = True
    return (lo, hi) if found else None


def fix_alpha(material: bpy.types.Material) -> bool:
    """Wire the base-colour texture's alpha into the Principled BSDF and make the material
    non-opaque. TRELLIS.2 writes alpha into that texture but marks the material OPAQUE."""
    if material is None or material.node_tree is None:
        return False
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = next((n for n in nodes if n.type == "BSDF_PRINCIPLED"), None)
    if bsdf is None:
        return False
    alpha_in = bsdf.inputs.get("Alpha")
    base_in = bsdf.inputs.get("Base Color")
    tex = None
    if base_in is not None and base_in.is_linked:
        node = base_in.links[0].from_node
        # The importer may put a colour-factor mix between the texture and the BSDF.
        seen = 0
        while node is not None and node.type != "TEX_IMAGE" and seen < 4:
            linked = [i for i in node.inputs if i.is_linked]
            node = linked[0].links[0].from_node if linked else None
            seen += 1
        tex = node if node is not None and node.type == "TEX_IMAGE" else None
    if tex is None:
        tex = next((n for n in nodes if n.type == "TEX_IMAGE" and n.image is not None), None)
    if tex is None or tex.image is None or alpha_in is None:
        return False
    if not alpha_in.is_linked:
        links.new(tex.outputs["Alpha"], alpha_in)
    # EEVEE Next (4.2+) picks transparency per material; older settings kept for 4.2's legacy API.
    if hasattr(material, "surface_render_method"):
        material.surface_render_method = "DITHERED"
    if hasattr(material, "blend_method"):
        try:
            material.blend_method = "HASHED"
        except (TypeError, AttributeError):
            pass
    return True


def import_glb(
    context: bpy.types.Context,
    filepath: str | Path,
    name: str,
    options: ImportOptions | None = None,
) -> bpy.types.Object:
    """Import one GLB and return the object that holds it (renamed after the input image).
    Callers wrap this in one operator so the whole thing is one undo step."""
    options = options or ImportOptions()
    filepath = str(filepath)
    if not Path(filepath).is_file():
        raise FileNotFoundError(f"no GLB at {filepath}")
    view_layer = context.view_layer
    active = view_layer.objects.active
    if active is not None and active.mode != "OBJECT":
        bpy.ops.object.mode_set(mode="OBJECT")
    scene = context.scene
    coll = _ensure_collection(scene, options.collection)

    before = set(bpy.data.objects)
    result = bpy.ops.import_scene.gltf(**_gltf_kwargs(filepath))
    if "FINISHED" not in result:
        raise RuntimeError(f"the glTF importer did not finish ({', '.join(result)})")
    new = [obj for obj in bpy.data.objects if obj not in before]
    if not new:
        raise RuntimeError(f"{Path(filepath).name} contained no objects")

    # Move everything into our collection (the importer links into the active one).
    for obj in new:
        for other in list(obj.users_collection):
            other.objects.unlink(obj)
        coll.objects.link(obj)

    roots = [obj for obj in new if obj.parent is None]
    if len(roots) == 1:
        top = roots[0]
    else:  # several roots: group them under one empty so placement moves them together
        top = bpy.data.objects.new(name, None)
        coll.objects.link(top)
        for obj in roots:
            matrix = obj.matrix_world.copy()
            obj.parent = top
            obj.matrix_world = matrix
        new.append(top)
    top.name = name
    if top.type == "MESH" and top.data.users == 1:
        top.data.name = name

    view_layer.update()
    if options.scale_to:
        bounds = _world_bounds(new)
        if bounds is not None:
            longest = max(bounds[1] - bounds[0])
            if longest > 1e-9:
                top.scale = top.scale * (options.scale_to / longest)
    if options.at_cursor:
        top.location = scene.cursor.location.copy()
    view_layer.update()

    if options.fix_alpha:
        done = set()
        for obj in new:
            if obj.type != "MESH":
                continue
            for slot in obj.material_slots:
                if slot.material is not None and slot.material.name not in done:
                    done.add(slot.material.name)
                    fix_alpha(slot.material)

    for obj in view_layer.objects:
        if obj.select_get():
            obj.select_set(False)
    for obj in new:
        if obj.name in view_layer.objects:
            obj.select_set(True)
    view_layer.objects.active = top
    return top
