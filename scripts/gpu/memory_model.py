"""The measured memory model of the real TRELLIS.2 (GPU machine; issue #12).

usage: python scripts/gpu/memory_model.py --out memory_model.json [--budget 480] [--steps 4]
(TRELLIS2_WEIGHTS and TRELLIS2_CHECKOUT name the random weights and the checkout.)

For every case (pipeline tier x occupancy, then one knob changed at a time) the engine's own
stages run as the runner runs them, and every stage and every step inside `to_glb` is a span
with three figures:
- `peak_allocated` / `peak_reserved`: torch's caching allocator, exact (reset per span);
- `device_peak_mib`: the whole card's used memory from `nvidia-smi -lms`, minus the card's
  use before the case. This is what counts for CuMesh: it allocates with plain `cudaMalloc`,
  outside torch's allocator, so torch's figures (and `set_per_process_memory_fraction`) do not
  see the remesh, simplify or UV unwrap. Sampled every 20 ms, so short spikes can be missed.

Sampler steps are lowered (`--steps`) for every stage: the peak of a flow stage is one step's
peak (each step frees what it took), which one case checks against upstream's step counts.
Occupancy is set per case by shifting the sparse-structure decoder's output bias (the same
knob make_weights.py calibrates), searched until the structure has the target voxel count.
Cases run in priority order and the JSON is rewritten after each, so a call that runs out of
time keeps what it measured.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
IMAGE = ROOT / "examples" / "robot.png"
MIB = 1 << 20
STAGES = ("conditioning", "sparse_structure", "shape", "texture", "decode", "export")
PRESET_OF = {512: "fast", 1024: "balanced", 1536: "high"}
# Voxels of the 32^3 structure: about 3 %, 8 % and 18 % of the cells.
OCCUPANCY = {"low": 1000, "mid": 2500, "high": 6000}


class DeviceSampler:
    """The card's used memory over time, from `nvidia-smi -lms` in a process of its own (it
    keeps sampling while a CUDA extension holds the GIL)."""

    def __init__(self, period_ms: int = 20):
        self.samples: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        try:
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=timestamp,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    str(period_ms),
                    "-i",
                    os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        except OSError:
            self._proc = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                stamp, used = (part.strip() for part in line.split(","))
                day, clock = stamp.split(" ")
                whole, _, frac = clock.partition(".")
                t = time.strptime(f"{day} {whole}", "%Y/%m/%d %H:%M:%S")
                # nvidia-smi prints local time; the machine's zone is UTC (checked in the run)
                epoch = calendar.timegm(t) + float(f"0.{frac or 0}")
                with self._lock:
                    self.samples.append((epoch, float(used)))
            except ValueError:
                continue

    def peak(self, t0: float, t1: float) -> float | None:
        with self._lock:
            inside = [used for t, used in self.samples if t0 <= t <= t1 + 0.05]
        return max(inside) if inside else None

    def now(self) -> float | None:
        time.sleep(0.06)
        with self._lock:
            return self.samples[-1][1] if self.samples else None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()


class Spans:
    """Nested named spans with torch's peak figures; a parent's peak includes its children."""

    def __init__(self, torch, sampler: DeviceSampler):
        self.torch = torch
        self.sampler = sampler
        self.stack: list[dict] = []
        self.records: dict[str, dict] = {}

    def _read(self) -> tuple[int, int]:
        cuda = self.torch.cuda
        cuda.synchronize()
        return cuda.max_memory_allocated(), cuda.max_memory_reserved()

    @contextlib.contextmanager
    def span(self, name: str):
        if self.stack:
            parent = self.stack[-1]
            alloc, res = self._read()
            parent["carry"] = max(parent["carry"], alloc)
            parent["carry_r"] = max(parent["carry_r"], res)
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()
        entry = {"carry": 0, "carry_r": 0, "t0": time.time(), "p0": time.perf_counter()}
        self.stack.append(entry)
        try:
            yield
        finally:
            alloc, res = self._read()
            self.stack.pop()
            alloc, res = max(alloc, entry["carry"]), max(res, entry["carry_r"])
            rec = self.records.setdefault(
                name,
                {"calls": 0, "peak_allocated": 0, "peak_reserved": 0, "seconds": 0.0, "at": []},
            )
            rec["calls"] += 1
            rec["peak_allocated"] = max(rec["peak_allocated"], alloc)
            rec["peak_reserved"] = max(rec["peak_reserved"], res)
            rec["seconds"] = round(rec["seconds"] + time.perf_counter() - entry["p0"], 3)
            rec["at"].append((entry["t0"], time.time()))
            if self.stack:
                parent = self.stack[-1]
                parent["carry"] = max(parent["carry"], alloc)
                parent["carry_r"] = max(parent["carry_r"], res)
            self.torch.cuda.reset_peak_memory_stats()

    def wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            with self.span(name):
                return original(*args, **kwargs)

        setattr(owner, attr, wrapped)

    def take(self, baseline_mib: float | None) -> dict:
        out = {}
        for name, rec in self.records.items():
            peaks = [self.sampler.peak(t0, t1) for t0, t1 in rec.pop("at")]
            peaks = [p for p in peaks if p is not None]
            rec["device_peak_mib"] = (
                round(max(peaks) - baseline_mib, 1) if peaks and baseline_mib is not None else None
            )
            out[name] = rec
        self.records = {}
        return out


def instrument(spans: Spans, engine) -> None:
    """Spans inside the stages: upstream's pipeline steps and every GPU step of `to_glb`."""
    import cumesh
    import cumesh.remeshing
    import nvdiffrast.torch as dr

    pipe = engine.pipeline
    post = engine._up["postprocess"]
    spans.wrap(pipe, "get_cond", "conditioning.get_cond")
    spans.wrap(pipe.shape_slat_sampler, "sample", "shape.sample")
    spans.wrap(pipe.tex_slat_sampler, "sample", "texture.sample")
    spans.wrap(pipe.models["shape_slat_decoder"], "upsample", "shape.upsample")
    spans.wrap(pipe, "decode_shape_slat", "decode.shape")
    spans.wrap(pipe, "decode_tex_slat", "decode.texture")
    for attr in ("init", "fill_holes", "simplify", "uv_unwrap", "compute_vertex_normals"):
        spans.wrap(cumesh.CuMesh, attr, f"export.{attr}")
    for attr in ("remove_duplicate_faces", "repair_non_manifold_edges", "unify_face_orientations"):
        spans.wrap(cumesh.CuMesh, attr, f"export.{attr}")
    spans.wrap(cumesh.cuBVH, "__init__", "export.bvh_build")
    spans.wrap(cumesh.cuBVH, "unsigned_distance", "export.bvh_query")
    spans.wrap(cumesh.remeshing, "remesh_narrow_band_dc", "export.remesh")
    spans.wrap(dr, "rasterize", "export.rasterize")
    spans.wrap(post, "grid_sample_3d", "export.grid_sample")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all cases")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated case names")
    args = parser.parse_args()
    began = time.time()

    from backend.pipeline import gpu

    gpu.configure_allocator()
    import torch
    from PIL import Image

    from backend.engines import trellis2 as t2
    from backend.engines.base import StageContext
    from backend.params import SAMPLER_STAGES, parse_params

    sampler = DeviceSampler()
    engine = t2.Trellis2Engine()
    engine.load()
    spans = Spans(torch, sampler)
    instrument(spans, engine)
    image = Image.open(IMAGE)
    image.load()
    work = Path(tempfile.mkdtemp(prefix="memory_model_"))
    # Cascade tiers below 1024 (the product's own token cap, issue #12): upstream's cascade
    # takes any multiple of 128 as its high resolution; only the preset table lacks them.
    for res in (640, 768, 896, 1152, 1280):
        t2.PIPELINE_TYPES.setdefault(res, "1024_cascade" if res < 1024 else "1536_cascade")

    decoder = engine.pipeline.models["sparse_structure_decoder"]
    bias = decoder.out_layer[-1].bias
    bias0 = bias.detach().clone()

    def set_shift(delta: float) -> None:
        with torch.no_grad():
            bias.copy_(bias0 + delta)

    steps = {stage: {"steps": args.steps} for stage in SAMPLER_STAGES}

    def params_for(resolution: int, **changes):
        preset = PRESET_OF.get(resolution, "balanced" if resolution < 1536 else "high")
        params = parse_params({"preset": preset, "seed": 1, "samplers": steps})
        params = params.replace(resolution=resolution)
        samplers = changes.pop("samplers", None)
        if samplers is not None:
            params = params.replace(samplers=samplers)
        return params.replace(**changes)

    def run_stages(params, state, upto: str = "export") -> dict:
        for stage in STAGES:
            if stage in state.get("_done", ()):
                continue
            with spans.span(stage):
                engine.run_stage(stage, state, params, StageContext(stage))
            state.setdefault("_done", []).append(stage)
            if stage == upto:
                break
        return state

    # -- occupancy: bias shift per target voxel count ----------------------------------
    shifts: dict[str, dict] = {}

    def voxels_at(delta: float) -> int:
        set_shift(delta)
        state = {"image": image}
        params = params_for(512)
        engine.run_stage("conditioning", state, params, StageContext("conditioning"))
        try:
            engine.run_stage("sparse_structure", state, params, StageContext("sparse_structure"))
        except t2.BackendError as exc:
            if exc.code != t2.ErrorCode.EMPTY_STRUCTURE:
                raise
            return 0
        return int(state["coords"].shape[0])

    def calibrate(label: str, target: int) -> float:
        low, high = -1.5, 1.5  # a larger shift -> more cells
        best = (abs(voxels_at(0.0) - target), 0.0)
        for _ in range(7):
            mid = (low + high) / 2
            n = voxels_at(mid)
            best = min(best, (abs(n - target), mid))
            if n < target:
                low = mid
            else:
                high = mid
            if abs(n - target) < 0.08 * target:
                break
        shifts[label] = {"target_voxels": target, "shift": best[1]}
        return best[1]

    report: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "total_bytes": torch.cuda.get_device_properties(0).total_memory,
        "torch": torch.__version__,
        "sampler_steps": args.steps,
        "occupancy": shifts,
        "cases": {},
        "notes": [],
    }

    def save() -> None:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))

    def case(name: str, resolution: int, occ: str, **changes) -> None:
        set_shift(shifts[occ]["shift"])
        params = params_for(resolution, **changes)
        gpu.cleanup(engine)
        spans.take(None)  # drop spans recorded outside a case (calibration)
        baseline = sampler.now()
        t0 = time.perf_counter()
        state = {"image": image, "output_path": str(work / f"{name}.glb")}
        error = None
        try:
            run_stages(params, state)
        except Exception as exc:  # record and go on: one case must not end the model
            error = f"{type(exc).__name__}: {str(exc)[:400]}"
        report["cases"][name] = {
            "resolution": resolution,
            "occupancy": occ,
            "params": {k: v for k, v in params.to_dict().items() if k != "samplers"},
            "samplers": params.samplers,
            "voxels": int(state["coords"].shape[0]) if "coords" in state else None,
            "structure": state.get("structure"),
            "effective_resolution": state.get("effective_resolution"),
            "decoded_faces": int(state["decoded_mesh"].faces.shape[0])
            if "decoded_mesh" in state
            else None,
            "mesh": state.get("mesh_stats"),
            "seconds": round(time.perf_counter() - t0, 2),
            "baseline_device_mib": baseline,
            "spans": spans.take(baseline),
            "error": error,
        }
        del state
        gpu.cleanup(engine)
        save()
        print(name, json.dumps({k: report["cases"][name][k] for k in ("voxels", "seconds")}))

    def export_variant(name: str, source: str, **overrides) -> None:
        """Another `to_glb` on the decoded mesh of an earlier case, one export knob changed."""
        base = report["cases"][source]
        set_shift(shifts[base["occupancy"]]["shift"])
        params = params_for(base["resolution"], **overrides.pop("params", {}))
        state = {"image": image, "output_path": str(work / f"{name}.glb")}
        gpu.cleanup(engine)
        spans.take(None)
        baseline = sampler.now()
        t0 = time.perf_counter()
        error = None
        try:
            run_stages(params, state, upto="decode")
            post = engine._up["postprocess"]
            mesh = state["decoded_mesh"]
            dev = engine._device()
            with spans.span("export"), t2.cache_released_for_cumesh():
                glb = post.to_glb(
                    vertices=mesh.vertices.to(dev),
                    faces=mesh.faces.to(dev),
                    attr_volume=mesh.attrs.to(dev),
                    coords=mesh.coords.to(dev),
                    attr_layout=mesh.layout or engine.pipeline.pbr_attr_layout,
                    aabb=t2.AABB,
                    grid_size=int(state["effective_resolution"]),
                    decimation_target=params.decimation_target,
                    texture_size=params.texture_size,
                    remesh=params.remesh,
                    remesh_band=overrides.get("remesh_band", 1),
                    remesh_project=0,
                )
            faces = len(glb.faces)
            del glb
        except Exception as exc:
            error, faces = f"{type(exc).__name__}: {str(exc)[:400]}", None
        spans_now = spans.take(baseline)
        report["cases"][name] = {
            "resolution": base["resolution"],
            "occupancy": base["occupancy"],
            "variant_of": source,
            "overrides": overrides,
            "params": {k: v for k, v in params.to_dict().items() if k != "samplers"},
            "effective_resolution": state.get("effective_resolution"),
            "faces": faces,
            "seconds": round(time.perf_counter() - t0, 2),
            "baseline_device_mib": baseline,
            "spans": spans_now,
            "error": error,
        }
        del state
        gpu.cleanup(engine)
        save()
        print(name, report["cases"][name]["seconds"], error or "")

    full_steps = {}  # upstream's step counts: proves a stage's peak does not grow with steps
    plan = [
        ("calibrate", lambda: [calibrate(k, v) for k, v in OCCUPANCY.items()], 60),
        ("512_mid", lambda: case("512_mid", 512, "mid"), 45),
        ("1024_mid", lambda: case("1024_mid", 1024, "mid"), 90),
        ("1536_mid", lambda: case("1536_mid", 1536, "mid"), 150),
        (
            "1024_mid_remesh_off",
            lambda: export_variant("1024_mid_remesh_off", "1024_mid", params={"remesh": False}),
            60,
        ),
        (
            "1024_mid_band_half",
            lambda: export_variant("1024_mid_band_half", "1024_mid", remesh_band=0.5),
            60,
        ),
        (
            "1024_mid_tex4096",
            lambda: export_variant("1024_mid_tex4096", "1024_mid", params={"texture_size": 4096}),
            60,
        ),
        (
            "1024_mid_tex1024_200k",
            lambda: export_variant(
                "1024_mid_tex1024_200k",
                "1024_mid",
                params={"texture_size": 1024, "decimation_target": 200_000},
            ),
            60,
        ),
        (
            "1024_mid_steps_full",
            lambda: case("1024_mid_steps_full", 1024, "mid", samplers=full_steps),
            120,
        ),
        (
            "1024_mid_no_guidance",
            lambda: case("1024_mid_no_guidance", 1024, "mid", guidance=False),
            90,
        ),
        ("1024_mid_image384", lambda: case("1024_mid_image384", 1024, "mid", image_size=384), 90),
        ("768_mid", lambda: case("768_mid", 768, "mid"), 80),
        ("512_high", lambda: case("512_high", 512, "high"), 50),
        ("1024_high", lambda: case("1024_high", 1024, "high"), 120),
        ("1536_high", lambda: case("1536_high", 1536, "high"), 180),
        (
            "1536_high_tokens24k",
            lambda: case("1536_high_tokens24k", 1536, "high", max_num_tokens=24_576),
            150,
        ),
        ("896_high", lambda: case("896_high", 896, "high"), 100),
        ("512_low", lambda: case("512_low", 512, "low"), 40),
        ("1024_low", lambda: case("1024_low", 1024, "low"), 70),
        ("1536_low", lambda: case("1536_low", 1536, "low"), 100),
    ]
    only = {name for name in args.only.split(",") if name}
    for name, run, seconds in plan:
        if only and name not in only and name != "calibrate":
            continue
        left = began + args.budget - time.time()
        if name != "calibrate" and left < seconds:
            report["notes"].append(f"{name} not run: {left:.0f} s left, about {seconds} s needed")
            save()
            continue
        run()
    report["seconds"] = round(time.time() - began, 1)
    save()
    sampler.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
