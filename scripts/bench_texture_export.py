"""Time what Texture Selected Mesh does on Blender's main thread: the button's poll and building
the GLB that is sent (blender_addon/selection.py), for grids of a given number of triangles
with one UV map, in Blender-as-a-module.

    .venv-bpy53/bin/python scripts/bench_texture_export.py [--triangles 39204 1000000]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXT_ID, REPO = "trellis2_blender", "trellis2_bench"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triangles", type=int, nargs="+", default=[39_204, 1_000_000])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trellis2-bench-"))
    os.environ["BLENDER_USER_RESOURCES"] = str(work / "user")
    os.environ["XDG_CACHE_HOME"] = str(work / "cache")
    (work / "ext").mkdir()
    os.symlink(ROOT, work / "ext" / EXT_ID)
    import bpy

    bpy.context.preferences.extensions.repos.new(
        name=REPO, module=REPO, custom_directory=str(work / "ext"), source="USER"
    )
    bpy.ops.preferences.addon_enable(module=f"bl_ext.{REPO}.{EXT_ID}")
    selection = sys.modules[f"bl_ext.{REPO}.{EXT_ID}.blender_addon.selection"]
    bpy.ops.wm.read_homefile(use_empty=True)
    print(f"Blender {bpy.app.version_string}")
    for wanted in args.triangles:
        side = max(1, round(math.sqrt(wanted / 4)))  # a grid of side x 2*side quads
        bpy.ops.mesh.primitive_grid_add(x_subdivisions=side, y_subdivisions=2 * side)
        obj = bpy.context.object
        t = time.perf_counter()
        problem = selection.problem(bpy.context)
        poll = time.perf_counter() - t
        t = time.perf_counter()
        sent = selection.export(bpy.context, obj)
        export = time.perf_counter() - t
        print(
            f"{sent.triangles:,} triangles: poll {poll * 1000:.2f} ms, GLB {export:.2f} s, "
            f"{len(sent.data) / 1e6:.1f} MB, UV map {sent.uv_map!r}, problem {problem!r}"
        )
        bpy.data.objects.remove(obj)
    bpy.ops.preferences.addon_disable(module=f"bl_ext.{REPO}.{EXT_ID}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
