"""Does upstream's mesh voxelisation (the first step of texturing) run here? (GPU machine)

usage: python scripts/gpu/probe_voxelise.py --out voxelise_probe.json

o-voxel's `mesh_to_flexible_dual_grid` died with SIGSEGV in GPU run 6 right after printing
"Intersect QEF computation took " and before the number: the crash is in the C++ extension's
`std::cout << double` of its `timing` output, which upstream's texturing pipeline turns on.
Each variant runs in a process of its own (a crash must not end the probe).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CODE = """
import faulthandler, sys
faulthandler.enable()
import torch, trimesh, o_voxel
mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
out = o_voxel.convert.mesh_to_flexible_dual_grid(
    torch.from_numpy(mesh.vertices).float().cpu(), torch.from_numpy(mesh.faces).long().cpu(),
    grid_size=512, aabb=[[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]],
    face_weight=1.0, boundary_weight=0.2, regularization_weight=1e-2, timing=TIMING)
print("voxels", tuple(out[0].shape))
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {}
    for timing in (False, True):
        proc = subprocess.run(
            [sys.executable, "-c", CODE.replace("TIMING", str(timing))],
            capture_output=True,
            text=True,
            timeout=120,
        )
        results[f"timing={timing}"] = {
            "rc": proc.returncode,
            "stdout": proc.stdout[-1500:],
            "stderr": proc.stderr[-3000:],
        }
        print(f"timing={timing}: rc {proc.returncode} {proc.stdout.strip()[-200:]}")
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
