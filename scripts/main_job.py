"""The README's main job, in real Blender-as-a-module: enable the extension, start the backend
through the supervisor with the preview engine, generate from an example image, import the result
into the scene and render a PNG with Cycles on the CPU.

    .venv-bpy42/bin/python scripts/main_job.py [--image examples/robot.png] [--out DIR]

Prints the folder holding result.glb and render.png.
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
EXT_ID, REPO = "trellis2_blender", "trellis2_main_job"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "duck_on_grey.png")
    parser.add_argument("--out", type=Path, help="output folder (default: a new temp folder)")
    parser.add_argument("--size", type=int, default=256, help="render size in pixels")
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="trellis2-main-job-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Isolate Blender's user config and caches; jobs land in the output folder.
    os.environ["BLENDER_USER_RESOURCES"] = str(out / "blender-user")
    os.environ["XDG_CACHE_HOME"] = str(out / "cache")
    os.environ["TRELLIS2_OUTPUT_DIR"] = str(out / "jobs")
    repo_dir = out / "extensions"
    repo_dir.mkdir(exist_ok=True)
    link = repo_dir / EXT_ID
    if not link.exists():
        os.symlink(ROOT, link)  # Blender wants the extension id as the folder name

    t0 = time.perf_counter()
    import bpy

    prefs = bpy.context.preferences
    prefs.extensions.repos.new(
        name=REPO, module=REPO, custom_directory=str(repo_dir), source="USER"
    )
    bpy.ops.preferences.addon_enable(module=f"bl_ext.{REPO}.{EXT_ID}")
    bpy.ops.wm.read_homefile(use_empty=True)
    scene = bpy.context.scene
    print(f"Blender {bpy.app.version_string}, extension enabled")

    bpy.ops.trellis2.backend(action="START")  # blocking in background mode
    ctrl = sys.modules[f"bl_ext.{REPO}.{EXT_ID}.blender_addon.runtime"].get()
    status = ctrl.status()
    print(f"backend {status['state']}: pid {status['pid']}, engine {status.get('engine')}")

    props = scene.trellis2
    props.source, props.filepath, props.preset = "FILE", str(args.image.resolve()), "fast"
    props.use_scale, props.scale_to = True, 2.0
    result = bpy.ops.trellis2.generate(mode="BLOCKING")
    if result != {"FINISHED"}:
        print("generation failed", file=sys.stderr)
        return 1
    view = next(v for v in ctrl.jobs.values() if v.state == "done")
    shutil.copy2(view.glb_path, out / "result.glb")
    obj = bpy.context.view_layer.objects.active
    stats = view.result.get("mesh_stats") or {}
    print(
        f"imported {obj.name}: {stats.get('faces')} faces, {stats.get('texture_size')} px "
        f"texture, seed {view.seed}, quality level {view.level}"
    )

    render_png(scene, obj, out / "render.png", args.size, args.samples)
    ctrl.shutdown()
    print(f"done in {time.perf_counter() - t0:.1f} s")
    print(f"OUTPUT {out}")
    return 0


def render_png(scene, obj, path: Path, size: int, samples: int) -> None:
    import bpy
    from mathutils import Vector

    bpy.context.view_layer.update()
    corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
    center = sum(corners, Vector()) / 8
    radius = max((c - center).length for c in corners)
    cam_data = bpy.data.cameras.new("Camera")
    cam = bpy.data.objects.new("Camera", cam_data)
    scene.collection.objects.link(cam)
    direction = Vector((1.0, -1.4, 0.8)).normalized()
    cam.location = center + direction * radius * 3.2
    cam.rotation_euler = (center - cam.location).to_track_quat("-Z", "Y").to_euler()
    scene.camera = cam
    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", "SUN"))
    sun.data.energy = 3.0
    sun.rotation_euler = (math.radians(40), 0, math.radians(30))
    scene.collection.objects.link(sun)
    world = bpy.data.worlds.new("World")
    world.color = (0.25, 0.25, 0.28)
    if hasattr(world, "use_nodes"):
        world.use_nodes = True
    background = world.node_tree.nodes.get("Background")
    if background is not None:
        background.inputs["Color"].default_value = (0.25, 0.25, 0.28, 1.0)
        background.inputs["Strength"].default_value = 0.8
    scene.world = world
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.filepath = str(path)
    t = time.perf_counter()
    bpy.ops.render.render(write_still=True)
    print(
        f"rendered {path.name} ({size}x{size}, Cycles CPU, {samples} samples) "
        f"in {time.perf_counter() - t:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
