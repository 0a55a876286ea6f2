"""The TRELLIS.2 engine: runs the real pipeline stage by stage from a local weights folder."""

from __future__ import annotations

import inspect
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, ErrorCode, InputError
from ..params import SAMPLER_KEYS, GenerationParams
from ..pipeline import gpu
from ..safefs import Folder
from . import attention, sparse_attention
from .base import KNOBS, Engine, Stage, StageContext
from .upstream import missing_module_hint
from .upstream_fixes import bake_input, cache_released_for_cumesh, quiet_voxeliser, unit_normals
from .weights import (
    DEFAULT_SHAPE_ENCODER,
    MODEL_NAMES,
    check_weight_keys,
    model_files,
    read_pipeline_config,
    resolve_aux_paths,
    resolve_model_path,
    skipped_initialisation,
)

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

# Our resolution tiers -> upstream pipeline types (the official demo's mapping, §3).
PIPELINE_TYPES = {512: "512", 1024: "1024_cascade", 1536: "1536_cascade"}
# The ladder's own cascade resolution below 1024 (upstream's token loop never goes there):
# the 1024 cascade's models, high resolution 768, a third fewer tokens (issue #12).
LADDER_CASCADES = {768: "1024_cascade"}
CASCADE_LR_RESOLUTION = 512  # the cascade's low-resolution pass (upstream's run())


@contextmanager
def _instance_wrapped(obj: Any, name: str, wrapper: Callable[..., Any]) -> Iterator[None]:
    """`obj.name` replaced, on that instance only, by `wrapper(original, *args, **kwargs)`
    while the block runs; afterwards the instance is as it was (its own attribute restored,
    or the class's method showing through again)."""
    original = getattr(obj, name)
    had_own = name in vars(obj)
    setattr(obj, name, lambda *args, **kwargs: wrapper(original, *args, **kwargs))
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


def cascade_resolutions(resolution: int) -> list[int]:
    """Where a cascade asked for `resolution` may settle: upstream lowers above 1024 in steps
    of 128 to 1024, and the ladder's cascades run their own resolution; 768 and 1024 are
    counted too, for the ladder's lower levels."""
    steps = range(resolution, 1024, -128) if resolution > 1024 else ()
    return sorted({*steps, 1024, 768, resolution} - {512}, reverse=True)


def cascade_token_counts(hr_coords: Any, lr_resolution: int, resolution: int) -> dict[int, int]:
    """The tokens the cascade's high-resolution pass would have at each resolution it may
    settle on: the upsampled coordinates of the low-resolution pass, quantised to that
    resolution's grid of 16-voxel cells, deduplicated (as `sample_shape_slat_cascade` counts
    them before choosing its resolution)."""
    import torch

    counts = {}
    for r in cascade_resolutions(resolution):
        cells = ((hr_coords[:, 1:] + 0.5) / lr_resolution * (r // 16)).int()
        counts[r] = int(torch.cat([hr_coords[:, :1], cells], dim=1).unique(dim=0).shape[0])
    return counts


# Sparse-structure grid: 32 for all three types we use (only the plain "1024" type uses 64).
SS_RESOLUTION = 32
NVDIFFRAST_FACE_LIMIT = 16_777_216  # app.py simplifies to this before baking
ALPHA_THRESHOLD = 0.8 * 255  # upstream crops to pixels above this alpha
AABB = [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]]
CACHE_FILE = "trellis2_latents.npz"
CACHE_META = "trellis2_latents.json"
_SAMPLER_ATTRS = {
    "sparse_structure": "sparse_structure_sampler",
    "shape": "shape_slat_sampler",
    "texture": "tex_slat_sampler",
}


# -- helpers --------------------------------------------------------------------------------
def pin_device(device: str) -> str:
    """The device the engine uses inside this process. Upstream hard-codes the default CUDA
    device (`.cuda()`, "cuda" in the DINOv3 extractor, BiRefNet, `to_glb`, the texturing
    pipeline), so `cuda:1` would split tensors across cards. Instead the process is pinned to
    that one GPU with CUDA_VISIBLE_DEVICES, where it is `cuda`. Only possible before CUDA
    starts; the reliable way is `--gpu N` on the command line."""
    text = str(device).strip()
    kind, _, index = text.partition(":")
    if kind != "cuda":
        return text
    if index in ("", "0"):
        return "cuda"
    if not index.isdigit():
        raise BackendError(ErrorCode.BAD_PARAMS, f"bad device {text!r}", "Use cuda or cuda:N.")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",")] if visible else None
    torch = sys.modules.get("torch")
    started = False
    if torch is not None:
        try:
            started = bool(torch.cuda.is_initialized())
        except Exception:
            started = True
    if started or (entries is not None and int(index) >= len(entries)):
        raise BackendError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"cannot use {text}: "
            + (
                "CUDA has already started in this process"
                if started
                else f"only GPUs {visible} are visible"
            ),
            f"Start the backend with --gpu {index} (it sets CUDA_VISIBLE_DEVICES) and device cuda.",
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = entries[int(index)] if entries else index
    return "cuda"


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise BackendError(ErrorCode.BAD_PARAMS, f"engine option {name} must be true or false")


def _to(obj: Any, device: Any) -> Any:
    """Move tensors, sparse tensors and meshes (also inside dicts/lists) to a device."""
    if obj is None or isinstance(obj, (str, bytes, int, float, Path)):
        return obj
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    mover = getattr(obj, "to", None)
    return mover(device) if callable(mover) else obj


