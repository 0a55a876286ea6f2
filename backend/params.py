"""Generation parameters: presets, user overrides and their validation (no engine code here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ErrorCode, InputError

RESOLUTIONS = (512, 1024, 1536)
TEXTURE_SIZES = (256, 512, 1024, 2048, 4096)
SAMPLER_STAGES = ("sparse_structure", "shape", "texture")
# The only sampler keys TRELLIS.2's samplers accept; anything else reaches a model's
# forward() and raises TypeError in stage 1.
SAMPLER_KEYS = ("steps", "guidance_strength", "guidance_rescale", "guidance_interval", "rescale_t")
# The most triangles a mesh sent for texturing may have. With every corner split for UVs a
# triangle costs at most 72 bytes of GLB, so a mesh at the limit fits one 96 MiB frame
# (protocol.MAX_BUFFER_FRAME); TRELLIS.2 voxelises it on the CPU, which grows with faces.
TEXTURE_MAX_FACES = 1_000_000
# How many seeds one Variations action may ask for.
VARIATIONS_MIN, VARIATIONS_MAX = 2, 16


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides one generation. The ladder lowers fields; it never raises them."""

    preset: str = "balanced"
    seed: int = 42
    resolution: int = 1024  # TRELLIS.2 tier: 512, 1024 (1024_cascade) or 1536 (1536_cascade)
    max_num_tokens: int = 49152  # cascade token budget; only bites at 1536
    remesh: bool = True
    remesh_band: float = 1.0  # to_glb's narrow band in voxels; 0.5 needs 36 % less memory
    steps_scale: float = 1.0  # multiplies every stage's sampler steps
    guidance: bool = True  # classifier-free guidance; False forces guidance_strength 1
    image_size: int = 1024  # longest side of the conditioning image
    texture_size: int = 2048
    decimation_target: int = 500_000  # faces
    samplers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def replace(self, **changes: Any) -> GenerationParams:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"resolution": 512, "texture_size": 1024, "decimation_target": 200_000},
    "balanced": {"resolution": 1024, "texture_size": 2048, "decimation_target": 500_000},
    "high": {"resolution": 1536, "texture_size": 2048, "decimation_target": 1_000_000},
    # The configuration from TRELLIS.2's GitHub issue #92.
    "game-asset": {
        "resolution": 1536,
        "texture_size": 4096,
        "decimation_target": 800_000,
        "samplers": {
            "sparse_structure": {"steps": 12, "guidance_strength": 7.5},
            "shape": {"steps": 24, "guidance_strength": 6.5},
            "texture": {"steps": 36, "guidance_strength": 3.0},
        },
    },
}

_LIMITS: dict[str, tuple[type, Any, Any]] = {
    "seed": (int, 0, 2**31 - 1),
    "max_num_tokens": (int, 1024, 262_144),
    "steps_scale": (float, 0.05, 4.0),
    "image_size": (int, 128, 2048),
    "decimation_target": (int, 1_000, 16_777_216),
    "remesh_band": (float, 0.25, 4.0),
}


def limits(name: str) -> tuple[Any, Any]:
    """The lowest and highest value a request may give a numeric parameter (the add-on's
    fields take their bounds from here, so it never offers what the backend refuses)."""
    _kind, low, high = _LIMITS[name]
    return low, high


def describe_preset(name: str) -> str:
    """A preset in a line, from its table: what a user sees beside it."""
    values = {**dataclasses.asdict(GenerationParams()), **PRESETS[name]}
    faces = values["decimation_target"]
    faces_text = f"{faces // 1_000_000}M" if faces % 1_000_000 == 0 else f"{faces // 1000}K"
    size = values["texture_size"]
    texture = f"{size // 1024}K" if size >= 1024 else f"{size} px"
    text = f"{values['resolution']} voxels, {texture} texture, {faces_text} faces"
    return text + (", tuned samplers" if values.get("samplers") else "")


def _bad(message: str) -> InputError:
    return InputError(ErrorCode.BAD_PARAMS, message)


def _check_number(name: str, value: Any) -> Any:
    kind, low, high = _LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{name} must be a number, got {type(value).__name__}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise _bad(f"{name} must be a whole number, got {value}")
        value = int(value)
    else:
        value = float(value)
    if not low <= value <= high:
        raise _bad(f"{name} must be between {low} and {high}, got {value}")
    return value


