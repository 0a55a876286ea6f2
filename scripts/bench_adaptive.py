"""Adaptive start vs blind ladder walking on an emulated small card (issue #3 benchmark).

Needs CUDA. Runs the same mixed batch twice through the hardened runner with the real-CUDA
load engine (tests/gpu_engines.py, memory shaped like TRELLIS.2's): once walking the ladder
from level 0 for every job (blind), once with the learned memory profile (adaptive). Prints a
markdown table: retries per job and time to success.

    python scripts/bench_adaptive.py --cap-gb 16 --jobs 12 [--json OUT.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.pipeline import gpu  # noqa: E402

gpu.configure_allocator()

from PIL import Image, ImageDraw  # noqa: E402

from backend.params import parse_params  # noqa: E402
from backend.pipeline.memprofile import MemoryProfile  # noqa: E402
from backend.pipeline.runner import Runner, RunnerConfig  # noqa: E402
from backend.store.jobs import JobStore  # noqa: E402
from backend.store.stats import StatsLog  # noqa: E402
from tests.gpu_engines import CudaLoadEngine  # noqa: E402

PRESETS = ["high", "balanced", "game-asset", "fast"]


def image_bytes() -> bytes:
    image = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((40, 30, 216, 226), fill=(200, 90, 40, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def run_batch(engine, folder: Path, jobs: int, adaptive: bool) -> list[dict]:
    store = JobStore(folder)
    profile = MemoryProfile(folder / "profile.json", gpu.device_key()) if adaptive else None
    runner = Runner(
        engine,
        store,
        StatsLog(folder / "stats.jsonl"),
        profile,
        RunnerConfig(min_free_disk=1 << 20, adaptive_start=adaptive),
    )
    data = image_bytes()
    rows = []
    for i in range(jobs):
        preset = PRESETS[i % len(PRESETS)]
        record = store.create(
            "generate", engine.name, parse_params({"preset": preset}).to_dict(), image=data
        )
        began = time.perf_counter()
        result = runner.run(record)
        rows.append(
            {
                "preset": preset,
                "outcome": result.outcome,
                "level": result.level,
                "attempts": len(result.attempts),
                "seconds": time.perf_counter() - began,
            }
        )
    return rows


def summarise(rows: list[dict]) -> dict:
    return {
        "jobs": len(rows),
        "done": sum(r["outcome"] == "done" for r in rows),
        "retries_per_job": statistics.mean(r["attempts"] - 1 for r in rows),
        "seconds_total": sum(r["seconds"] for r in rows),
        "seconds_mean": statistics.mean(r["seconds"] for r in rows),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cap-gb", type=float, default=16)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--json")
    parser.add_argument("--workdir", help="keep job folders and stats.jsonl here")
    args = parser.parse_args()
    engine = CudaLoadEngine(weights_gb=2.0)
    engine.load()
    gpu.set_memory_cap(int(args.cap_gb * 2**30))
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-adaptive-"))
    run_batch(engine, tmp / "warmup", 1, adaptive=False)  # CUDA and cuBLAS warm-up
    blind = run_batch(engine, tmp / "blind", args.jobs, adaptive=False)
    adaptive = run_batch(engine, tmp / "adaptive", args.jobs, adaptive=True)
    b, a = summarise(blind), summarise(adaptive)
    device = (gpu.vram() or {}).get("device", "?")
    print("## Runner: adaptive start vs blind ladder walking (issue #3)\n")
    print(
        f"`scripts/bench_adaptive.py --cap-gb {args.cap_gb:g} --jobs {args.jobs}` on {device}, "
        f"memory capped to {args.cap_gb:g} GiB, CudaLoadEngine (TRELLIS.2-shaped memory), "
        f"presets cycling {', '.join(PRESETS)}.\n"
    )
    print("| run | jobs done | retries per job | total time | mean time per job |")
    print("|---|---|---|---|---|")
    for name, s in (("blind (level 0 every time)", b), ("adaptive start", a)):
        print(
            f"| {name} | {s['done']}/{s['jobs']} | {s['retries_per_job']:.2f} | "
            f"{s['seconds_total']:.2f} s | {s['seconds_mean']:.3f} s |"
        )
    print(f"\nTime to success, blind / adaptive: {b['seconds_total'] / a['seconds_total']:.2f}x.")
    print(
        "\nPer job (adaptive): "
        + ", ".join(f"{r['preset']} L{r['level']} x{r['attempts']}" for r in adaptive)
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"blind": blind, "adaptive": adaptive, "device": device}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
