"""Real OOMs on emulated 8-24 GB cards with the real TRELLIS.2 (GPU machine; issue #12).

usage: python scripts/gpu/cards.py --cards 8,12 --out cards.json [--budget 500] [--steps 4]
       [--blind 16] [--upstream 16] [--texture] [--presets fast,balanced,high,game-asset]
       [--batch fast:mid,balanced:low,high:high] [--shifts low=-0.07,mid=0.023,high=0.117]

A smaller card is emulated two ways at once, because either alone lies:
- `set_per_process_memory_fraction` (gpu.set_memory_cap) caps torch's caching allocator, and
  makes `vram()` report the card's size, as the runner sees it on a real card;
- a ballast process holds the rest of the device, so what CuMesh and nvdiffrast allocate with
  plain cudaMalloc (outside torch's allocator: most of `to_glb`) also runs out where a real card
  would. With the fraction alone, the export's 15-30 % of CuMesh memory is free.

For each card: every preset through the hardened runner with the memory model's prediction
and the adaptive start (a fresh memory profile per card, jobs in order: what the first job
teaches the rest); on `--blind` cards the same jobs with prediction and adaptive start off (the
blind ladder); then upstream alone (run() + to_glb, example.py's sequence). After every job
and every OOM the allocator's and the card's used memory are compared with the baseline.
Sampler steps are lowered to --steps for every stage: a stage's peak is one step's peak.

`--batch` runs a mixed batch instead of one job per preset: preset:occupancy pairs, the
occupancy set by shifting the sparse-structure decoder's output bias (the shifts that
`memory_model.py` calibrated in run 7 to about 1,000 / 2,500 / 6,000 voxels at 512), so one
card sees small, middling and large objects. Every `gpu.cleanup` the runner makes (after each
attempt, OOM or not) is recorded with the allocator's and the card's figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
IMAGE = ROOT / "examples" / "robot.png"
GIB = 1 << 30

BALLAST = """
import sys, torch
target_free = int(sys.argv[1])
torch.cuda.init()
free, total = torch.cuda.mem_get_info()
take = max(0, free - target_free)
block = torch.empty(take, dtype=torch.uint8, device="cuda")
print(take, flush=True)
sys.stdin.read()
"""


class Ballast:
    """Another process holding all of the device but `card` bytes (minus what we hold)."""

    def __init__(self, torch, card: int):
        free, total = torch.cuda.mem_get_info()
        ours = total - free  # this process's context and whatever it keeps
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BALLAST, str(max(0, card - ours))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.taken = int(self.proc.stdout.readline().strip() or 0)
        self.free_after = torch.cuda.mem_get_info()[0]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cards", required=True, help="GB, comma-separated")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=500.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--presets", default="fast,balanced,high,game-asset")
    parser.add_argument("--ours", default="all", help="cards (GB) run through our runner")
    parser.add_argument("--blind", default="", help="cards (GB) also run with the blind ladder")
    parser.add_argument("--upstream", default="", help="cards (GB) also run upstream alone")
    parser.add_argument("--texture", action="store_true", help="one texture job at the end")
    parser.add_argument("--batch", default="", help="preset:occupancy pairs (replaces --presets)")
    parser.add_argument("--shifts", default="low=-0.0703,mid=0.0234,high=0.1172")
    args = parser.parse_args()
    began = time.time()
    deadline = began + args.budget

    from backend.pipeline import gpu

    gpu.configure_allocator()
    import torch
    from memory_model import DeviceSampler
    from PIL import Image
    from upstream_reference import upstream_export, upstream_run

    from backend.engines import trellis2 as t2
    from backend.params import SAMPLER_STAGES, parse_params
    from backend.pipeline.memprofile import MemoryProfile
    from backend.pipeline.runner import Runner, RunnerConfig
    from backend.store.jobs import JobStore
    from backend.store.stats import StatsLog

    sampler = DeviceSampler()
    engine = t2.Trellis2Engine()
    engine.load()
    image_bytes = IMAGE.read_bytes()
    work = Path(tempfile.mkdtemp(prefix="cards_"))
    steps = {stage: {"steps": args.steps} for stage in SAMPLER_STAGES}
    shifts = {k: float(v) for k, v in (pair.split("=") for pair in args.shifts.split(","))}
    if args.batch:
        batch = [tuple(item.split(":")) for item in args.batch.split(",") if item]
    else:
        batch = [(p, "") for p in args.presets.split(",") if p]
    decoder = engine.pipeline.models["sparse_structure_decoder"]
    bias = decoder.out_layer[-1].bias
    bias0 = bias.detach().clone()

    def occupancy(occ: str) -> None:
        with torch.no_grad():
            bias.copy_(bias0 + shifts.get(occ, 0.0))

    # Every cleanup the runner makes (after each attempt, an OOM's included), with figures.
    cleanups: list[dict] = []
    real_cleanup = gpu.cleanup

    def recorded_cleanup(*a, **k):
        figures = real_cleanup(*a, **k)
        cleanups.append(
            {
                "allocated": torch.cuda.memory_allocated(),
                "reserved": torch.cuda.memory_reserved(),
                "device_used_mib": sampler.now(),
            }
        )
        return figures

    gpu.cleanup = recorded_cleanup

    # What every shape stage found (tokens at the resolution it ran at), attempts included.
    shapes: list[dict] = []
    real_run_stage = engine.run_stage

    def recorded_run_stage(name, state, params, ctx):
        out = real_run_stage(name, state, params, ctx)
        if name == "shape":
            shapes.append(
                {
                    **(state.get("structure") or {}),
                    "requested": params.resolution,
                    "effective": state.get("effective_resolution"),
                    "max_num_tokens": params.max_num_tokens,
                }
            )
        return out

    engine.run_stage = recorded_run_stage
    report: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "steps": args.steps,
        "cards": {},
        "notes": [],
        "shifts": shifts,
        "batch": batch,
    }

    def save() -> None:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))

    def figures() -> dict:
        real_cleanup(engine)
        return {
            "allocated": torch.cuda.memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "device_used_mib": sampler.now(),
        }

    def ours(runner, store, preset: str, occ: str, card_report: dict, label: str) -> None:
        params = parse_params({"preset": preset, "seed": 1, "samplers": steps}).to_dict()
        job = store.create("generate", "trellis2", params, image=image_bytes)
        occupancy(occ)
        before = figures()
        events = []
        cleanups.clear()
        shapes.clear()
        t0 = time.perf_counter()
        result = runner.run(job, emit=lambda kind, content: events.append((kind, content)))
        seconds = round(time.perf_counter() - t0, 2)
        after = figures()
        structure = (result.mesh_stats or {}).get("structure") or {}
        card_report[label].append(
            {
                "preset": preset,
                "occupancy": occ,
                "voxels": structure.get("voxels"),
                "tokens": structure.get("shape_tokens"),
                "outcome": result.outcome,
                "error": result.error,
                "level": result.level,
                "final": {
                    k: (result.params or {}).get(k)
                    for k in ("resolution", "max_num_tokens", "remesh", "remesh_band")
                },
                "effective_resolution": (result.mesh_stats or {}).get("effective_resolution"),
                "attempts": [
                    {
                        "level": a["level"],
                        "outcome": a["outcome"],
                        "stage": a["stage"],
                        "seconds": a["seconds"],
                        "error": (a.get("error") or "")[:300],
                        "error_code": a.get("error_code"),
                        "stage_vram_peaks": a.get("stage_vram_peaks"),
                    }
                    for a in result.attempts
                ],
                "ooms": sum(a["outcome"] == "oom" for a in result.attempts),
                "predicted": sum(a["outcome"] == "predicted_oom" for a in result.attempts),
                "seconds": seconds,
                "before": before,
                "after": after,
                "faces": (result.mesh_stats or {}).get("faces"),
                "cleanups": list(cleanups),
                "shapes": list(shapes),
            }
        )
        save()
        print(label, preset, occ, result.outcome, "level", result.level, seconds, "s", flush=True)

    def upstream(preset: str, occ: str) -> dict:
        params = parse_params({"preset": preset, "seed": 1})
        occupancy(occ)
        before = figures()
        t0 = time.perf_counter()
        outcome, error, stage = "done", None, "run"
        try:
            image = Image.open(io.BytesIO(image_bytes))
            mesh = upstream_run(engine, image, params, args.steps)
            stage = "to_glb"
            glb = upstream_export(engine, mesh, params)
            del mesh, glb
        except Exception as exc:
            kind = gpu.classify_error(exc)
            outcome, error = kind or "error", f"{type(exc).__name__}: {str(exc)[:300]}"
            gpu.forget_exception(exc.__traceback__)
            del exc
        seconds = round(time.perf_counter() - t0, 2)
        after = figures()
        print("upstream", preset, occ, outcome, stage, seconds, "s", flush=True)
        return {
            "preset": preset,
            "occupancy": occ,
            "outcome": outcome,
            "stage": stage,
            "error": error,
            "seconds": seconds,
            "before": before,
            "after": after,
        }

    if args.texture:  # first: the real texturing pipeline has never completed before
        report["texture"] = texture_job(engine, work, image_bytes, args.steps)
        save()
    for card_gb in [int(c) for c in args.cards.split(",") if c]:
        card = card_gb * 10**9  # cards are sold in GB
        card_report: dict = {"ours": [], "blind": [], "upstream": []}
        report["cards"][str(card_gb)] = card_report
        gpu.cleanup(engine)
        ballast = Ballast(torch, card)
        gpu.set_memory_cap(card)
        card_report["ballast_bytes"] = ballast.taken
        card_report["device_free_after_ballast"] = ballast.free_after
        card_report["vram"] = gpu.vram()
        try:
            folder = work / f"card{card_gb}"
            store = JobStore(folder / "out")
            profile = MemoryProfile(folder / "profile.json", gpu.device_key() or "card")
            runner = Runner(
                engine, store, StatsLog(folder / "stats.jsonl"), profile, RunnerConfig(0)
            )
            run_ours = args.ours == "all" or str(card_gb) in args.ours.split(",")
            for preset, occ in batch if run_ours else ():
                if time.time() > deadline - 60:
                    report["notes"].append(f"{card_gb} GB: {preset}:{occ} not run (time)")
                    continue
                ours(runner, store, preset, occ, card_report, "ours")
            if str(card_gb) in args.blind.split(","):
                # The blind ladder, as before issue #12: OOM, then lower; the adaptive start
                # learns from the OOMs in a memory profile of its own.
                blind_profile = MemoryProfile(folder / "blind_profile.json", "card")
                blind = Runner(
                    engine, store, StatsLog(folder / "blind.jsonl"), blind_profile, RunnerConfig(0)
                )
                engine.predicts_memory = False
                try:
                    for preset, occ in batch:
                        if time.time() > deadline - 60:
                            report["notes"].append(f"{card_gb} GB blind: {preset}:{occ} not run")
                            continue
                        ours(blind, store, preset, occ, card_report, "blind")
                finally:
                    del engine.predicts_memory
            if str(card_gb) in args.upstream.split(","):
                for preset, occ in batch:
                    if time.time() > deadline - 45:
                        report["notes"].append(f"{card_gb} GB upstream: {preset}:{occ} not run")
                        continue
                    card_report["upstream"].append(upstream(preset, occ))
                    save()
            card_report["tokens_per_voxel"] = runner.tokens_per_voxel
        finally:
            gpu.set_memory_cap(None)
            ballast.close()
        save()

    occupancy("")
    report["seconds"] = round(time.time() - began, 1)
    save()
    sampler.stop()
    return 0


def texture_job(engine, work: Path, image_bytes: bytes, steps: int) -> dict:
    """The real texturing pipeline on a UV sphere through the runner (the crash of runs 6-7 is
    o-voxel's timing output, which the engine now turns off)."""
    import trimesh

    from backend.params import parse_params
    from backend.pipeline.runner import Runner, RunnerConfig
    from backend.store.jobs import JobStore
    from backend.store.stats import StatsLog

    sphere = trimesh.creation.uv_sphere(radius=0.4, count=[48, 48])
    mesh_bytes = sphere.export(file_type="glb")
    store = JobStore(work / "texture" / "out")
    runner = Runner(engine, store, StatsLog(work / "texture" / "s.jsonl"), None, RunnerConfig(0))
    params = parse_params(
        {"preset": "balanced", "seed": 1, "samplers": {"texture": {"steps": steps}}}
    ).to_dict()
    job = store.create("texture", "trellis2", params, image=image_bytes, mesh=mesh_bytes)
    t0 = time.perf_counter()
    result = runner.run(job)
    out = {
        "outcome": result.outcome,
        "error": result.error,
        "seconds": round(time.perf_counter() - t0, 2),
        "mesh": result.mesh_stats,
        "input_faces": len(sphere.faces),
    }
    print("texture", out, flush=True)
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
