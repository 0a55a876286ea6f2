"""Test engines: FaultEngine (CPU, injects failures on cue) and CudaLoadEngine (real CUDA load).

Both follow the Engine contract of backend/engines/base.py and write a real, valid GLB, so the
runner's validation and publishing run as they would for TRELLIS.2. Register them with
`backend.engines.register("fault", "tests.gpu_engines:FaultEngine")` (and "cuda_load").
Options arrive as strings from a command line as well as typed values from Python.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from backend.engines.base import Engine, Stage, StageContext
from backend.errors import BackendError, ErrorCode
from backend.params import GenerationParams

GIB = 1 << 30
MIB = 1 << 20

STAGES = (
    Stage("cond", "Encoding the image", frozenset({"image_size"})),
    Stage(
        "structure",
        "Sampling the structure",
        frozenset({"resolution", "max_num_tokens", "steps_scale", "guidance"}),
    ),
    Stage("texture", "Sampling the texture", frozenset({"resolution"})),
    Stage("decode", "Decoding the mesh"),
    Stage(
        "export",
        "Writing the GLB",
        frozenset({"texture_size", "decimation_target", "remesh", "remesh_band"}),
    ),
)
CAPABILITIES = frozenset().union(*(s.knobs for s in STAGES))
CACHE_FILE = "test_engine_cache.json"


# -- options ---------------------------------------------------------------------------------


def _number(value: Any) -> float:
    return float(value)


def parse_fail_spec(spec: str | None) -> dict[str, tuple[str, int]]:
    """'texture:oom:2,export:cumesh_oom:1' -> {stage: (kind, first N calls)}."""
    out: dict[str, tuple[str, int]] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        parts = [p.strip() for p in item.split(":")]
        if len(parts) not in (2, 3) or parts[1] not in FAULTS:
            raise ValueError(f"bad fail spec {item!r}; use stage:kind[:count], kind in {FAULTS}")
        out[parts[0]] = (parts[1], int(parts[2]) if len(parts) == 3 else 1)
    return out


def parse_fail_above(spec: str | None) -> list[tuple[str | None, str, float]]:
    """'resolution=512' or 'structure:resolution=512,export:texture_size=1024' ->
    [(stage or None, knob, threshold)]: OOM while the knob's value exceeds the threshold."""
    out: list[tuple[str | None, str, float]] = []
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        where, _, rule = item.rpartition(":")
        knob, sep, threshold = rule.partition("=")
        if not sep or knob.strip() not in CAPABILITIES:
            raise ValueError(f"bad fail_above {item!r}; use [stage:]knob=threshold")
        out.append((where.strip() or None, knob.strip(), float(threshold)))
    return out


# -- faults ----------------------------------------------------------------------------------


def _oom_class() -> type[BaseException]:
    try:
        import torch

        return torch.cuda.OutOfMemoryError
    except ImportError:  # the name backend.pipeline.gpu.classify_error matches without torch
        return type("OutOfMemoryError", (RuntimeError,), {})


def _raise(kind: str, stage: str) -> None:
    if kind == "oom":
        raise _oom_class()(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at {stage})")
    if kind == "cumesh_oom":
        raise RuntimeError("[CuMesh] CUDA error: out of memory")
    if kind == "poison":
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    raise RuntimeError("boom")


FAULTS = ("oom", "cumesh_oom", "poison", "error")


# -- a small textured GLB ----------------------------------------------------------------------


