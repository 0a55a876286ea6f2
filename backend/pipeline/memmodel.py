"""The measured memory model of the real TRELLIS.2, and the prediction the runner makes from it.

Measured on the real code (docs/GPU.md, "Memory model"; `scripts/gpu/memory_model.py`): what a
stage takes grows with the number of sparse tokens it works on, and not with the sampler's
steps, the guidance or the input image size. Each stage's peak is fitted as
`intercept + slope * tokens` (GiB, tokens in thousands), for the whole card as `nvidia-smi`
sees it: CuMesh allocates outside torch's caching allocator, so torch's own figures miss
a third of the export. Export settings scale the export's peak by a measured factor.

Tokens are known at three points of a job: after the sparse structure (its voxels; the
cascade's high-resolution tokens are then an estimate: voxels times a ratio learned on this
card), inside the shape stage of a cascade once its low-resolution pass is upsampled (exact
counts at every resolution the cascade could settle on, before the high-resolution sampling
that the memory goes to), and after the shape (exact). At each point `plan()` picks the best
ladder level whose predicted peaks of the stages still to run fit the memory available, so a
job that would run out of memory is lowered before it does, instead of after. The estimate is
only used for 512 jobs (where it is exact: one token per voxel) and where no count exists:
upstream's counts at resolutions that are not multiples of 256 are far from the squared-
resolution law (GPU run 9: 1152 to 1408 each above 32,768 tokens where 1024 had 10,282), so a
plan made from it chose levels lower than needed.

Pure functions and tables; the runner and the engine hold the state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..engines.base import Stage
from ..params import GenerationParams
from . import ladder

GIB = 1 << 30

# (intercept GiB, slope GiB per 1,000 tokens) per stage: the card's used memory above the
# idle process, H200 + torch 2.11, upstream 5565d24, the export at remesh band 1, texture 2048
# (GPU run 7). `shape` and `texture` hold a flow model (1.3 GB) and its activations; `decode`
# the shape and texture decoders; `export` is to_glb, whose remesh and CuMesh steps dominate.
# `scripts/memory_report.py` prints the least-squares fit of the measured cases. The export
# was measured with torch's cache released before CuMesh only at the 1024 cascade (7.38 GiB);
# its line also passes through the 1536 remesh's own reserve (37.2 GiB), which the release
# cannot lower, and matched the 24 GB card's 1152 export (14.2 GiB measured, 14.6 predicted).
STAGE_FIT: dict[str, tuple[float, float]] = {
    "conditioning": (1.4, 0.0),
    "sparse_structure": (2.7, 0.0),
    "shape": (2.5, 0.052),
    "texture": (2.5, 0.052),
    "decode": (0.6, 0.424),
    "export": (-0.5, 0.80),
}
# Export settings against remesh band 1 (1024 cascade, 10,300 tokens, GPU run 7).
EXPORT_FACTOR = {"band_half": 0.70, "remesh_off": 0.55}
# High-resolution tokens per voxel of the 32^3 structure, by pipeline tier, before this card
# has seen a job of that tier (random weights: 3.9 at 1024 and 18 at 1536 in GPU run 7; 5.9
# at 768 in run 8, where the same structure gave 33,052 tokens at 768 against 22,581 at 1024:
# the 768 cascade does not lower the tokens on these weights). Real objects are surfaces,
# with fewer; the runner replaces these with what it observes.
DEFAULT_TOKENS_PER_VOXEL = {512: 1.0, 768: 5.9, 1024: 3.9, 1536: 18.0}
# What a prediction may use of the memory available: the fit is within about 5 % of the
# measured points, and the allocator needs room for fragmentation.
SAFETY = 0.85


def tier(resolution: int) -> int:
    """The key tokens-per-voxel ratios are kept under: a cascade resolution rounds to its tier."""
    if resolution <= 512:
        return 512
    if resolution <= 768:
        return 768
    return 1024 if resolution <= 1024 else 1536


def cascade_resolution(resolution: int, tokens_at: Any, max_num_tokens: int) -> int:
    """The high resolution the cascade settles on: upstream lowers 1536 in steps of 128 until
    the tokens fit the budget, never below 1024 (`sample_shape_slat_cascade`)."""
    if resolution <= 1024:
        return resolution
    res = resolution
    while res > 1024 and tokens_at(res) >= max_num_tokens:
        res -= 128
    return res


def estimate_tokens(voxels: int, resolution: int, ratios: Mapping[int, float]) -> float:
    """High-resolution tokens at `resolution` for a structure of `voxels`. Tokens sit on the
    object's surface, so within a tier they scale with the resolution squared."""
    if resolution <= 512:
        return float(voxels)
    key = tier(resolution)
    ratio = ratios.get(key, DEFAULT_TOKENS_PER_VOXEL[key])
    return voxels * ratio * (resolution / key) ** 2


def export_factor(params: GenerationParams) -> float:
    if not params.remesh:
        return EXPORT_FACTOR["remesh_off"]
    if params.remesh_band < 1:
        return EXPORT_FACTOR["band_half"]
    return 1.0


