"""Import a generated GLB into the scene: placement, collection, scale, alpha fix-up, names,
selection - all or nothing (a failure removes what the import had made)."""

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
    rest_on_cursor: bool = False  # the bottom of the bounds at the cursor, not the origin
    location: tuple[float, float, float] | None = None  # the cursor to use (None: where it is)
    scale_to: float | None = None  # longest side in scene units; None keeps the GLB's size
    fix_alpha: bool = True


def _gltf_kwargs(filepath: str) -> dict:
    """Only options this Blender's importer knows (4.2 is the oldest we support)."""
    wanted = {"filepath": filepath, "merge_vertices": False, "import_shading": "NORMALS"}
    known = set(bpy.ops.import_scene.gltf.get_rna_type().properties.keys())
    return {k: v for k, v in wanted.items() if k in known}


def _ensure_collection(
    scene: bpy.types.Scene, view_layer: bpy.types.ViewLayer, name: str
) -> bpy.types.Collection:
    """Our collection, linked into the scene and visible in this view layer. Objects in an
    excluded or hidden collection are not in the view layer, so they could be neither selected
    nor seen: the collection - and the collections above it - are made visible."""
    coll = bpy.data.collections.get(name)
    if coll is None:
        coll = bpy.data.collections.new(name)
    if coll not in scene.collection.children_recursive:
        scene.collection.children.link(coll)
    for layer in _layer_path(view_layer.layer_collection, coll)[1:]:  # [0]: the scene's own
        layer.exclude = False
        layer.hide_viewport = False
        layer.collection.hide_viewport = False
    coll.hide_select = False
    return coll


def _layer_path(layer: bpy.types.LayerCollection, coll) -> list[bpy.types.LayerCollection]:
    """The layer collections from the view layer's root down to `coll` ([] if not found)."""
    if layer.collection == coll:
        return [layer]
    for child in layer.children:
        path = _layer_path(child, coll)
        if path:
            return [layer, *path]
    return []


def _datablocks() -> dict[str, set]:
    return {
        "objects": set(bpy.data.objects),
        "meshes": set(bpy.data.meshes),
        "materials": set(bpy.data.materials),
        "images": set(bpy.data.images),
    }


def _remove_new(before: dict[str, set]) -> None:
    """Remove what an import made (objects first, then their data): never half an import."""
    for kind in ("objects", "meshes", "materials", "images"):
        collection = getattr(bpy.data, kind)
        for block in [b for b in collection if b not in before[kind]]:
            collection.remove(block)


def _name_after(name: str, new_objects, before: dict[str, set], top) -> None:
    """Objects, meshes, materials and textures named after the image/job, not the GLB's."""
    parts = [o for o in new_objects if o is not top]
    for i, obj in enumerate(parts, 1):
        obj.name = f"{name}_{i}"
    for obj in new_objects:
        if obj.type == "MESH" and obj.data.users == 1 and obj.data not in before["meshes"]:
            obj.data.name = obj.name
    for material in [m for m in bpy.data.materials if m not in before["materials"]]:
        material.name = name
    for image in [i for i in bpy.data.images if i not in before["images"]]:
        image.name = f"{name}_texture"


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
    before = _datablocks()
    try:
        return _import(context, filepath, name, options, before)
    except BaseException:
        _remove_new(before)
        raise


def _import(context, filepath: str, name: str, options: ImportOptions, before) -> bpy.types.Object:
    scene, view_layer = context.scene, context.view_layer
    coll = _ensure_collection(scene, view_layer, options.collection)
    result = bpy.ops.import_scene.gltf(**_gltf_kwargs(filepath))
    if "FINISHED" not in result:
        raise RuntimeError(f"the glTF importer did not finish ({', '.join(result)})")
    new = [obj for obj in bpy.data.objects if obj not in before["objects"]]
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
    _name_after(name, new, before, top)

    view_layer.update()
    if options.scale_to:
        bounds = _world_bounds(new)
        if bounds is not None:
            longest = max(bounds[1] - bounds[0])
            if longest > 1e-9:
                top.scale = top.scale * (options.scale_to / longest)
    if options.at_cursor:
        target = Vector(options.location or scene.cursor.location)
        top.location = target
        if options.rest_on_cursor:
            view_layer.update()
            bounds = _world_bounds(new)
            if bounds is not None:
                top.location.z += target.z - bounds[0].z
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
        obj.select_set(True)  # in the view layer: the collection was made visible
    view_layer.objects.active = top
    return top
