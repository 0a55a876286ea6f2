"""A TRELLIS.2 weights folder: its model names and layout, safetensors headers read without
importing safetensors, the check of a checkpoint's keys against the model, building models
without their random initialisation, and where the auxiliary models (DINOv3, background
removal) may live. Shared by the engine and doctor."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import BackendError, ErrorCode

log = logging.getLogger(__name__)

MODEL_NAMES = (
    "sparse_structure_flow_model",
    "sparse_structure_decoder",
    "shape_slat_flow_model_512",
    "shape_slat_flow_model_1024",
    "shape_slat_decoder",
    "tex_slat_flow_model_512",
    "tex_slat_flow_model_1024",
    "tex_slat_decoder",
)
DEFAULT_SHAPE_ENCODER = "ckpts/shape_enc_next_dc_f16c32_fp16"
DINOV3_ID = "facebook/dinov3-vitl16-pretrain-lvd1689m"
# Places inside the weights folder where a DINOv3 / background-removal copy may live.
DINOV3_DIRS = (DINOV3_ID, "dinov3", "dinov3-vitl16-pretrain-lvd1689m")
REMBG_DIRS = ("briaai/RMBG-2.0", "ZhengPeng7/BiRefNet", "rembg", "BiRefNet", "RMBG-2.0")


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (u64 little-endian length + JSON); no import of
    safetensors needed. Raises ValueError on a truncated or malformed file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name}: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, 100_000_000):
            raise ValueError(f"{path.name}: header length {length} exceeds the file")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise ValueError(f"{path.name}: unreadable header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: header is not an object")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise ValueError(
            f"{path.name}: truncated ({size} bytes, the header describes {8 + length + end})"
        )
    return header


def safetensors_keys(path: str | Path) -> set[str]:
    return {k for k in read_safetensors_header(path) if k != "__metadata__"}


def check_weight_keys(name: str, model: Any, path: str | Path) -> dict[str, list[str]]:
    """Upstream loads with strict=False, so a checkpoint for another architecture loads
    silently into random weights. Fail on what breaks the model: a parameter the file lacks.
    Tolerate what upstream tolerates and what cannot hurt: buffers the model computes itself
    (`rope_phases`, `pos_emb`) and keys the model ignores; both are reported."""
    file_keys = safetensors_keys(path)
    parameters = {key for key, _ in model.named_parameters()}
    model_keys = set(model.state_dict().keys())
    missing = model_keys - file_keys
    missing_parameters = sorted(missing & parameters)
    report = {
        "missing_buffers": sorted(missing - parameters),
        "unexpected": sorted(file_keys - model_keys),
    }
    if missing_parameters:
        shown = ", ".join(missing_parameters[:3])
        raise BackendError(
            ErrorCode.WEIGHTS_MISMATCH,
            f"weights of {name} do not match the model code: {len(missing_parameters)} "
            f"parameters missing (e.g. {shown}) in {path}",
            "Download the weights again for the TRELLIS.2 revision you run (or update the "
            "checkout); never use the spconv/torchsparse conv backends with released weights.",
        )
    if report["unexpected"]:
        log.warning(
            "%s: %d keys in %s are not used by the model (e.g. %s)",
            name,
            len(report["unexpected"]),
            Path(path).name,
            ", ".join(report["unexpected"][:3]),
        )
    return report


_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


@contextmanager
def skipped_initialisation() -> Iterator[None]:
    """Model constructors fill every tensor with random values that load_state_dict then
    overwrites: about 100 s of CPU for TRELLIS.2's 4B parameters (9 s without; measured on
    the GPU machine). The init functions do nothing while models are built; buffers computed
    from arithmetic (positional embeddings) are unaffected, and a parameter the file lacks
    fails `check_weight_keys` instead of staying uninitialised."""
    import torch

    saved = {n: getattr(torch.nn.init, n) for n in _INIT_FUNCTIONS if hasattr(torch.nn.init, n)}
    for name in saved:
        setattr(torch.nn.init, name, _keep)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _keep(tensor: Any, *args: Any, **kwargs: Any) -> Any:
    return tensor


def read_pipeline_config(weights_dir: str | Path, name: str = "pipeline.json") -> dict[str, Any]:
    """The `args` object of pipeline.json (or texturing_pipeline.json) in the weights folder."""
    path = Path(weights_dir) / name
    if not path.is_file():
        raise BackendError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"{path} not found",
            "Download microsoft/TRELLIS.2-4B into the weights folder (see docs/TRELLIS2.md).",
        )
    try:
        args = json.loads(path.read_text(encoding="utf-8"))["args"]
        if not isinstance(args.get("models"), dict):
            raise KeyError("models")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackendError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"{path} is not a TRELLIS.2 pipeline file ({exc})",
            "Download pipeline.json again from microsoft/TRELLIS.2-4B.",
        ) from None
    return args


def resolve_model_path(weights_dir: str | Path, value: str) -> Path:
    """A pipeline.json model entry -> the local checkpoint stem (…/name without suffix)."""
    candidate = Path(value)
    return candidate if candidate.is_absolute() else Path(weights_dir) / value


def model_files(weights_dir: str | Path, args: dict[str, Any]) -> dict[str, Path]:
    return {
        name: resolve_model_path(weights_dir, args["models"][name])
        for name in MODEL_NAMES
        if name in args["models"]
    }


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_aux_paths(
    weights_dir: str | Path | None,
    dinov3_path: str | None,
    rembg_path: str | None,
    args: dict[str, Any] | None = None,
) -> tuple[str | None, str | None]:
    """Local folders for DINOv3 and the background-removal model: the explicit paths, else
    conventional places inside the weights folder, else the config's hub id (which then loads
    only from the local Hugging Face cache, as HF_HUB_OFFLINE is set). None if unknown."""

    def pick(explicit: str | None, names: tuple[str, ...], config_key: str) -> str | None:
        if explicit:
            return str(explicit)
        if weights_dir:
            configured = ((args or {}).get(config_key) or {}).get("args", {}).get("model_name")
            for name in ((configured,) if configured else ()) + names:
                if _is_model_dir(Path(weights_dir) / name):
                    return str(Path(weights_dir) / name)
        configured = ((args or {}).get(config_key) or {}).get("args", {}).get("model_name")
        return configured or None

    dinov3 = pick(dinov3_path, DINOV3_DIRS, "image_cond_model")
    rembg = pick(rembg_path, REMBG_DIRS, "rembg_model")
    return dinov3, rembg