def stage_peaks(
    params: GenerationParams, tokens: float, scale: Mapping[str, float] | None = None
) -> dict[str, int]:
    """Predicted peak bytes of each stage for `tokens` high-resolution tokens. `scale` is
    what this card taught (observed / predicted, per stage)."""
    peaks = {}
    for stage, (intercept, slope) in STAGE_FIT.items():
        gib = intercept + slope * tokens / 1000
        if stage == "export":
            gib *= export_factor(params)
        gib *= (scale or {}).get(stage, 1.0)
        peaks[stage] = int(max(gib, 0.1) * GIB)
    return peaks


@dataclass(frozen=True)
class Facts:
    """What a job knows about its size so far."""

    voxels: int | None = None
    tokens: int | None = None  # exact, once the shape stage ran
    resolution: int | None = None  # the resolution the tokens were counted at
    # Exact high-resolution tokens per cascade resolution, counted from the upsampled
    # low-resolution pass (what upstream's cascade loop counts), before the shape finishes.
    cascade_tokens: Mapping[int, int] | None = None


def tokens_for(params: GenerationParams, facts: Facts, ratios: Mapping[int, float]) -> float:
    """The high-resolution tokens the job will have at `params`, from the best fact known
    at each resolution the cascade may settle on: the cascade's own count there; else the
    exact count after the shape (rescaled to another resolution of its tier, or by the ratios
    to another tier); else the structure's voxels times the learned ratio."""
    if params.resolution <= 512:
        return float(facts.voxels if facts.voxels is not None else facts.tokens or 0)
    estimate = _estimated_tokens_at(facts, ratios)
    counted = facts.cascade_tokens or {}
    if estimate is None and not counted:
        return 0.0

    def tokens_at(r: int) -> float:
        if r in counted:
            return float(counted[r])
        return estimate(r) if estimate is not None else 0.0

    return tokens_at(cascade_resolution(params.resolution, tokens_at, params.max_num_tokens))


def _estimated_tokens_at(
    facts: Facts, ratios: Mapping[int, float]
) -> Callable[[int], float] | None:
    """tokens_at(resolution) from the shape's exact count (rescaled) or the structure's
    voxels; None when neither is known."""
    if facts.tokens is not None and facts.resolution and facts.resolution > 512:
        known, at, voxels = facts.tokens, facts.resolution, facts.voxels

        def tokens_at(r: int) -> float:
            if tier(r) == tier(at) or not voxels:
                return known * (r / at) ** 2
            # Another tier: its ratio, scaled by how far this object is from the known one's
            # (the tiers do not scale with the resolution squared: run 8, 768 against 1024).
            estimate_at = estimate_tokens(voxels, at, ratios)
            return estimate_tokens(voxels, r, ratios) * known / max(estimate_at, 1.0)

        return tokens_at
    if facts.voxels is not None:
        voxels = facts.voxels
        return lambda r: estimate_tokens(voxels, r, ratios)
    return None


def adds_no_saving(
    current: GenerationParams,
    candidate: GenerationParams,
    stage: str,
    facts: Facts,
    ratios: Mapping[int, float] | None = None,
) -> bool:
    """A level saves nothing for `stage` when, with the tokens counted for this job, its
    predicted peak there is not below the current level's: e.g. the 768 cascade, which had
    more tokens than 1024 in every object measured (GPU runs 8 and 11). Only counts decide:
    without them (or for a stage the model has no figure for) the level is tried."""
    if not facts.cascade_tokens or stage not in STAGE_FIT:
        return False
    ratios = ratios or {}
    before = stage_peaks(current, tokens_for(current, facts, ratios))[stage]
    after = stage_peaks(candidate, tokens_for(candidate, facts, ratios))[stage]
    return after >= before


@dataclass(frozen=True)
class Plan:
    level: int
    params: GenerationParams
    resume_stage: int
    predicted_peak: int  # bytes, the highest of the stages still to run, at `level`
    budget: int
    current_peak: int  # bytes, the same at the level the job was at


def plan(
    request: GenerationParams,
    level: int,
    done_index: int,
    stages: Sequence[Stage],
    capabilities: Iterable[str],
    facts: Facts,
    available: int,
    ratios: Mapping[int, float] | None = None,
    scale: Mapping[str, float] | None = None,
) -> Plan | None:
    """After stage `done_index`, the best level at or after `level` whose stages still to run
    are predicted to fit `available` bytes; None when the current level is predicted to fit
    (or nothing is known). Lowering restarts at the earliest stage that reads a changed knob,
    which may be a stage already run (a lower resolution reruns the shape)."""
    if facts.voxels is None and facts.tokens is None and not facts.cascade_tokens:
        return None
    ratios = ratios or {}
    caps = frozenset(capabilities)
    budget = int(available * SAFETY)
    current = ladder.params_at(request, level)
    names = [s.name for s in stages]

    def worst(params: GenerationParams, start: int) -> int:
        peaks = stage_peaks(params, tokens_for(params, facts, ratios), scale)
        return max((peaks[n] for n in names[start:] if n in peaks), default=0)

    current_peak = worst(current, done_index + 1)
    if current_peak <= budget:
        return None
    for candidate_level in range(level + 1, ladder.MAX_LEVEL + 1):
        candidate = ladder.params_at(request, candidate_level)
        knobs = ladder.changed_knobs(current, candidate, caps)
        first = ladder.first_affected_stage(stages, knobs)
        if first is None:
            continue
        resume = min(first, done_index + 1)
        peak = worst(candidate, resume)
        if peak <= budget:
            return Plan(candidate_level, candidate, resume, peak, budget, current_peak)
    return None