def _check_samplers(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise _bad("samplers must be an object of stage -> settings")
    out: dict[str, dict[str, Any]] = {}
    for stage, settings in value.items():
        if stage not in SAMPLER_STAGES:
            raise _bad(f"unknown sampler stage {stage!r}; use one of {', '.join(SAMPLER_STAGES)}")
        if not isinstance(settings, dict):
            raise _bad(f"samplers.{stage} must be an object")
        clean: dict[str, Any] = {}
        for key, item in settings.items():
            if key not in SAMPLER_KEYS:
                raise _bad(
                    f"unknown sampler key {key!r} in samplers.{stage}; "
                    f"allowed: {', '.join(SAMPLER_KEYS)}"
                )
            clean[key] = _check_sampler_value(stage, key, item)
        out[stage] = clean
    return out


def _check_sampler_value(stage: str, key: str, item: Any) -> Any:
    where = f"samplers.{stage}.{key}"
    if key == "guidance_interval":
        ok = (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in item)
            and 0.0 <= item[0] <= item[1] <= 1.0
        )
        if not ok:
            raise _bad(f"{where} must be [start, end] with 0 <= start <= end <= 1")
        return [float(item[0]), float(item[1])]
    if isinstance(item, bool) or not isinstance(item, (int, float)):
        raise _bad(f"{where} must be a number")
    if key == "steps":
        if not float(item).is_integer() or not 1 <= item <= 200:
            raise _bad(f"{where} must be a whole number from 1 to 200")
        return int(item)
    limits = {
        "guidance_strength": (0.0, 30.0),
        "guidance_rescale": (0.0, 1.0),
        "rescale_t": (0.1, 20.0),
    }
    low, high = limits[key]
    if not low <= item <= high:
        raise _bad(f"{where} must be between {low} and {high}")
    return float(item)


def parse_params(raw: dict[str, Any] | None) -> GenerationParams:
    """Build parameters from a preset plus overrides; every bad value is a BAD_PARAMS error."""
    if raw is not None and not isinstance(raw, dict):
        raise _bad("params must be an object")
    raw = dict(raw or {})
    preset = raw.pop("preset", "balanced")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise _bad(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    values: dict[str, Any] = {"preset": preset, **PRESETS[preset]}
    known = {f.name for f in dataclasses.fields(GenerationParams)} - {"preset"}
    for name, value in raw.items():
        if name not in known:
            raise _bad(f"unknown parameter {name!r}")
        if name == "resolution":
            # Whole numbers only: 2048.0 equals 2048 but would reach the engine as a float.
            if type(value) is not int or value not in RESOLUTIONS:
                raise _bad(f"resolution must be one of {RESOLUTIONS}, got {value!r}")
        elif name == "texture_size":
            if type(value) is not int or value not in TEXTURE_SIZES:
                raise _bad(f"texture_size must be one of {TEXTURE_SIZES}, got {value!r}")
        elif name in ("remesh", "guidance"):
            if not isinstance(value, bool):
                raise _bad(f"{name} must be true or false")
        elif name == "samplers":
            merged = {k: dict(v) for k, v in values.get("samplers", {}).items()}
            for stage, settings in _check_samplers(value).items():
                merged.setdefault(stage, {}).update(settings)
            value = merged
        else:
            value = _check_number(name, value)
        values[name] = value
    return GenerationParams(**values)


# What a re-export may change: it reruns decode and export from the cached latents.
EXPORT_PARAMS = ("texture_size", "decimation_target", "remesh", "remesh_band")


def reexport_params(
    requested: dict[str, Any] | None, final: dict[str, Any] | None, changes: Any
) -> GenerationParams:
    """The parameters of a re-export: the parent job's final parameters (its request after
    the ladder) with the export settings changed. The parent's resolution may be one the
    engine settled on (TRELLIS.2's token budget: 1152), a fact about the latents rather than a
    request; the request's own tier is kept then."""
    if changes is None:
        changes = {}
    if not isinstance(changes, dict):
        raise _bad("params must be an object")
    unknown = sorted(set(changes) - set(EXPORT_PARAMS))
    if unknown:
        raise _bad(
            f"re-export can change only {', '.join(EXPORT_PARAMS)}; not {', '.join(unknown)}"
        )
    requested = dict(requested or {})
    base = dict(final or requested)
    base.pop("preset", None)
    if base.get("resolution") not in RESOLUTIONS:
        base.pop("resolution", None)
        if requested.get("resolution") in RESOLUTIONS:
            base["resolution"] = requested["resolution"]
    return parse_params({"preset": requested.get("preset", "balanced"), **base, **changes})
