"""Our staged adapter against upstream's own `pipeline.run()` + `to_glb` (GPU machine).

usage: python scripts/gpu/bench_upstream.py --out bench_upstream.json [--preset fast] [--repeats 2]
(TRELLIS2_WEIGHTS and TRELLIS2_CHECKOUT name the weights and the checkout; scripts/gpu/bench.sh)

Same weights, same seed, same image, same loaded models: "ours" is a job through the hardened
runner (stages, cleanup, validation, job files), "upstream" is what example.py does (run,
simplify to nvdiffrast's limit, to_glb with the same export settings, GLB written). Runs
alternate after one warm-up of each, so first-use costs (FlexGEMM kernels) hit neither side.
Reported: vertex and face counts and bounds of both GLBs, wall time ratio, peak VRAM of each.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
IMAGE = ROOT / "examples" / "robot.png"


def glb_figures(path: Path) -> dict:
    import trimesh

    mesh = trimesh.util.concatenate(list(trimesh.load(path, force="scene").dump()))
    return {
        "vertices": len(mesh.vertices),
        "faces": len(mesh.faces),
        "bounds": mesh.bounds.round(4).tolist(),
        "bytes": path.stat().st_size,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from backend.pipeline import gpu

    gpu.configure_allocator()
    import torch
    from PIL import Image
    from upstream_reference import upstream_export, upstream_run

    from backend.engines.trellis2 import Trellis2Engine
    from backend.params import parse_params
    from backend.pipeline.runner import Runner, RunnerConfig
    from backend.store.jobs import JobStore
    from backend.store.stats import StatsLog

    work = Path(tempfile.mkdtemp(prefix="bench_upstream_"))
    engine = Trellis2Engine()
    engine.load()
    store = JobStore(work / "out")
    runner = Runner(
        engine, store, StatsLog(work / "stats.jsonl"), None, RunnerConfig(min_free_disk=0)
    )
    params = parse_params({"preset": args.preset, "seed": 1})
    image_bytes = IMAGE.read_bytes()

    def ours() -> dict:
        job = store.create(
            "generate", "trellis2", {"preset": args.preset, "seed": 1}, image=image_bytes
        )
        result = runner.run(job, emit=lambda kind, content: None)
        assert result.outcome == "done", result.error
        return glb_figures(Path(result.glb_path))

    def upstream() -> dict:
        image = Image.open(io.BytesIO(image_bytes))
        mesh = upstream_run(engine, image, params)
        glb = upstream_export(engine, mesh, params)
        path = work / f"upstream_{time.time_ns()}.glb"
        glb.export(path, extension_webp=False)
        del mesh, glb
        return glb_figures(path)

    def timed(fn) -> dict:
        gpu.cleanup(engine)
        torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        figures = fn()
        torch.cuda.synchronize()
        figures["seconds"] = round(time.perf_counter() - began, 3)
        figures["peak_allocated"] = torch.cuda.max_memory_allocated()
        figures["peak_reserved"] = torch.cuda.max_memory_reserved()
        return figures

    report: dict = {"preset": args.preset, "gpu": torch.cuda.get_device_name(0), "runs": []}
    report["warmup"] = {"ours": timed(ours), "upstream": timed(upstream)}
    for _ in range(args.repeats):
        report["runs"].append({"upstream": timed(upstream), "ours": timed(ours)})
        Path(args.out).write_text(json.dumps(report, indent=1))
    ours_s = sum(r["ours"]["seconds"] for r in report["runs"])
    up_s = sum(r["upstream"]["seconds"] for r in report["runs"])
    report["time_ratio_ours_over_upstream"] = round(ours_s / up_s, 4) if up_s else None
    report["peak_allocated_ours_minus_upstream"] = max(
        r["ours"]["peak_allocated"] for r in report["runs"]
    ) - max(r["upstream"]["peak_allocated"] for r in report["runs"])
    same = all(
        (r["ours"]["vertices"], r["ours"]["faces"])
        == (r["upstream"]["vertices"], r["upstream"]["faces"])
        for r in report["runs"]
    )
    report["identical_counts"] = same
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
