"""Import a generated GLB into the scene: placement, collection, scale, the material's blend
mode from the GLB's alpha mode, names, selection - all or nothing (a failure removes what the
import had made). A texture job's result goes onto its object or beside it."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import bpy
from mathutils import Matrix, Vector

COLLECTION = "TRELLIS.2"
# glTF alphaMode -> EEVEE's surface render method. Since 4.2 a material is dithered or
# blended; a MASK is the glTF importer's alpha-clip nodes in front of a dithered surface.
RENDER_METHOD = {"OPAQUE": "DITHERED", "MASK": "DITHERED", "BLEND": "BLENDED"}
BESIDE = 1.15  # a textured copy stands this many of the object's widths to its right


@dataclass
class ImportOptions:
    collection: str = COLLECTION
    at_cursor: bool = True
    rest_on_cursor: bool = False  # the bottom of the bounds at the cursor, not the origin
    location: tuple[float, float, float] | None = None  # the cursor to use (None: where it is)
    scale_to: float | None = None  # longest side in scene units; None keeps the GLB's size
    fix_alpha: bool = True


def _gltf_kwargs(filepath: str, merge: bool = False) -> dict:
    """Only options this Blender's importer knows (4.2 is the oldest we support)."""
    wanted = {"filepath": filepath, "merge_vertices": merge, "import_shading": "NORMALS"}
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


def glb_alpha_modes(filepath: str | Path) -> list[tuple[str | None, str, float | None]]:
    """(name, alphaMode, alphaCutoff) of each material in a GLB, from its JSON chunk."""
    with open(filepath, "rb") as f:
        header = f.read(20)
        if len(header) < 20 or header[:4] != b"glTF":
            return []
        length, kind = struct.unpack_from("<I4s", header, 12)
        if kind != b"JSON":
            return []
        doc = json.loads(f.read(length))
    return [
        (m.get("name"), m.get("alphaMode", "OPAQUE"), m.get("alphaCutoff"))
        for m in doc.get("materials") or []
    ]


def _alpha_of(materials: list, modes: list) -> dict:
    """Each new material's glTF alpha mode: by name (the importer names materials after the
    glTF's, adding .001 on clashes), or the only one when the GLB has one."""
    if len(modes) == 1:
        return {m: modes[0][1] for m in materials}
    by_name = {name: mode for name, mode, _ in modes if name}
    out = {}
    for material in materials:
        base, _, suffix = material.name.rpartition(".")
        out[material] = by_name.get(material.name) or by_name.get(
            base if suffix.isdigit() else material.name, "OPAQUE"
        )
    return out


def set_blend_mode(material: bpy.types.Material, mode: str) -> None:
    """The material's EEVEE blend mode for its glTF alpha mode (Cycles reads the nodes)."""
    material.surface_render_method = RENDER_METHOD.get(mode, "DITHERED")


def _materials_follow_alpha(filepath: str, before, options: ImportOptions) -> None:
    new = [m for m in bpy.data.materials if m not in before["materials"]]
    for material, mode in _alpha_of(new, glb_alpha_modes(filepath)).items():
        set_blend_mode(material, mode)
        if mode == "OPAQUE" and options.fix_alpha:
            fix_alpha(material)  # results made before the backend wrote alpha modes


def _begin_import(context: bpy.types.Context, filepath: str | Path) -> tuple[str, dict]:
    """The GLB's path (it must exist), in Object mode, and the datablocks there were before
    (so a failed import can remove everything it made)."""
    filepath = str(filepath)
    if not Path(filepath).is_file():
        raise FileNotFoundError(f"no GLB at {filepath}")
    active = context.view_layer.objects.active
    if active is not None and active.mode != "OBJECT":
        bpy.ops.object.mode_set(mode="OBJECT")
    return filepath, _datablocks()


def import_glb(
    context: bpy.types.Context,
    filepath: str | Path,
    name: str,
    options: ImportOptions | None = None,
) -> bpy.types.Object:
    """Import one GLB and return the object that holds it (renamed after the input image).
    Callers wrap this in one operator so the whole thing is one undo step."""
    options = options or ImportOptions()
    filepath, before = _begin_import(context, filepath)
    try:
        return _import(context, filepath, name, options, before)
    except BaseException:
        _remove_new(before)
        raise


def _load(filepath: str, before, merge: bool = False) -> list[bpy.types.Object]:
    """Run the glTF importer; the objects it made (materials follow the GLB's alpha modes)."""
    result = bpy.ops.import_scene.gltf(**_gltf_kwargs(filepath, merge))
    if "FINISHED" not in result:
        raise RuntimeError(f"the glTF importer did not finish ({', '.join(result)})")
    new = [obj for obj in bpy.data.objects if obj not in before["objects"]]
    if not new:
        raise RuntimeError(f"{Path(filepath).name} contained no objects")
    return new


def _import(context, filepath: str, name: str, options: ImportOptions, before) -> bpy.types.Object:
    scene, view_layer = context.scene, context.view_layer
    coll = _ensure_collection(scene, view_layer, options.collection)
    new = _load(filepath, before)
    _materials_follow_alpha(filepath, before, options)

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
    _select_only(view_layer, new, top)
    return top


def _select_only(view_layer, objects, active) -> None:
    for obj in view_layer.objects:
        if obj.select_get():
            obj.select_set(False)
    for obj in objects:
        obj.select_set(True)  # in the view layer: the collection was made visible
    view_layer.objects.active = active


# -- a texture job's result ------------------------------------------------------------------