def box_mesh(size: float = 0.8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cube (Y-up, centred, inside the unit cube) with per-face vertices and UVs."""
    import trimesh

    box = trimesh.creation.box(extents=(size, size, size))
    vertices = np.asarray(box.vertices[box.faces].reshape(-1, 3), dtype=np.float64)
    faces = np.arange(len(vertices), dtype=np.int64).reshape(-1, 3)
    uv = np.clip(vertices[:, [0, 2]] / size + 0.5, 0.0, 1.0)
    return vertices, faces, uv


def write_glb(state: dict[str, Any], texture_px: int, color=(200, 120, 40, 255)) -> None:
    """Export the box with a PNG base-colour texture to state["output_path"] and fill the keys
    the runner expects: glb_path, mesh_stats (texture_size = the written texture's width),
    mesh_arrays."""
    import trimesh
    from PIL import Image
    from trimesh.visual.material import PBRMaterial
    from trimesh.visual.texture import TextureVisuals

    vertices, faces, uv = box_mesh()
    image = Image.new("RGBA", (texture_px, texture_px), color)
    material = PBRMaterial(
        name="test", baseColorTexture=image, metallicFactor=0.0, roughnessFactor=0.8
    )
    mesh = trimesh.Trimesh(
        vertices=vertices,
        faces=faces,
        visual=TextureVisuals(uv=uv, material=material),
        process=False,
    )
    path = Path(state["output_path"])
    path.write_bytes(mesh.export(file_type="glb"))
    state["glb_path"] = path
    state["mesh_stats"] = {
        "vertices": len(vertices),
        "faces": len(faces),
        "texture_size": texture_px,
    }
    state["mesh_arrays"] = (vertices, faces)


class _CachingEngine(Engine):
    """Shared: stages, re-export through a small JSON cache."""

    capabilities = CAPABILITIES
    stages = STAGES

    def stages_for(self, kind: str) -> tuple[Stage, ...]:
        if kind == "reexport":
            return tuple(s for s in self.stages if s.name in ("decode", "export"))
        return super().stages_for(kind)

    def save_cache(self, state: dict[str, Any], directory: Path) -> None:
        keep = {k: state[k] for k in ("cond", "structure", "texture") if k in state}
        (Path(directory) / CACHE_FILE).write_text(json.dumps(keep), encoding="utf-8")

    def load_cache(self, directory: Path) -> dict[str, Any]:
        path = Path(directory) / CACHE_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise BackendError(ErrorCode.NOT_FOUND, "This job has nothing to re-export.") from None


# -- FaultEngine (CPU) ---------------------------------------------------------------------------


class FaultEngine(_CachingEngine):
    """CPU engine for runner tests. Options (strings accepted):
      fail="texture:oom:2,export:cumesh_oom:1"  raise that kind at that stage for its first N
                                                calls (kinds: oom, cumesh_oom, poison, error)
      fail_above="resolution=512"               OOM while a knob exceeds a threshold, at the
                                                given stage or the first stage reading the knob
      delay=0.0                                 seconds per stage, in cancellable steps
      load_delay=0.0                            seconds load() takes
      texture_px_max=256                        largest texture written (PNG encoding is slow)
    Counters: calls[stage], released (release_gpu calls), loads, unloads."""

    name = "fault"
    label = "Fault injection (tests)"

    def __init__(
        self,
        fail: str | None = None,
        fail_above: str | None = None,
        delay: Any = 0.0,
        load_delay: Any = 0.0,
        texture_px_max: Any = 256,
        **_: Any,
    ):
        self.fail = parse_fail_spec(fail)
        self.fail_above = parse_fail_above(fail_above)
        self.delay = _number(delay)
        self.load_delay = _number(load_delay)
        self.texture_px_max = int(_number(texture_px_max))
        self.calls: Counter[str] = Counter()
        self.released = 0
        self.loads = 0
        self.unloads = 0

    def load(self, progress=None) -> None:
        self.loads += 1
        steps = 5
        for i in range(steps):
            if progress:
                progress(i / steps, "loading test weights")
            time.sleep(self.load_delay / steps)
        if progress:
            progress(1.0, "ready")

    def unload(self) -> None:
        self.unloads += 1

    def release_gpu(self) -> None:
        self.released += 1

    def _stage_for_knob(self, knob: str) -> str:
        return next(s.name for s in self.stages if knob in s.knobs)

    def run_stage(
        self, stage: str, state: dict[str, Any], params: GenerationParams, ctx: StageContext
    ) -> None:
        self.calls[stage] += 1
        steps = 4
        for i in range(steps):
            ctx.progress(i, steps, stage)
            if self.delay:
                time.sleep(self.delay / steps)
        if stage in self.fail:
            kind, count = self.fail[stage]
            if self.calls[stage] <= count:
                _raise(kind, stage)
        for where, knob, threshold in self.fail_above:
            if (where or self._stage_for_knob(knob)) == stage and float(
                getattr(params, knob)
            ) > threshold:
                _raise("oom", stage)
        ctx.progress(steps, steps, stage)
        if stage == "cond":
            state["cond"] = {"image_size": params.image_size}
        elif stage == "structure":
            state["structure"] = {
                "resolution": params.resolution,
                "max_num_tokens": params.max_num_tokens,
            }
        elif stage == "texture":
            state["texture"] = {"resolution": params.resolution}
        elif stage == "decode":
            state["decoded"] = {"from": state.get("structure")}
        elif stage == "export":
            write_glb(state, min(params.texture_size, self.texture_px_max))
        else:
            raise BackendError(ErrorCode.INTERNAL, f"unknown stage {stage!r}")


# -- CudaLoadEngine (real CUDA) ------------------------------------------------------------------
#
# A memory model shaped like TRELLIS.2's (docs/GPU.md compares it with the real code): the
# 1536 cascade lowers its resolution in 128 steps until the shape tokens fit max_num_tokens
# (never below 1024); sampling memory grows with the token count and doubles-ish with
# classifier-free guidance; the remesh's dual contouring spikes with resolution³; the texture
# bake grows with texture_size². Peaks land near 30 GiB (1536 cascade), 18 GiB (1024) and
# 8 GiB (512).

TOKENS_AT_1024 = 24_576


def tokens_at(resolution: int) -> int:
    return int(TOKENS_AT_1024 * (resolution / 1024) ** 2)


def effective_resolution(params: GenerationParams) -> int:
    """The cascade's token-budget loop: 1536 -> 1408 -> ... while tokens >= budget, >= 1024."""
    res = params.resolution
    if res <= 1024:
        return res
    while res > 1024 and tokens_at(res) >= params.max_num_tokens:
        res -= 128
    return res


def stage_bytes(stage: str, params: GenerationParams, scale: float = 1.0) -> int:
    """Working memory a stage allocates on top of the resident weights."""
    res = effective_resolution(params)
    tokens = tokens_at(res)
    cfg = 1.5 if params.guidance else 1.0
    if stage == "cond":
        size = 0.25 * GIB * (params.image_size / 1024) ** 2
    elif stage == "structure":
        size = 2 * GIB + tokens * 400 * 1024 * cfg
    elif stage == "texture":
        size = 1 * GIB + tokens * 400 * 1024 * 0.8
    elif stage == "decode":
        size = 1 * GIB + tokens * 256 * 1024
    elif stage == "export":
        remesh = 8 * GIB * (res / 1024) ** 3 if params.remesh else 0.5 * GIB * (res / 1024) ** 2
        size = remesh + params.texture_size**2 * 256 + params.decimation_target * 128
    else:
        raise ValueError(stage)
    return int(size * scale)


def predicted_peaks(
    params: GenerationParams, weights_gb: float = 2.0, scale: float = 1.0
) -> dict[str, int]:
    """Peak allocated bytes per stage (weights + working memory), for tests to compare with."""
    weights = int(weights_gb * GIB)
    return {s.name: weights + stage_bytes(s.name, params, scale) for s in STAGES}


class CudaLoadEngine(_CachingEngine):
    """Stages that really allocate and compute on CUDA, sized by the model above.
    Options: weights_gb=2 (resident "weights"), scale=1.0 (multiplies working memory),
    chunk_mb=256, poison="<stage>" (a real device-side assert there), poison_marker=<path>
    (poison only while the file is absent; it is created first, so a fresh process succeeds),
    texture_px_max=256. Stage outputs are kept on the CPU (as TRELLIS.2's app packs latents),
    so after a failed attempt nothing but the weights stays on the GPU."""

    name = "cuda_load"
    label = "CUDA load (tests)"
    uses_gpu = True

    def __init__(
        self,
        weights_gb: Any = 2.0,
        scale: Any = 1.0,
        chunk_mb: Any = 256,
        poison: str | None = None,
        poison_marker: str | None = None,
        texture_px_max: Any = 256,
        **_: Any,
    ):
        self.weights_bytes = int(_number(weights_gb) * GIB)
        self.scale = _number(scale)
        self.chunk = max(MIB, int(_number(chunk_mb) * MIB))
        self.poison = poison or None
        self.poison_marker = Path(poison_marker) if poison_marker else None
        self.texture_px_max = int(_number(texture_px_max))
        self._host_weights = None  # pinned CPU copy: the "checkpoint"
        self._weights = None  # the GPU copy while resident
        self.calls: Counter[str] = Counter()
        self.released = 0

    def load(self, progress=None) -> None:
        import torch

        if self._host_weights is None:
            if progress:
                progress(0.0, "creating test weights")
            self._host_weights = torch.ones(
                self.weights_bytes // 2, dtype=torch.float16, pin_memory=True
            )
        self._to_gpu()
        # Warm up cuBLAS like a real model load does: its workspace (32 MiB on Hopper) stays
        # allocated for the life of the process, so it belongs to the baseline, not to a leak.
        probe = torch.ones(64, 64, device="cuda", dtype=torch.float16)
        (probe @ probe).sum().item()
        del probe
        if progress:
            progress(1.0, "ready")

    def _to_gpu(self) -> None:
        if self._weights is None and self._host_weights is not None:
            self._weights = self._host_weights.to("cuda", non_blocking=True)

    def release_gpu(self) -> None:
        self.released += 1
        self._weights = None  # the pinned host copy stays: moving "to CPU" costs nothing

    def unload(self) -> None:
        self._weights = None
        self._host_weights = None

    def _work(self, nbytes: int, ctx: StageContext) -> float:
        """Allocate `nbytes` in chunks, touching every byte, then compute on them."""
        import torch

        buffers = []
        steps = max(1, -(-nbytes // self.chunk))
        left = nbytes
        for i in range(steps):
            size = min(self.chunk, left)
            left -= size
            buffers.append(
                torch.full((max(1, size // 2),), 0.5, dtype=torch.float16, device="cuda")
            )
            if i % 8 == 0:
                ctx.progress(i, steps, f"{(nbytes - left) / GIB:.1f} GiB")
        block = (
            buffers[0][: 1024 * 1024].view(1024, -1)
            if buffers[0].numel() >= 1 << 20
            else buffers[0].view(1, -1)
        )
        product = block @ block.T  # a real kernel over allocated memory
        total = float(product.float().sum().item())
        for buf in buffers[1:]:
            buf.mul_(2.0)
        torch.cuda.synchronize()
        return total

    def _device_assert(self) -> None:
        import torch

        table = torch.zeros(8, device="cuda")
        index = torch.tensor([4096], device="cuda")  # far out of range: kernel assert
        table[index] += 1.0
        torch.cuda.synchronize()

    def run_stage(
        self, stage: str, state: dict[str, Any], params: GenerationParams, ctx: StageContext
    ) -> None:
        self.calls[stage] += 1
        ctx.progress(0, 1, stage)
        if self.poison == stage and (self.poison_marker is None or not self.poison_marker.exists()):
            if self.poison_marker is not None:
                self.poison_marker.write_text("poisoned once\n")
            self._device_assert()
        if stage != "export":
            self._to_gpu()
        checksum = self._work(stage_bytes(stage, params, self.scale), ctx)
        res = effective_resolution(params)
        if stage == "cond":
            state["cond"] = {"image_size": params.image_size, "checksum": checksum}
        elif stage == "structure":
            state["structure"] = {"resolution": res, "tokens": tokens_at(res)}
        elif stage == "texture":
            state["texture"] = {"resolution": res}
        elif stage == "decode":
            state["decoded"] = {"resolution": res}
        elif stage == "export":
            write_glb(state, min(params.texture_size, self.texture_px_max), (60, 140, 220, 255))
        ctx.progress(1, 1, stage)
