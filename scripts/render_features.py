"""Render the pictures of README.md and docs/BLENDER.md that show texturing a mesh, seed
variations, a batch and materials with transparency, each made through the add-on's own
operators in real Blender-as-a-module with the preview engine (no GPU), rendered with Cycles on
the CPU.

    .venv-bpy53/bin/python scripts/render_features.py [--out docs] [--size 480]

Writes feature_texture.png, feature_variations.png, feature_batch.png, feature_materials.png.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
EXT_ID, REPO = "trellis2_blender", "trellis2_features"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--size", type=int, default=480, help="render width in pixels")
    parser.add_argument("--samples", type=int, default=24)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trellis2-features-"))
    os.environ["BLENDER_USER_RESOURCES"] = str(work / "blender-user")
    os.environ["XDG_CACHE_HOME"] = str(work / "cache")
    os.environ["TRELLIS2_OUTPUT_DIR"] = str(work / "jobs")
    (work / "extensions").mkdir()
    os.symlink(ROOT, work / "extensions" / EXT_ID)  # Blender wants the id as the folder name

    import bpy

    bpy.context.preferences.extensions.repos.new(
        name=REPO, module=REPO, custom_directory=str(work / "extensions"), source="USER"
    )
    bpy.ops.preferences.addon_enable(module=f"bl_ext.{REPO}.{EXT_ID}")
    ctrl = sys.modules[f"bl_ext.{REPO}.{EXT_ID}.blender_addon.runtime"].get()
    bpy.ops.trellis2.backend(action="START")  # waits in background mode
    t0 = time.perf_counter()
    try:
        for name, make in (
            ("texture", texture),
            ("variations", variations),
            ("batch", batch),
            ("materials", materials),
        ):
            fresh_scene()
            objects, labels = make(work)
            path = out / f"feature_{name}.png"
            high = name == "batch"  # a grid: look down more, so its rows do not overlap
            render(objects, labels, path, args.size, args.samples, 1.3 if high else 0.45)
            print(f"{path.name}: {path.stat().st_size // 1024} KiB")
    finally:
        ctrl.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def fresh_scene():
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)
    props = bpy.context.scene.trellis2
    props.preset, props.use_advanced, props.texture_size = "fast", True, "1024"
    props.random_seed, props.seed = False, 7
    return props


# -- the four pictures: each returns (objects to frame, {object: caption}) -------------------


def texture(work):
    """A plain mesh (Suzanne, with its UVs) and the copy the texture request made beside it."""
    import bpy

    props = bpy.context.scene.trellis2
    props.source, props.filepath = "FILE", str(EXAMPLES / "robot.png")
    bpy.ops.mesh.primitive_monkey_add()  # facing the front (-Y), where the image projects
    plain = bpy.context.object
    plain.name = "Suzanne"
    plain.modifiers.new("smooth", "SUBSURF").levels = 1
    bpy.ops.object.shade_smooth()
    assert bpy.ops.trellis2.texture_mesh(result="COPY") == {"FINISHED"}
    copy = bpy.context.view_layer.objects.active
    return [plain, copy], {plain: "the mesh", copy: "textured copy (its UVs kept)"}


def variations(work):
    import bpy

    props = bpy.context.scene.trellis2
    props.source, props.filepath = "FILE", str(EXAMPLES / "star_toy.png")
    props.variations_count = 4
    assert bpy.ops.trellis2.variations() == {"FINISHED"}  # waits in background mode
    row = sorted(bpy.data.collections["Variations"].objects, key=lambda o: o.location.x)
    return row, {o: f"seed {o['trellis2_seed']}" for o in row}


def batch(work):
    import bpy

    folder = work / "shelf"
    folder.mkdir()
    for image in sorted(EXAMPLES.glob("*.png")):
        shutil.copy(image, folder / image.name)
    (folder / "broken.png").write_bytes(b"not an image")  # reported in the log, skipped
    props = bpy.context.scene.trellis2
    props.batch_folder = str(folder)
    assert bpy.ops.trellis2.batch() == {"FINISHED"}  # waits in background mode
    grid = list(bpy.data.collections["shelf"].objects)
    return grid, {o: o.name for o in grid}


def materials(work):
    """Opaque, see-through (BLEND) and cut-out (MASK) results over a checker floor."""
    import bpy
    from PIL import Image, ImageDraw

    props = bpy.context.scene.trellis2
    glass = Image.open(EXAMPLES / "star_toy.png").convert("RGBA")
    w, h = glass.size
    alpha = glass.getchannel("A")
    # Tinted glass: still part of the silhouette (the preview's mask is alpha >= 128).
    ImageDraw.Draw(alpha).ellipse((w * 0.3, h * 0.3, w * 0.7, h * 0.7), fill=160)
    glass.putalpha(alpha)
    glass.save(work / "glass_star.png")
    grille = Image.new("RGBA", (512, 512), (60, 120, 200, 255))
    draw = ImageDraw.Draw(grille)
    for x in range(64, 480, 96):
        for y in range(64, 480, 96):
            draw.ellipse((x, y, x + 56, y + 56), fill=(0, 0, 0, 0))
    grille.save(work / "grille.png")

    props.source, props.filepath = "FILE", str(EXAMPLES / "star_toy.png")
    bpy.context.scene.cursor.location = (-1.3, 0, 0)
    bpy.ops.trellis2.generate()
    opaque = bpy.context.view_layer.objects.active
    props.filepath = str(work / "glass_star.png")
    bpy.context.scene.cursor.location = (0, 0, 0)
    bpy.ops.trellis2.generate()
    blended = bpy.context.view_layer.objects.active
    props.filepath = str(work / "grille.png")
    bpy.ops.mesh.primitive_plane_add(
        size=1.0, location=(1.3, 0, 0), rotation=(math.radians(90), 0, 0)
    )
    bpy.ops.trellis2.texture_mesh(result="APPLY")
    masked = bpy.context.view_layer.objects.active
    floor(-0.55)
    return [opaque, blended, masked], {
        opaque: "opaque",
        blended: "see-through: BLEND",
        masked: "cut-out: MASK",
    }


# -- staging -------------------------------------------------------------------------------------


def floor(z: float) -> None:
    """A large checker floor, so transparency shows."""
    import bpy

    bpy.ops.mesh.primitive_plane_add(size=40.0, location=(0, 0, z))
    plane = bpy.context.object
    material = principled("checker", (1.0, 1.0, 1.0, 1.0))
    nodes, links = material.node_tree.nodes, material.node_tree.links
    checker = nodes.new("ShaderNodeTexChecker")
    checker.inputs["Scale"].default_value = 60.0
    checker.inputs["Color1"].default_value = (0.8, 0.8, 0.8, 1.0)
    checker.inputs["Color2"].default_value = (0.25, 0.25, 0.25, 1.0)
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    links.new(checker.outputs["Color"], bsdf.inputs["Base Color"])
    plane.data.materials.append(material)


def principled(name: str, colour):
    """A material with a Principled BSDF of this colour (Blender 4.2 still asks for nodes)."""
    import bpy

    material = bpy.data.materials.new(name)
    if not material.node_tree:
        material.use_nodes = True
    bsdf = next(n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Base Color"].default_value = colour
    return material


def render(objects, labels, path: Path, width: int, samples: int, elevation: float) -> None:
    import bpy
    from mathutils import Vector

    scene = bpy.context.scene
    direction = Vector((0.25, -1.0, elevation)).normalized()
    facing = (-direction).to_track_quat("-Z", "Y").to_euler()
    on_floor = "checker" in bpy.data.materials  # dark captions read better over the floor
    colour = (0.01, 0.01, 0.01, 1.0) if on_floor else (1.0, 1.0, 1.0, 1.0)
    captions = [label(obj, text, facing, colour) for obj, text in labels.items()]
    bpy.context.view_layer.update()
    corners = [o.matrix_world @ Vector(c) for o in objects + captions for c in o.bound_box]
    lo = Vector(map(min, *corners)) if len(corners) > 1 else corners[0]
    hi = Vector(map(max, *corners)) if len(corners) > 1 else corners[0]
    center = (lo + hi) / 2
    radius = max((hi - lo).length / 2, 0.5)
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    camera.data.lens = 50
    camera.location = center + direction * radius * 3.1
    camera.rotation_euler = (center - camera.location).to_track_quat("-Z", "Y").to_euler()
    scene.camera = camera
    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", "SUN"))
    sun.data.energy = 3.0
    sun.rotation_euler = (math.radians(40), 0, math.radians(30))
    scene.collection.objects.link(sun)
    world = bpy.data.worlds.new("World")
    if not world.node_tree:
        world.use_nodes = True
    background = world.node_tree.nodes.get("Background")
    background.inputs["Color"].default_value = (0.3, 0.3, 0.33, 1.0)
    scene.world = world
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.render.resolution_x = width
    scene.render.resolution_y = width * 9 // 16
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGB"
    scene.render.image_settings.compression = 100
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)


def label(obj, text: str, facing, colour):
    """A caption above the object, facing the camera."""
    import bpy
    from mathutils import Vector

    corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
    x = sum(c.x for c in corners) / 8
    y = sum(c.y for c in corners) / 8
    z = max(c.z for c in corners)
    curve = bpy.data.curves.new(f"label {text}", "FONT")
    curve.body, curve.size, curve.align_x = text, 0.13, "CENTER"
    caption = bpy.data.objects.new(curve.name, curve)
    caption.location = (x, y, z + 0.08)
    caption.rotation_euler = facing
    curve.materials.append(principled("caption", colour))
    bpy.context.scene.collection.objects.link(caption)
    return caption


if __name__ == "__main__":
    sys.exit(main())
