"""The Engine interface: an engine is a list of stages the runner can run, resume and retry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import BackendError, ErrorCode, JobCancelled
from ..params import GenerationParams

# Ladder knobs: the GenerationParams fields an engine may honour.
KNOBS = frozenset(
    {
        "resolution",
        "max_num_tokens",
        "remesh",
        "remesh_band",
        "steps_scale",
        "guidance",
        "image_size",
        "texture_size",
        "decimation_target",
    }
)


@dataclass(frozen=True)
class Stage:
    """One resumable step. `knobs` are the parameters it reads; a change to any of them
    (or to an earlier stage's knobs) means this stage must run again."""

    name: str
    label: str
    knobs: frozenset[str] = frozenset()


ProgressFn = Callable[[str, int, int, str], None]  # (stage, step, total, message)


class StageContext:
    """Handed to each stage: progress reporting that doubles as the cancel checkpoint, and
    the way a stage tells the job's size before its costly part (`sized`)."""

    def __init__(
        self,
        stage: str,
        report: ProgressFn | None = None,
        cancelled: Callable[[], bool] | None = None,
        sized: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.stage = stage
        self._report = report
        self._cancelled = cancelled
        self._sized = sized

    def tell_size(self, **facts: Any) -> None:
        """What the stage has counted so far (e.g. `cascade_tokens`). The runner may stop the
        stage here, raising out of this call, to run it again at a lower level."""
        if self._sized is not None:
            self._sized(facts)

    def check_cancelled(self) -> None:
        if self._cancelled is not None and self._cancelled():
            raise JobCancelled()

    def progress(self, step: int, total: int, message: str = "") -> None:
        """Report progress; raises JobCancelled if the job was cancelled meanwhile."""
        self.check_cancelled()
        if self._report is not None:
            self._report(self.stage, step, total, message)


class Engine(ABC):
    """Engines hold models; the runner owns the job. State flows between stages in a dict.

    Contract for `run_stage`: read inputs from `state`, write outputs into `state` under
    keys of its own. The runner seeds `state` with:
      - "image": a PIL.Image (validated, RGBA or RGB, EXIF-applied)
      - "output_path": where the final stage must write the GLB
    For "texture" jobs it also seeds "mesh_bytes" (GLB or PLY) and "mesh_format".
    For "reexport" jobs the state comes from load_cache() instead of the image.
    After the last stage the runner expects:
      - "glb_path": the written GLB (== output_path)
      - "mesh_stats": {"vertices": int, "faces": int, "texture_size": int}
      - "mesh_arrays": (vertices ndarray [V,3] float, faces ndarray [F,3] int) for validation
    Optional, reported with the result:
      - "effective_params": parameters the engine really used where they differ from the
        request (e.g. {"resolution": 1280} after TRELLIS.2's token budget); they replace the
        requested values in the job's final_params
      - "structure": facts about the generated structure (e.g. voxel and token counts)
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # what a user sees, e.g. "Preview (no GPU)"
    capabilities: ClassVar[frozenset[str]] = frozenset()  # subset of KNOBS it honours
    stages: ClassVar[tuple[Stage, ...]] = ()
    uses_gpu: ClassVar[bool] = False
    # Its stages put the job's size in state["structure"] ("voxels", then "shape_tokens" and
    # state["effective_resolution"]) and its memory follows memmodel.py: the runner may lower
    # a job before it runs out of memory.
    predicts_memory: ClassVar[bool] = False
    # Its shape stage counts the cascade's high-resolution tokens at every resolution it may
    # settle on (ctx.tell_size(cascade_tokens=...)) before sampling at high resolution: the
    # runner then plans cascades from those counts, not from the structure's estimate.
    counts_cascade_tokens: ClassVar[bool] = False

    def load(self, progress: Callable[[float, str], None] | None = None) -> None:  # noqa: B027
        """Load weights. `progress(fraction, message)`. Idempotent."""

    @abstractmethod
    def run_stage(
        self, stage: str, state: dict[str, Any], params: GenerationParams, ctx: StageContext
    ) -> None: ...

    def stages_for(self, kind: str) -> tuple[Stage, ...]:
        """Stages of a job kind: "generate" (image -> GLB), "reexport" (cached state -> GLB
        with new export settings) or "texture" (mesh + image -> textured GLB)."""
        if kind == "generate":
            return self.stages
        raise BackendError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"the {self.label or self.name} engine cannot run {kind!r} jobs",
        )

    def save_cache(self, state: dict[str, Any], directory: Path) -> None:  # noqa: B027
        """After a successful generate: persist what a later "reexport" needs (optional)."""

    def load_cache(self, directory: Path) -> dict[str, Any]:
        """Seed state for a "reexport" job from what save_cache wrote."""
        raise BackendError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"the {self.label or self.name} engine cannot re-export",
        )

    def release_gpu(self) -> None:  # noqa: B027
        """Move every model off the GPU and drop GPU caches. Called after each attempt."""

    def unload(self) -> None:  # noqa: B027
        """Free everything load() took."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "capabilities": sorted(self.capabilities),
            "stages": [s.name for s in self.stages],
            "uses_gpu": self.uses_gpu,
        }

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]
