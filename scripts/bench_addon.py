"""Add-on benchmarks in real Blender-as-a-module: the add-on's import vs a raw
import_scene.gltf of the same 1M-face textured GLB, and the timer tick's cost idle and during a job.

    .venv-bpy42/bin/python scripts/bench_addon.py [--faces 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXT_ID, REPO = "trellis2_blender", "trellis2_bench"


def make_glb(path: Path, faces: int) -> None:
    """A grid of `faces` triangles with UVs and a 2048 px RGBA texture, material OPAQUE."""
    import numpy as np
    import trimesh
    from PIL import Image
    from trimesh.visual.material import PBRMaterial
    from trimesh.visual.texture import TextureVisuals

    n = int((faces / 2) ** 0.5) + 1
    u, v = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))
    verts = np.column_stack(
        [u.ravel() - 0.5, v.ravel() - 0.5, 0.05 * np.sin(8 * u.ravel()) * np.cos(8 * v.ravel())]
    )
    idx = np.arange(n * n).reshape(n, n)
    a, b = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()
    c, d = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tris = np.concatenate([np.column_stack([a, b, d]), np.column_stack([a, d, c])])
    rng = np.random.default_rng(0)
    texture = Image.fromarray(rng.integers(0, 255, (2048, 2048, 4), dtype=np.uint8), "RGBA")
    mesh = trimesh.Trimesh(verts, tris, process=False)
    material = PBRMaterial(baseColorTexture=texture, alphaMode="OPAQUE")
    mesh.visual = TextureVisuals(uv=np.column_stack([u.ravel(), v.ravel()]), material=material)
    mesh.export(path)


def stats(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    median = statistics.median(ms)
    return f"median {median:.3f} ms, p99 {p99:.3f} ms, max {ms[-1]:.3f} ms (n={len(ms)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trellis2-bench-"))
    os.environ["BLENDER_USER_RESOURCES"] = str(tmp / "user")
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
    os.environ["TRELLIS2_OUTPUT_DIR"] = str(tmp / "jobs")
    (tmp / "repo").mkdir()
    os.symlink(ROOT, tmp / "repo" / EXT_ID)
    glb = tmp / "bench.glb"
    make_glb(glb, args.faces)

    import bpy

    bpy.context.preferences.extensions.repos.new(
        name=REPO, module=REPO, custom_directory=str(tmp / "repo"), source="USER"
    )
    bpy.ops.preferences.addon_enable(module=f"bl_ext.{REPO}.{EXT_ID}")
    runtime = sys.modules[f"bl_ext.{REPO}.{EXT_ID}.blender_addon.runtime"]
    print(
        f"Blender {bpy.app.version_string}, Python {sys.version.split()[0]}, "
        f"GLB {glb.stat().st_size / 2**20:.1f} MiB"
    )

    raw, addon = [], []
    for _ in range(args.repeats):
        for kind in ("raw", "addon"):
            bpy.ops.wm.read_homefile(use_empty=True)
            props = bpy.context.scene.trellis2
            props.use_scale, props.fix_alpha, props.at_cursor = True, True, True
            t = time.perf_counter()
            if kind == "raw":
                bpy.ops.import_scene.gltf(filepath=str(glb))
            else:
                bpy.ops.trellis2.import_result(filepath=str(glb), name="bench")
            (raw if kind == "raw" else addon).append(time.perf_counter() - t)
            faces = sum(len(o.data.polygons) for o in bpy.data.objects if o.type == "MESH")
    ratio = statistics.median(addon) / statistics.median(raw)
    print(
        f"import, {faces} faces: raw gltf median {statistics.median(raw):.2f} s "
        f"{[round(x, 2) for x in raw]}, add-on median {statistics.median(addon):.2f} s "
        f"{[round(x, 2) for x in addon]}, ratio {ratio:.3f}"
    )

    ctrl = runtime.get()
    idle_stopped = []
    for _ in range(2000):
        t = time.perf_counter()
        runtime.timer()
        idle_stopped.append(time.perf_counter() - t)
    print(f"tick, backend stopped: {stats(idle_stopped)}")
    ctrl.start(wait=True, timeout=60)
    idle = []
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        t = time.perf_counter()
        runtime.timer()
        idle.append(time.perf_counter() - t)
        time.sleep(0.01)
    print(f"tick, backend ready and idle: {stats(idle)}")
    image = (ROOT / "examples" / "duck_on_grey.png").read_bytes()
    busy = []
    views = [
        ctrl.submit(image, {"preset": "high", "seed": i}, f"job{i}", auto_import=False)
        for i in range(4)
    ]
    while not all(v.terminal for v in views):
        t = time.perf_counter()
        runtime.timer()
        busy.append(time.perf_counter() - t)
        time.sleep(0.01)
    print(
        f"tick, during 4 queued jobs (no auto-import): {stats(busy)}; "
        f"states {[v.state for v in views]}"
    )
    ctrl.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