def pin_uv_map(material: bpy.types.Material, uv_map: str) -> None:
    """Make the material's textures read `uv_map` (the one sent), whatever map is active."""
    tree = material.node_tree
    for node in [n for n in tree.nodes if n.type == "TEX_IMAGE"]:
        vector = node.inputs["Vector"]
        source = vector.links[0].from_node if vector.is_linked else None
        if source is None:
            source = tree.nodes.new("ShaderNodeUVMap")
            source.location = node.location - Vector((200.0, 0.0))
            tree.links.new(source.outputs["UV"], vector)
        if source.type == "UVMAP":
            source.uv_map = uv_map


def _bake_transform(obj: bpy.types.Object, into: Matrix) -> None:
    """Keep the mesh where it is in the world while the object takes the matrix `into`."""
    obj.data.transform(into.inverted() @ obj.matrix_world)
    obj.matrix_world = into


def apply_texture(
    context: bpy.types.Context,
    filepath: str | Path,
    target: bpy.types.Object | None,
    name: str,
    result: str = "APPLY",
    uv_map: str = "",
    modifiers_applied: bool = False,
    options: ImportOptions | None = None,
) -> bpy.types.Object:
    """Put a texture job's result (a GLB in world space, as the mesh was sent) onto `target`
    or beside it. APPLY with a UV map: the object gets the new material and keeps its mesh
    (its UVs were kept). APPLY without one: the object's mesh becomes the textured mesh (with
    the backend's UVs; its modifiers were applied to what was sent, so they are removed).
    COPY, or a target that is gone: a new object beside it. Returns the textured object."""
    options = options or ImportOptions()
    filepath, before = _begin_import(context, filepath)
    onto = target is not None and result == "APPLY"
    try:
        new = _load(filepath, before, merge=onto and not uv_map)
        _materials_follow_alpha(filepath, before, options)
        meshes = [o for o in new if o.type == "MESH"]
        if len(meshes) != 1:
            raise RuntimeError(f"expected one textured mesh, the GLB holds {len(meshes)}")
        textured = meshes[0]
        world = textured.matrix_world.copy()  # the importer's parents (if any) go
        textured.parent = None
        textured.matrix_world = world
        _bake_transform(textured, Matrix.Identity(4))  # the mesh in world space, as sent
        for material in [m for m in bpy.data.materials if m not in before["materials"]]:
            material.name = f"{name}_texture"
        for image in [i for i in bpy.data.images if i not in before["images"]]:
            image.name = f"{name}_texture"
        if not onto:
            placed = _place_copy(context, textured, target, name)
            leftovers = [o for o in new if o is not placed]
        else:
            placed = _onto(target, textured, uv_map, modifiers_applied)
            leftovers = new
        for obj in leftovers:
            mesh = obj.data if obj.type == "MESH" else None
            bpy.data.objects.remove(obj)
            if mesh is not None and mesh.users == 0 and mesh is not placed.data:
                bpy.data.meshes.remove(mesh)
    except BaseException:
        _remove_new(before)
        raise
    context.view_layer.update()
    _select_only(context.view_layer, [placed], placed)
    return placed


def _place_copy(context, textured, target, name) -> bpy.types.Object:
    """The textured mesh as a new object with the target's transform, to its right."""
    textured.name = textured.data.name = f"{name} textured"
    if target is None:  # the object is gone: the result stays where the mesh was
        coll = _ensure_collection(context.scene, context.view_layer, COLLECTION)
    else:
        _bake_transform(textured, target.matrix_world.copy())
        bounds = _world_bounds([target])
        width = (bounds[1].x - bounds[0].x) if bounds is not None else 1.0
        textured.location.x += max(width, 0.1) * BESIDE
        coll = target.users_collection[0] if target.users_collection else None
        coll = coll or _ensure_collection(context.scene, context.view_layer, COLLECTION)
    for other in list(textured.users_collection):
        other.objects.unlink(textured)
    coll.objects.link(textured)
    return textured


def _onto(target, textured, uv_map: str, modifiers_applied: bool) -> bpy.types.Object:
    material = textured.material_slots[0].material if textured.material_slots else None
    if material is None:
        raise RuntimeError("the textured mesh came without a material")
    if uv_map:
        pin_uv_map(material, uv_map)
        mesh = target.data
        mesh.materials.clear()
        mesh.materials.append(material)
        mesh.polygons.foreach_set("material_index", [0] * len(mesh.polygons))
        mesh.update()
        return target
    _bake_transform(textured, target.matrix_world.copy())
    old = target.data
    new_mesh = textured.data
    target.data = new_mesh
    name = old.name
    if old.users == 0:
        bpy.data.meshes.remove(old)
    new_mesh.name = name
    if modifiers_applied:
        target.modifiers.clear()  # they are in the textured mesh already
    return target


def remove_objects(objects) -> None:
    """Remove objects and the meshes, materials and images only they used."""
    meshes = {o.data for o in objects if o.type == "MESH" and o.data is not None}
    materials = {s.material for o in objects for s in o.material_slots if s.material}
    images = {
        n.image
        for m in materials
        if m.node_tree is not None
        for n in m.node_tree.nodes
        if n.type == "TEX_IMAGE" and n.image is not None
    }
    for obj in objects:
        bpy.data.objects.remove(obj)
    for blocks, kind in ((meshes, "meshes"), (materials, "materials"), (images, "images")):
        for block in blocks:
            if block.users == 0:
                getattr(bpy.data, kind).remove(block)