def _on_accelerator(obj: Any) -> bool:
    if isinstance(obj, dict):
        return any(_on_accelerator(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_on_accelerator(v) for v in obj)
    for attr in ("feats", "vertices"):
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
            break
    device = getattr(obj, "device", None)
    return getattr(device, "type", "cpu") != "cpu"


def _crop_premultiply(rgba: Image.Image) -> Image.Image:
    """Upstream's crop: a square around the pixels above 80% alpha, RGB times alpha."""
    import numpy as np
    from PIL import Image

    alpha = np.asarray(rgba)[:, :, 3]
    found = np.argwhere(alpha > ALPHA_THRESHOLD)
    x0, y0 = found[:, 1].min(), found[:, 0].min()
    x1, y1 = found[:, 1].max(), found[:, 0].max()
    cx, cy, size = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
    cropped = rgba.crop((cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2))
    arr = np.asarray(cropped).astype(np.float32) / 255
    return Image.fromarray((arr[:, :, :3] * arr[:, :, 3:4] * 255).astype(np.uint8))


def _parse_mesh(data: bytes, fmt: str) -> Any:
    from ..checks import meshes  # numpy: imported when used, so doctor runs on a bare Python

    return meshes.read_mesh(data, fmt)  # the reader both engines share (UVs kept)


def texturing_resolution(resolution: int) -> int:
    """Upstream's texturing pipeline has 512 and 1024 models only (run() picks 512 or 1024)."""
    return 512 if resolution <= 512 else 1024


def _default_steps(sampler: Any) -> int:
    """Upstream's own default when pipeline.json names no steps: the sampler's signature."""
    try:
        default = inspect.signature(sampler.sample).parameters["steps"].default
    except (TypeError, ValueError, KeyError, AttributeError):
        default = inspect.Parameter.empty
    return int(default) if isinstance(default, int) else 50


# -- the engine ----------------------------------------------------------------------------


class Trellis2Engine(Engine):
    """Real TRELLIS.2 through its staging API, one resumable stage per pipeline step."""

    name = "trellis2"
    label = "TRELLIS.2"
    uses_gpu = True
    # Steps, guidance and the input size cannot lower a peak of the real code (memmodel.py),
    # so the ladder never spends a level on them here.
    capabilities = KNOBS - {"steps_scale", "guidance", "image_size"}
    predicts_memory = True
    counts_cascade_tokens = True
    stages = (
        Stage("conditioning", "Preparing the image", frozenset({"image_size"})),
        Stage(
            "sparse_structure",
            "Sampling the sparse structure",
            frozenset({"steps_scale", "guidance"}),
        ),
        Stage(
            "shape",
            "Sampling the shape",
            frozenset({"resolution", "max_num_tokens", "steps_scale", "guidance"}),
        ),
        Stage(
            "texture", "Sampling the texture", frozenset({"resolution", "steps_scale", "guidance"})
        ),
        Stage("decode", "Decoding the mesh", frozenset()),
        Stage(
            "export",
            "Baking textures and writing the GLB",
            frozenset({"texture_size", "decimation_target", "remesh", "remesh_band"}),
        ),
    )
    texture_stages = (
        Stage(
            "tex_prepare", "Preparing the image and mesh", frozenset({"image_size", "resolution"})
        ),
        Stage("tex_encode", "Encoding the mesh", frozenset({"resolution"})),
        Stage(
            "tex_sample",
            "Sampling the texture",
            frozenset({"resolution", "steps_scale", "guidance"}),
        ),
        Stage("tex_decode", "Decoding the texture", frozenset()),
        Stage("tex_bake", "Baking textures and writing the GLB", frozenset({"texture_size"})),
    )

    def __init__(
        self,
        weights_dir: str | None = None,
        dinov3_path: str | None = None,
        rembg_path: str | None = None,
        trellis_checkout: str | None = None,
        device: str = "cuda",
        low_vram: Any = True,
        attention: str = "auto",
        **ignored: Any,
    ):
        env = os.environ.get
        self.weights_dir = weights_dir or env("TRELLIS2_WEIGHTS") or None
        self.dinov3_path = dinov3_path or env("TRELLIS2_DINOV3") or None
        self.rembg_path = rembg_path or env("TRELLIS2_REMBG") or None
        self.trellis_checkout = trellis_checkout or env("TRELLIS2_CHECKOUT") or None
        self.requested_device = str(device)
        self.device = pin_device(self.requested_device)
        self.low_vram = _bool(low_vram, "low_vram")
        self.attention_choice = str(attention or "auto")
        if self.attention_choice not in ("auto", *attention_backends()):
            raise BackendError(
                ErrorCode.BAD_PARAMS,
                f"unknown attention backend {self.attention_choice!r}",
                f"Use auto or one of {', '.join(attention_backends())}.",
            )
        if ignored:
            log.info("trellis2 engine: ignoring options %s", sorted(ignored))
        self.attention_backend: str | None = None
        self.attention_note: str | None = None
        self.weight_reports: dict[str, dict[str, list[str]]] = {}
        self._rembg_cfg: dict[str, Any] = {}
        self.pipeline: Any = None
        self.texturing: Any = None
        self._up: dict[str, Any] = {}
        self._resolved: dict[str, str | None] = {}
        self._active_state: dict[str, Any] | None = None
        self._resident = False
        self.last_effective_resolution: int | None = None
        self.last_pipeline_type: str | None = None

    # -- loading -----------------------------------------------------------------------

    def _weights(self) -> Path:
        if not self.weights_dir:
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                "no TRELLIS.2 weights folder configured",
                "Set TRELLIS2_WEIGHTS or --engine-opt weights_dir=<folder> (see docs/TRELLIS2.md).",
            )
        path = Path(self.weights_dir).expanduser()
        if not path.is_dir():
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"weights folder {path} does not exist",
                "Point weights_dir at the folder holding pipeline.json and ckpts/.",
            )
        return path

    def _import_upstream(self) -> None:
        if self.trellis_checkout:
            checkout = str(Path(self.trellis_checkout).expanduser())
            if checkout not in sys.path:
                sys.path.insert(0, checkout)
        try:
            import o_voxel.postprocess as postprocess
            import trellis2.models as t2models
            import trellis2.modules.image_feature_extractor as features
            import trellis2.pipelines.rembg as rembg
            import trellis2.pipelines.samplers as samplers
            from trellis2.modules.sparse import SparseTensor
            from trellis2.pipelines.trellis2_image_to_3d import Trellis2ImageTo3DPipeline
        except (ImportError, OSError) as exc:
            module, hint = missing_module_hint(exc)
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"cannot import TRELLIS.2 ({module}): {exc}",
                hint,
            ) from None
        self._up = {
            "models": t2models,
            "features": features,
            "rembg": rembg,
            "samplers": samplers,
            "SparseTensor": SparseTensor,
            "Pipeline": Trellis2ImageTo3DPipeline,
            "postprocess": postprocess,
        }

    def _load_model(self, name: str, stem: Path) -> Any:
        for suffix in (".json", ".safetensors"):
            if not stem.with_suffix(suffix).is_file():
                raise BackendError(
                    ErrorCode.ENGINE_UNAVAILABLE,
                    f"{name}: {stem.with_suffix(suffix)} is missing",
                    "Download the missing checkpoint into the weights folder "
                    "(see docs/TRELLIS2.md for the layout).",
                )
        try:
            with skipped_initialisation():
                model = self._up["models"].from_pretrained(path=str(stem))
        except RuntimeError as exc:
            if "size mismatch" in str(exc):
                raise BackendError(
                    ErrorCode.WEIGHTS_MISMATCH, f"{name}: {exc}".splitlines()[0]
                ) from None
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"cannot load {name} from {stem}: {exc}",
                "The checkpoint looks damaged; download it again.",
            ) from None
        self.weight_reports[name] = check_weight_keys(name, model, stem.with_suffix(".safetensors"))
        return model

    def _aux_model(self, kind: str, cfg: dict[str, Any], path: str | None) -> Any:
        module = self._up["features" if kind == "image_cond_model" else "rembg"]
        try:
            return getattr(module, cfg["name"])(**{**cfg.get("args", {}), "model_name": path})
        except (OSError, ValueError, ImportError, AttributeError) as exc:
            which = "DINOv3" if kind == "image_cond_model" else "background-removal model"
            env = "TRELLIS2_DINOV3" if kind == "image_cond_model" else "TRELLIS2_REMBG"
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"cannot load the {which} from {path}: {exc}",
                f"Download it once into a local folder and set {env} to it (see docs/TRELLIS2.md).",
            ) from None

    def load(self, progress: Callable[[float, str], None] | None = None) -> None:
        if self.pipeline is not None:
            return
        report = progress or (lambda fraction, message: None)
        weights = self._weights()
        args = read_pipeline_config(weights)
        files = model_files(weights, args)
        absent = [n for n in MODEL_NAMES if n not in files]
        if absent:
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"pipeline.json lists no {', '.join(absent)}",
                "Download pipeline.json again from microsoft/TRELLIS.2-4B.",
            )
        dinov3, rembg_path = resolve_aux_paths(weights, self.dinov3_path, self.rembg_path, args)
        self._resolved = {"dinov3": dinov3, "rembg": rembg_path}
        # Never reach the hub at run time: a failed local load must fail, not download.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        gpu.configure_allocator()
        backend, self.attention_note = attention.resolve(self.attention_choice)
        attention.apply(backend)  # before trellis2 is imported: its config reads env at import
        self.attention_backend = backend
        report(0.02, f"importing TRELLIS.2 (sparse attention: {backend})")
        self._import_upstream()
        if backend == sparse_attention.NAME:
            sparse_attention.install()
        import torch

        steps = len(MODEL_NAMES) + 2
        loaded: dict[str, Any] = {}
        for i, name in enumerate(MODEL_NAMES):
            report((i + 1) / steps, f"loading {name}")
            loaded[name] = self._load_model(name, files[name])
        samplers_mod = self._up["samplers"]
        built: dict[str, Any] = {}
        for key, attr in _SAMPLER_ATTRS.items():
            cfg = args[attr]
            built[attr] = getattr(samplers_mod, cfg["name"])(**cfg.get("args", {}))
            built[f"{attr}_params"] = self._clean_defaults(key, cfg.get("params", {}))
        report((steps - 1) / steps, "loading DINOv3")
        image_cond = self._aux_model("image_cond_model", args["image_cond_model"], dinov3)
        # Background removal is loaded on first use: most inputs have transparency, and
        # without a local BiRefNet/RMBG folder only images without it are refused.
        self._rembg_cfg = dict(args.get("rembg_model") or {"name": "BiRefNet", "args": {}})
        pipeline = self._up["Pipeline"](
            models=loaded,
            sparse_structure_sampler=built["sparse_structure_sampler"],
            shape_slat_sampler=built["shape_slat_sampler"],
            tex_slat_sampler=built["tex_slat_sampler"],
            sparse_structure_sampler_params=built["sparse_structure_sampler_params"],
            shape_slat_sampler_params=built["shape_slat_sampler_params"],
            tex_slat_sampler_params=built["tex_slat_sampler_params"],
            shape_slat_normalization=args["shape_slat_normalization"],
            tex_slat_normalization=args["tex_slat_normalization"],
            image_cond_model=image_cond,
            rembg_model=None,
            low_vram=self.low_vram,
            default_pipeline_type=args.get("default_pipeline_type", "1024_cascade"),
        )
        # With low_vram this only records the device; stages move each model in and out.
        pipeline.to(device=torch.device(self.device))
        self._resident = not self.low_vram
        self._tune_flex_gemm()
        self.pipeline = pipeline
        report(1.0, "ready")

    def _tune_flex_gemm(self) -> None:
        # Pre-Ampere GPUs crash in FlexGEMM's default Triton kernel (§4); the explicit GEMM
        # path works there. Never switch to spconv instead (silently broken weights).
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.get_device_capability(0) < (8, 0):
                from trellis2.modules.sparse.conv import config as conv_config

                conv_config.FLEX_GEMM_ALGO = "explicit_gemm"
        except Exception as exc:  # only an optimisation for old GPUs
            log.debug("FLEX_GEMM_ALGO not adjusted: %s", exc)

    @staticmethod
    def _clean_defaults(stage: str, params: dict[str, Any]) -> dict[str, Any]:
        # Upstream merges its defaults into every call; a stray key there would reach the
        # model's forward() and fail stage 1 with a TypeError.
        stray = sorted(set(params) - set(SAMPLER_KEYS))
        if stray:
            log.warning("ignoring unknown %s sampler keys in pipeline.json: %s", stage, stray)
        return {k: v for k, v in params.items() if k in SAMPLER_KEYS}

    def _ensure_texturing(self) -> Any:
        if self.texturing is not None:
            return self.texturing
        pipe = self._require_pipeline()
        weights = self._weights()
        tex_args: dict[str, Any] = {}
        if (weights / "texturing_pipeline.json").is_file():
            tex_args = read_pipeline_config(weights, "texturing_pipeline.json")
        encoder_rel = tex_args.get("models", {}).get("shape_slat_encoder", DEFAULT_SHAPE_ENCODER)
        encoder = self._load_model("shape_slat_encoder", resolve_model_path(weights, encoder_rel))
        try:
            import o_voxel.convert
            from trellis2.pipelines.trellis2_texturing import Trellis2TexturingPipeline
        except (ImportError, OSError) as exc:
            module, hint = missing_module_hint(exc)
            raise BackendError(
                ErrorCode.ENGINE_UNAVAILABLE, f"cannot import the texturing pipeline: {exc}", hint
            ) from None
        quiet_voxeliser(o_voxel.convert)
        sampler_params = pipe.tex_slat_sampler_params
        if "tex_slat_sampler" in tex_args:
            sampler_params = self._clean_defaults(
                "texture", tex_args["tex_slat_sampler"].get("params", {})
            )
        # Share the image-to-3D pipeline's models instead of loading them a second time.
        texturing = Trellis2TexturingPipeline(
            models={
                "shape_slat_encoder": encoder,
                "tex_slat_decoder": pipe.models["tex_slat_decoder"],
                "tex_slat_flow_model_512": pipe.models["tex_slat_flow_model_512"],
                "tex_slat_flow_model_1024": pipe.models["tex_slat_flow_model_1024"],
            },
            tex_slat_sampler=pipe.tex_slat_sampler,
            tex_slat_sampler_params=sampler_params,
            shape_slat_normalization=pipe.shape_slat_normalization,
            tex_slat_normalization=pipe.tex_slat_normalization,
            image_cond_model=pipe.image_cond_model,
            rembg_model=pipe.rembg_model,
            low_vram=self.low_vram,
        )
        texturing.to(device=self._device())
        self.texturing = texturing
        return texturing

    def _require_pipeline(self) -> Any:
        if self.pipeline is None:
            self.load()
        return self.pipeline

    def _device(self) -> Any:
        import torch

        return torch.device(self.device)

    # -- job kinds and cache -----------------------------------------------------------

    def stages_for(self, kind: str) -> tuple[Stage, ...]:
        if kind == "generate":
            return self.stages
        if kind == "reexport":
            return self.stages[-2:]  # decode + export from cached latents
        if kind == "texture":
            return self.texture_stages
        return super().stages_for(kind)

    def save_cache(self, state: dict[str, Any], directory: Path) -> None:
        """Keep the two latents (a few MB) so a re-export reruns only decode and export."""

        directory = Path(directory)
        if "cached_latents" in state and "shape_slat" not in state:
            # A re-export's own folder gets the latents too, so it can be re-exported again.
            self._write_cache(directory, state["cached_latents"], state["cached_meta"])
            return
        if "shape_slat" not in state or "tex_slat" not in state:
            return
        arrays: dict[str, Any] = {}
        meta: dict[str, Any] = {
            "format": 1,
            "effective_resolution": int(state["effective_resolution"]),
            "pipeline_type": state.get("pipeline_type"),
        }
        for key in ("shape_slat", "tex_slat"):
            slat = _to(state[key], "cpu")
            meta[f"{key}_dtype"] = str(slat.feats.dtype).replace("torch.", "")
            arrays[f"{key}_feats"] = slat.feats.float().numpy()  # bf16/fp16 -> f32 is exact
            arrays[f"{key}_coords"] = slat.coords.int().numpy()
        self._write_cache(directory, arrays, meta)

    @staticmethod
    def _write_cache(directory: Path, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        import numpy as np

        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        # Through the job folder's handle: a link planted in it is replaced, never written
        # through (the job store's rule, backend/safefs.py).
        with Folder.at(directory) as folder:
            folder.write(CACHE_FILE, buffer.getvalue())
            folder.write(CACHE_META, json.dumps(meta).encode("utf-8"))

    def load_cache(self, directory: Path) -> dict[str, Any]:
        import numpy as np

        directory = Path(directory)
        try:
            with Folder.at(directory) as folder:
                raw_meta, raw_latents = folder.read(CACHE_META), folder.read(CACHE_FILE)
        except FileNotFoundError:
            raise BackendError(
                ErrorCode.NOT_FOUND,
                f"no TRELLIS.2 latents in {directory}",
                "Only jobs generated by the TRELLIS.2 engine can be re-exported; generate again.",
            ) from None
        except OSError as exc:  # a link or a foreign file where the cache should be
            raise BackendError(
                ErrorCode.NOT_FOUND, f"the latent cache in {directory} cannot be read: {exc}"
            ) from None
        try:
            meta = json.loads(raw_meta.decode("utf-8"))
            with np.load(io.BytesIO(raw_latents), allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise BackendError(
                ErrorCode.NOT_FOUND, f"the latent cache in {directory} is damaged: {exc}"
            ) from None
        return {
            "cached_latents": arrays,
            "cached_meta": meta,
            "effective_resolution": int(meta["effective_resolution"]),
            "effective_params": {"resolution": int(meta["effective_resolution"])},
            "pipeline_type": meta.get("pipeline_type"),
        }

    def _latent(self, state: dict[str, Any], key: str) -> Any:
        if key in state:
            return state[key]
        import torch

        arrays, meta = state["cached_latents"], state["cached_meta"]
        dtype = getattr(torch, meta.get(f"{key}_dtype", "float32"))
        return self._up["SparseTensor"](
            feats=torch.from_numpy(arrays[f"{key}_feats"]).to(dtype),
            coords=torch.from_numpy(arrays[f"{key}_coords"]),
        )

    # -- running stages ----------------------------------------------------------------

    def run_stage(
        self, stage: str, state: dict[str, Any], params: GenerationParams, ctx: StageContext
    ) -> None:
        runner = getattr(self, f"_stage_{stage}", None)
        if runner is None:
            raise BackendError(ErrorCode.INTERNAL, f"unknown stage {stage!r}")
        pipe = self._require_pipeline()
        import torch

        self._active_state = state
        if not self.low_vram and not self._resident:
            # After release_gpu, bring every model back: the texturing pipeline's shape
            # encoder is only in that pipeline, so moving the main one is not enough.
            for loaded in (pipe, self.texturing):
                if loaded is not None:
                    loaded.to(device=self._device())
            self._resident = True
        # No except here: OOM and CUDA errors reach the runner unchanged; it calls
        # release_gpu() and decides (ladder, poison). Stage outputs are CPU-resident.
        with torch.no_grad():
            runner(state, params, ctx)

    def _sampler_params(
        self, stage: str, params: GenerationParams, defaults: dict[str, Any], sampler: Any
    ) -> dict[str, Any]:
        user = params.samplers.get(stage, {})
        unknown = sorted(set(user) - set(SAMPLER_KEYS))
        if unknown:
            raise InputError(
                ErrorCode.BAD_PARAMS,
                f"unknown sampler keys for {stage}: {', '.join(unknown)}",
                f"Allowed: {', '.join(SAMPLER_KEYS)}.",
            )
        merged = {**defaults, **user}
        steps = merged.get("steps", _default_steps(sampler))
        merged["steps"] = max(1, round(int(steps) * params.steps_scale))
        if not params.guidance:
            merged["guidance_strength"] = 1.0  # upstream skips CFG at exactly 1
        return {k: v for k, v in merged.items() if k in SAMPLER_KEYS}

    @contextmanager
    def _steps(self, sampler: Any, ctx: StageContext, total: int) -> Iterator[None]:
        """Report each sampler step and cancel at the next one, by wrapping the sampler
        instance's sample_once (the loop in FlowEulerSampler.sample calls it per step)."""
        done = [0]

        def stepped(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            ctx.progress(done[0], total)  # raises JobCancelled when cancelled
            out = original(*args, **kwargs)
            done[0] += 1
            return out

        with _instance_wrapped(sampler, "sample_once", stepped):
            yield
            ctx.progress(total, total)

    @contextmanager
    def _counted_cascade(
        self, decoder: Any, resolution: int, ctx: StageContext, counts: dict[int, int]
    ) -> Iterator[None]:
        """Count the cascade's high-resolution tokens at every resolution it may settle on as
        soon as the low-resolution pass is upsampled, and tell the runner before the
        high-resolution sampling, by wrapping the decoder instance's `upsample` (which
        `sample_shape_slat_cascade` calls once). The runner may stop the stage there."""

        def counting(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            hr_coords = original(*args, **kwargs)
            counts.update(cascade_token_counts(hr_coords, CASCADE_LR_RESOLUTION, resolution))
            try:
                ctx.tell_size(cascade_tokens=dict(counts))
            except BaseException:
                if getattr(decoder, "low_vram", False):  # what upstream does after upsample
                    decoder.cpu()
                    decoder.low_vram = False
                raise
            return hr_coords

        with _instance_wrapped(decoder, "upsample", counting):
            yield

    def _cond(self, pipe: Any, image: Image.Image, resolution: int) -> dict[str, Any]:
        cond = pipe.get_cond(image=[image], resolution=resolution, include_neg_cond=True)
        return _to(cond, "cpu")

    def _background_remover(self) -> Any:
        """The background-removal model, loaded on first use. Without one, images that have
        no transparency are refused (as input errors: nothing is wrong with the backend)."""
        pipe = self._require_pipeline()
        if pipe.rembg_model is not None:
            return pipe.rembg_model
        path = self._resolved.get("rembg")
        hint = (
            "Use an image with a transparent background (PNG with alpha), or download "
            "ZhengPeng7/BiRefNet or briaai/RMBG-2.0 into a local folder and set it as the "
            "background-removal model (rembg_path; docs/TRELLIS2.md)."
        )
        if not path:
            raise InputError(
                ErrorCode.NEEDS_TRANSPARENCY,
                "the image has no transparency and no background-removal model is set up",
                hint,
            )
        try:
            model = self._aux_model("rembg_model", self._rembg_cfg, path)
        except BackendError as exc:
            raise InputError(
                ErrorCode.NEEDS_TRANSPARENCY,
                f"the image has no transparency and background removal is unavailable: "
                f"{exc.message}",
                hint,
            ) from None
        pipe.rembg_model = model
        if self.texturing is not None:
            self.texturing.rembg_model = model
        if not self.low_vram:
            model.to(self._device())
        return model

    def _prepare_image(self, pipe: Any, image: Image.Image, image_size: int) -> Image.Image:
        """Upstream preprocess_image with our size cap and clear errors: a usable alpha skips
        background removal; an alpha (or removal result) with nothing opaque is rejected."""
        import numpy as np
        from PIL import Image

        if image.mode not in ("RGB", "RGBA"):
            has_transparency = "A" in image.getbands() or "transparency" in image.info
            image = image.convert("RGBA" if has_transparency else "RGB")
        if max(image.size) > image_size:
            scale = image_size / max(image.size)
            size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        alpha = np.asarray(image)[:, :, 3] if image.mode == "RGBA" else None
        if alpha is not None and alpha.min() < 255:
            if not (alpha > ALPHA_THRESHOLD).any():
                raise InputError(
                    ErrorCode.EMPTY_ALPHA,
                    "the image's alpha channel leaves no pixel more than 80% opaque",
                )
            return _crop_premultiply(image)
        rembg = self._background_remover()
        if self.low_vram:
            rembg.to(self._device())
        result = rembg(image.convert("RGB"))  # a copy: BiRefNet writes alpha into its input
        if self.low_vram:
            rembg.cpu()
        if not (np.asarray(result.convert("RGBA"))[:, :, 3] > ALPHA_THRESHOLD).any():
            raise InputError(
                ErrorCode.EMPTY_ALPHA,
                "background removal found no subject in the image",
                "Crop the image around the object, or supply a PNG with a transparent background.",
            )
        return _crop_premultiply(result.convert("RGBA"))

    def _stage_conditioning(self, state, params, ctx) -> None:
        pipe = self.pipeline
        prepared = self._prepare_image(pipe, state["image"], params.image_size)
        ctx.check_cancelled()
        state["prepared_image"] = prepared
        state["cond_512"] = self._cond(pipe, prepared, 512)

    def _stage_sparse_structure(self, state, params, ctx) -> None:
        import torch

        pipe = self.pipeline
        sp = self._sampler_params(
            "sparse_structure",
            params,
            pipe.sparse_structure_sampler_params,
            pipe.sparse_structure_sampler,
        )
        torch.manual_seed(params.seed)  # upstream run() seeds here; all noise is drawn on CPU
        with self._steps(pipe.sparse_structure_sampler, ctx, sp["steps"]):
            coords = pipe.sample_sparse_structure(
                cond=_to(state["cond_512"], self._device()),
                resolution=SS_RESOLUTION,
                num_samples=1,
                sampler_params=sp,
            )
        if coords.shape[0] == 0:
            raise BackendError(
                ErrorCode.EMPTY_STRUCTURE,
                "the sparse structure is empty: the model found no object in the image",
            )
        state["coords"] = coords.cpu()
        state["structure"] = {"voxels": int(coords.shape[0])}  # the runner's memory prediction
        # Later stages restore this, so a resumed stage draws the same noise as a fresh run.
        state["rng_after_ss"] = torch.get_rng_state()

    def _stage_shape(self, state, params, ctx) -> None:
        import torch

        pipe = self.pipeline
        device = self._device()
        pipeline_type = PIPELINE_TYPES.get(params.resolution) or LADDER_CASCADES[params.resolution]
        sp = self._sampler_params(
            "shape", params, pipe.shape_slat_sampler_params, pipe.shape_slat_sampler
        )
        cond_512 = _to(state["cond_512"], device)
        coords = state["coords"].to(device)
        counted: dict[int, int] = {}
        if pipeline_type == "512":
            torch.set_rng_state(state["rng_after_ss"])
            with self._steps(pipe.shape_slat_sampler, ctx, sp["steps"]):
                slat = pipe.sample_shape_slat(
                    cond=cond_512,
                    flow_model=pipe.models["shape_slat_flow_model_512"],
                    coords=coords,
                    sampler_params=sp,
                )
            resolution = 512
        else:
            state["cond_1024"] = self._cond(pipe, state["prepared_image"], 1024)
            torch.set_rng_state(state["rng_after_ss"])
            decoder = pipe.models["shape_slat_decoder"]
            with (
                self._steps(pipe.shape_slat_sampler, ctx, 2 * sp["steps"]),  # LR + HR pass
                self._counted_cascade(decoder, params.resolution, ctx, counted),
            ):
                slat, resolution = pipe.sample_shape_slat_cascade(
                    lr_cond=cond_512,
                    cond=_to(state["cond_1024"], device),
                    flow_model_lr=pipe.models["shape_slat_flow_model_512"],
                    flow_model=pipe.models["shape_slat_flow_model_1024"],
                    lr_resolution=CASCADE_LR_RESOLUTION,
                    resolution=params.resolution,
                    coords=coords,
                    sampler_params=sp,
                    # Below 1024 upstream's loop would step past its floor (it stops only at
                    # exactly 1024), so the ladder's own cascades take no budget.
                    max_num_tokens=params.max_num_tokens if params.resolution >= 1024 else 1 << 62,
                )
        state["shape_slat"] = _to(slat, "cpu")
        state["effective_resolution"] = int(resolution)
        state["effective_params"] = {"resolution": int(resolution)}
        state["structure"] = {
            "voxels": int(coords.shape[0]),
            "shape_tokens": int(state["shape_slat"].coords.shape[0]),
            "pipeline_type": pipeline_type,
        }
        if counted:
            state["structure"]["cascade_tokens"] = counted
        state["pipeline_type"] = pipeline_type
        state["rng_after_shape"] = torch.get_rng_state()
        self.last_effective_resolution = int(resolution)
        self.last_pipeline_type = pipeline_type

    def _stage_texture(self, state, params, ctx) -> None:
        import torch

        pipe = self.pipeline
        small = state["pipeline_type"] == "512"
        sp = self._sampler_params(
            "texture", params, pipe.tex_slat_sampler_params, pipe.tex_slat_sampler
        )
        cond = state["cond_512"] if small else state["cond_1024"]
        flow = pipe.models["tex_slat_flow_model_512" if small else "tex_slat_flow_model_1024"]
        torch.set_rng_state(state["rng_after_shape"])
        with self._steps(pipe.tex_slat_sampler, ctx, sp["steps"]):
            tex = pipe.sample_tex_slat(
                cond=_to(cond, self._device()),
                flow_model=flow,
                shape_slat=_to(state["shape_slat"], self._device()),
                sampler_params=sp,
            )
        state["tex_slat"] = _to(tex, "cpu")

    def _stage_decode(self, state, params, ctx) -> None:
        pipe = self.pipeline
        device = self._device()
        # Upstream run() frees the allocator's cache between sampling and decoding; the
        # decoder's large, short-lived buffers then fit where the flow models' blocks were.
        gpu.release_cache()
        meshes = pipe.decode_latent(
            shape_slat=_to(self._latent(state, "shape_slat"), device),
            tex_slat=_to(self._latent(state, "tex_slat"), device),
            resolution=state["effective_resolution"],
        )
        mesh = meshes[0]
        if mesh.faces.shape[0] == 0 or mesh.vertices.shape[0] == 0:
            raise BackendError(ErrorCode.EMPTY_STRUCTURE, "the decoder produced an empty mesh")
        if mesh.faces.shape[0] > NVDIFFRAST_FACE_LIMIT:
            mesh.simplify(target=NVDIFFRAST_FACE_LIMIT)
        state["decoded_mesh"] = mesh.to("cpu")

    def _write_glb(self, glb: Any, state: dict[str, Any], texture_size: int) -> None:
        import numpy as np

        from . import surface

        path = Path(state["output_path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        state["repaired_normals"] = unit_normals(glb)
        surface.mark_alpha_mode(glb)  # upstream writes OPAQUE whatever the alpha says
        # PNG textures: WebP needs EXT_texture_webp, which older Blender cannot import.
        data = glb.export(file_type="glb", extension_webp=False)
        path.write_bytes(data)
        state["glb_path"] = path
        state["mesh_stats"] = {
            "vertices": int(len(glb.vertices)),
            "faces": int(len(glb.faces)),
            "texture_size": int(texture_size),
        }
        state["mesh_arrays"] = (np.asarray(glb.vertices), np.asarray(glb.faces))

    def _stage_export(self, state, params, ctx) -> None:
        mesh = state["decoded_mesh"]
        device = self._device()
        with cache_released_for_cumesh():
            glb = self._export(mesh, state, params, device)
        ctx.check_cancelled()
        self._write_glb(glb, state, params.texture_size)

    def _export(self, mesh, state, params, device) -> Any:
        return self._up["postprocess"].to_glb(
            vertices=mesh.vertices.to(device),
            faces=mesh.faces.to(device),
            attr_volume=mesh.attrs.to(device),
            coords=mesh.coords.to(device),
            attr_layout=mesh.layout or self.pipeline.pbr_attr_layout,
            aabb=AABB,
            grid_size=int(state["effective_resolution"]),
            decimation_target=params.decimation_target,
            texture_size=params.texture_size,
            remesh=params.remesh,
            remesh_band=params.remesh_band,
            remesh_project=0,  # the demo's setting: no projection back onto the raw surface
        )

    # -- texturing an existing mesh ----------------------------------------------------

    def _stage_tex_prepare(self, state, params, ctx) -> None:
        import numpy as np

        tex = self._ensure_texturing()
        if "mesh_bytes" not in state:
            raise InputError(ErrorCode.BAD_MESH_INPUT, "a texture job needs a mesh")
        mesh = _parse_mesh(state["mesh_bytes"], state.get("mesh_format", "glb"))
        prepared = self._prepare_image(tex, state["image"], params.image_size)
        ctx.check_cancelled()
        vertices = np.asarray(mesh.vertices)
        low, high = vertices.min(0), vertices.max(0)
        # The same normalisation preprocess_mesh applies; its inverse puts the result back.
        state["tex_transform"] = {
            "center": ((low + high) / 2).tolist(),
            "scale": float(0.99999 / (high - low).max()),
        }
        state["tex_mesh"] = tex.preprocess_mesh(mesh=mesh)
        if getattr(mesh.visual, "uv", None) is not None:
            # preprocess_mesh builds a new mesh without visuals (same vertex order), and
            # postprocess_mesh bakes into the UVs it finds: hand the input's UVs over.
            state["tex_mesh"].visual = mesh.visual.copy()
        resolution = texturing_resolution(params.resolution)
        state["tex_cond"] = self._cond(tex, prepared, resolution)
        state["effective_params"] = {"resolution": resolution}

    def _stage_tex_encode(self, state, params, ctx) -> None:
        tex = self._ensure_texturing()
        slat = tex.encode_shape_slat(
            mesh=state["tex_mesh"], resolution=texturing_resolution(params.resolution)
        )
        state["tex_shape_slat"] = _to(slat, "cpu")

    def _stage_tex_sample(self, state, params, ctx) -> None:
        import torch

        tex = self._ensure_texturing()
        sp = self._sampler_params(
            "texture", params, tex.tex_slat_sampler_params, tex.tex_slat_sampler
        )
        small = texturing_resolution(params.resolution) == 512
        flow = tex.models["tex_slat_flow_model_512" if small else "tex_slat_flow_model_1024"]
        torch.manual_seed(params.seed)
        with self._steps(tex.tex_slat_sampler, ctx, sp["steps"]):
            slat = tex.sample_tex_slat(
                cond=_to(state["tex_cond"], self._device()),
                flow_model=flow,
                shape_slat=_to(state["tex_shape_slat"], self._device()),
                sampler_params=sp,
            )
        state["tex_tex_slat"] = _to(slat, "cpu")

    def _stage_tex_decode(self, state, params, ctx) -> None:
        tex = self._ensure_texturing()
        voxels = tex.decode_tex_slat(slat=_to(state["tex_tex_slat"], self._device()))
        state["tex_pbr_voxel"] = _to(voxels, "cpu")

    def _stage_tex_bake(self, state, params, ctx) -> None:
        import numpy as np

        tex = self._ensure_texturing()
        out = tex.postprocess_mesh(
            mesh=bake_input(state["tex_mesh"]),
            pbr_voxel=_to(state["tex_pbr_voxel"], self._device()),
            resolution=texturing_resolution(params.resolution),
            texture_size=params.texture_size,
        )
        transform = state["tex_transform"]
        matrix = np.eye(4)
        matrix[:3, :3] /= transform["scale"]
        matrix[:3, 3] = transform["center"]
        out.apply_transform(matrix)  # undo the unit-cube normalisation: same place and size
        self._write_glb(out, state, params.texture_size)

    # -- cleanup and status ------------------------------------------------------------

    def _all_models(self) -> list[Any]:
        models: list[Any] = []
        for pipe in (self.pipeline, self.texturing):
            if pipe is None:
                continue
            models.extend(getattr(pipe, "models", {}).values())
            models.extend(
                m for m in (pipe.image_cond_model, getattr(pipe, "rembg_model", None)) if m
            )
        unique: dict[int, Any] = {id(m): m for m in models}
        return list(unique.values())

    def release_gpu(self) -> None:
        """Every model to the CPU (upstream leaves one on the GPU when a stage raises) and
        drop GPU-resident state. Never raises: it also runs after a broken CUDA context."""
        for model in self._all_models():
            try:
                model.cpu()
            except Exception as exc:
                log.warning("could not move %s to the CPU: %s", type(model).__name__, exc)
        self._resident = False
        state = self._active_state
        self._active_state = None
        if state is not None:
            for key in [k for k, v in list(state.items()) if _on_accelerator(v)]:
                state.pop(key, None)

    def unload(self) -> None:
        self.release_gpu()
        self.pipeline = None
        self.texturing = None
        self._up = {}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            {
                "loaded": self.pipeline is not None,
                "attention_backend": self.attention_backend,
                "dense_attention": attention.DENSE_BACKEND,
                "attention_note": self.attention_note,
                "weights_dir": self.weights_dir,
                "dinov3_path": self._resolved.get("dinov3", self.dinov3_path),
                "rembg_path": self._resolved.get("rembg", self.rembg_path),
                "device": self.device,
                "requested_device": self.requested_device,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "low_vram": self.low_vram,
                "effective_resolution": self.last_effective_resolution,
                "pipeline_type": self.last_pipeline_type,
                "texturing_loaded": self.texturing is not None,
                "background_removal_loaded": bool(
                    self.pipeline is not None and self.pipeline.rembg_model is not None
                ),
                "weights_tolerated": {
                    name: report
                    for name, report in self.weight_reports.items()
                    if any(report.values())
                },
            }
        )
        return info


def attention_backends() -> tuple[str, ...]:
    return attention.BACKENDS
