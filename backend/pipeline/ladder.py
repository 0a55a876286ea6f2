"""The out-of-memory degradation ladder as data, and the pure policy that walks it.

Levels are cumulative caps on a request: level k applies the caps of levels 1..k. A cap only
ever lowers quality, so a request that already asks for less is left alone. Structure and shape
quality go first (0-6), then the input image (7-9), and texture size and decimation last
(10-12), so a user keeps the texture detail they asked for as long as possible.

Each level's knob was chosen by what it saves on the real TRELLIS.2 (GPU runs 7 and 8,
docs/GPU.md "Memory model"): memory grows with the cascade's high-resolution tokens (decode and
export about 0.4 and 0.8 GiB per 1,000 tokens), so the shape levels lower the tokens (a token
budget the 1536 cascade honours, then the 1024 cascade) and the export's remesh (a narrower
band: -36 %; no remesh: -45 %) before the resolution drops further. The 768 cascade (one
upstream's own loop never reaches) comes after "remesh off": on the GPU it gave 1.46-1.56x
the tokens of the 1024 cascade for the same structure (runs 8 and 11). The shape stage counts
the tokens at 768 too, so it is used only for an object where it has fewer: the prediction
picks it only if it fits, and after an OOM `next_step` passes over a level whose counted
tokens predict no saving for the failed stage (memmodel.adds_no_saving). Steps and
guidance were levels once; they cannot lower a peak (each sampler step frees what it took, and
guidance runs its two passes one after the other), so they are no longer on the ladder. The
input-image levels help engines that read the image at that size (the preview); TRELLIS.2
resizes every image to 512 or 1024 for DINOv3 whatever it is given, so it does not list
`image_size` among its capabilities and the ladder skips those levels for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..engines.base import Stage
from ..params import GenerationParams


@dataclass(frozen=True)
class Level:
    index: int
    name: str
    caps: tuple[tuple[str, Any], ...]  # (knob, cap); bools cap to False, numbers to min()


def _level(index: int, name: str, **caps: Any) -> Level:
    return Level(index, name, tuple(caps.items()))


LEVELS: tuple[Level, ...] = (
    _level(0, "as requested"),
    _level(1, "token budget 32k", max_num_tokens=32_768),
    _level(2, "remesh band 0.5", remesh_band=0.5),
    _level(3, "resolution 1024", resolution=1024),
    _level(4, "remesh off", remesh=False),
    _level(5, "resolution 768", resolution=768),
    _level(6, "resolution 512", resolution=512),
    _level(7, "input 768 px", image_size=768),
    _level(8, "input 512 px", image_size=512),
    _level(9, "input 384 px", image_size=384),
    _level(10, "texture 2048, 500k faces", texture_size=2048, decimation_target=500_000),
    _level(11, "texture 1024, 250k faces", texture_size=1024, decimation_target=250_000),
    _level(12, "texture 512, 100k faces", texture_size=512, decimation_target=100_000),
)
MAX_LEVEL = LEVELS[-1].index


def _apply_cap(value: Any, cap: Any) -> Any:
    if isinstance(cap, bool):
        return value and cap
    return min(value, cap)


def params_at(request: GenerationParams, level: int) -> GenerationParams:
    """The parameters a request runs with at `level` (cumulative caps, never raises quality)."""
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"ladder level {level} outside 0..{MAX_LEVEL}")
    changes: dict[str, Any] = {}
    for lvl in LEVELS[1 : level + 1]:
        for knob, cap in lvl.caps:
            changes[knob] = _apply_cap(changes.get(knob, getattr(request, knob)), cap)
    return request.replace(**changes)


def _effective(params: GenerationParams, knob: str) -> Any:
    # The cascade token budget only bites at the 1536 tier (only that cascade reads it).
    if knob == "max_num_tokens" and params.resolution < 1536:
        return None
    if knob == "remesh_band" and not params.remesh:
        return None
    return getattr(params, knob)


def changed_knobs(
    before: GenerationParams, after: GenerationParams, capabilities: Iterable[str]
) -> frozenset[str]:
    """Knobs the engine honours whose effective value differs between two parameter sets."""
    return frozenset(k for k in capabilities if _effective(before, k) != _effective(after, k))


def first_affected_stage(stages: Sequence[Stage], knobs: frozenset[str]) -> int | None:
    """Index of the earliest stage that reads any of `knobs` (it and all after must rerun)."""
    for i, stage in enumerate(stages):
        if stage.knobs & knobs:
            return i
    return None


@dataclass(frozen=True)
class Step:
    """Where the runner goes after an out-of-memory error."""

    level: int
    params: GenerationParams
    resume_stage: int  # index into the stage list; stages before it keep their outputs
    skipped: tuple[int, ...]  # levels passed over because they change nothing useful here


def next_step(
    request: GenerationParams,
    current_level: int,
    failed_stage: int,
    stages: Sequence[Stage],
    capabilities: Iterable[str],
    no_saving: Callable[[GenerationParams, GenerationParams], bool] | None = None,
) -> Step | None:
    """The next level that changes something the failed stage depends on, or None.

    A level helps only if it changes a knob read by the failed stage or by a stage before it
    (an earlier stage's output feeds the failed one). Levels that change nothing for this
    request and engine are skipped, never retried blindly; so are those that `no_saving`
    (current, candidate) knows to save nothing for this job (e.g. a cascade resolution whose
    counted tokens are not fewer: memmodel.adds_no_saving).
    """
    caps = frozenset(capabilities)
    current = params_at(request, current_level)
    skipped: list[int] = []
    for level in range(current_level + 1, MAX_LEVEL + 1):
        candidate = params_at(request, level)
        knobs = changed_knobs(current, candidate, caps)
        first = first_affected_stage(stages, knobs)
        if first is None or first > failed_stage:
            skipped.append(level)
            continue
        if no_saving is not None and no_saving(current, candidate):
            skipped.append(level)
            continue
        return Step(level, candidate, first, tuple(skipped))
    return None


def useful_levels(request: GenerationParams, capabilities: Iterable[str]) -> list[int]:
    """Levels that produce distinct effective parameters for this request and engine."""
    caps = frozenset(capabilities)
    out = [0]
    last = params_at(request, 0)
    for level in range(1, MAX_LEVEL + 1):
        candidate = params_at(request, level)
        if changed_knobs(last, candidate, caps):
            out.append(level)
            last = candidate
    return out


def describe(level: int) -> str:
    return LEVELS[level].name
