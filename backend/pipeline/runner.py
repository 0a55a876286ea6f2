"""The hardened runner: runs one job stage by stage, walks the OOM ladder, resumes at the
failed stage, cleans the GPU after every attempt, validates the output and records stats."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..checks import glbcheck, images, meshcheck, meshes
from ..engines.base import Engine, Stage, StageContext
from ..errors import BackendError, ErrorCode, JobCancelled, OutputError
from ..params import GenerationParams, parse_params
from ..store.jobs import JobRecord, JobStore, outcome_event
from ..store.stats import StatsLog
from . import gpu, heap, ladder, memmodel

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], None]


@dataclass
class RunnerConfig:
    min_free_disk: int = 1 << 30  # bytes that must be free before a job starts
    adaptive_start: bool = True


@dataclass
class JobResult:
    outcome: str  # done | failed | cancelled | requeued (poisoned) | interrupted (stopping)
    level: int = 0
    params: dict[str, Any] | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    glb_path: str | None = None
    mesh_stats: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    degraded_reason: str | None = None
    seconds: float = 0.0
    poisoned: bool = False  # the CUDA context is broken: the process must exit


def _size_facts(structure: dict[str, Any], counted: dict | None = None) -> memmodel.Facts:
    """The memory model's facts from an engine's `structure` (voxels, the cascade's counted
    tokens; JSON keeps a count's resolution as text), or from counts told mid-stage."""
    counted = counted or structure.get("cascade_tokens")
    return memmodel.Facts(
        voxels=structure.get("voxels"),
        cascade_tokens={int(r): int(n) for r, n in counted.items()} if counted else None,
    )


class _Replan(Exception):
    """The memory model predicts that a stage still to run will not fit: lower the job now."""

    def __init__(self, plan: memmodel.Plan, stage_index: int):
        super().__init__(
            f"predicted peak {plan.current_peak / 2**30:.1f} GiB above the "
            f"{plan.budget / 2**30:.1f} GiB this card has; "
            f"{plan.predicted_peak / 2**30:.1f} GiB at level {plan.level}"
        )
        self.plan = plan
        self.stage_index = stage_index


class _Failure(Exception):
    """A classified stage failure, holding text only (never the original exception)."""

    def __init__(self, kind: str | None, stage_index: int, message: str, trace: str):
        super().__init__(message)
        self.kind = kind
        self.stage_index = stage_index
        self.message = message
        self.trace = trace


def _output_failure(exc: BaseException, folder: Path) -> str | None:
    """A stage's OSError that is about the job's output rather than the engine: the disk is
    full, or the job folder is read-only, gone or holds a link."""
    if not isinstance(exc, OSError):
        return None
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full"
    inside = exc.filename is not None and str(folder) in os.fsdecode(exc.filename)
    if inside and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ELOOP):
        return "output_unwritable"
    return None


def _highest(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def check_disk(path: os.PathLike | str, min_free: int) -> None:
    """Refuse work when less than `min_free` bytes are free where `path` is (or would be: a
    deleted output folder is measured at its nearest existing parent)."""
    where = Path(os.fsdecode(path))
    while not where.exists() and where.parent != where:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        raise BackendError(
            ErrorCode.OUTPUT_UNWRITABLE, f"cannot read free disk space of {path}: {exc}"
        ) from None
    if free < min_free:
        raise BackendError(
            ErrorCode.DISK_FULL,
            f"only {free / 2**20:.0f} MiB free in {path}; "
            f"at least {min_free / 2**20:.0f} MiB needed",
        )


class Runner:
    def __init__(
        self,
        engine: Engine,
        store: JobStore,
        stats: StatsLog,
        profile: Any | None = None,
        config: RunnerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.engine = engine
        self.store = store
        self.stats = stats
        self.profile = profile
        self.config = config or RunnerConfig()
        self.clock = clock
        # High-resolution tokens per structure voxel, per cascade tier, as seen on this card's
        # jobs: the memory prediction's estimate before the shape stage counts them.
        self.tokens_per_voxel: dict[int, float] = {}
        if profile is not None:
            self.tokens_per_voxel.update(profile.tokens_per_voxel())

    # -- entry point -----------------------------------------------------------------

    def run(
        self,
        job: JobRecord,
        emit: Emit | None = None,
        cancelled: Callable[[], bool] | None = None,
        interrupted: Callable[[], bool] | None = None,
        image: Any | None = None,
    ) -> JobResult:
        """Run a queued job to one outcome. `cancelled` is the user's cancel; `interrupted`
        says the backend is stopping, so a stop at a checkpoint requeues instead of cancelling.
        `image` is the input already decoded and validated at submission (saves a decode);
        without it the input is read and validated again from the job folder."""
        emit = emit or (lambda _type, _content: None)
        interrupted = interrupted or (lambda: False)
        user_cancelled = cancelled or (lambda: False)

        def cancelled() -> bool:
            return user_cancelled() or interrupted()

        started = self.clock()
        job = self.store.transition(job.id, "start", backend_pid=os.getpid())
        self.store.append_log(job.id, f"started on {self.engine.name} (pid {os.getpid()})")
        emit("job_started", {"job_id": job.id, "kind": job.kind, "engine": self.engine.name})
        result = JobResult(outcome="failed")
        try:
            self._run(job, result, emit, cancelled, image)
        except JobCancelled:
            result.outcome = (
                "interrupted" if interrupted() and not user_cancelled() else "cancelled"
            )
            result.error = JobCancelled().to_dict()
        except BackendError as exc:
            result.outcome = "failed"
            result.error = exc.to_dict()
        except Exception as exc:  # a bug in our code: fail the job, keep the backend alive
            log.exception("runner bug on job %s", job.id)
            self.store.append_log(job.id, traceback.format_exc())
            result.outcome = "failed"
            result.error = BackendError(
                ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
            ).to_dict()
        finally:
            if self.engine.uses_gpu:
                gpu.cleanup(self.engine)  # includes a full collection
            self._discard_tmp(job.id)
            heap.release_after_job(collect=not self.engine.uses_gpu)
        result.seconds = self.clock() - started
        self._finish(job, result, emit)
        return result

    # -- the attempt loop ------------------------------------------------------------

    def _run(self, job: JobRecord, result: JobResult, emit: Emit, cancelled, image) -> None:
        check_disk(self.store.root, self.config.min_free_disk)
        request = parse_params(job.params)
        stages = self.engine.stages_for(job.kind)
        seed_state = self._initial_state(job, image)
        level, reason = self._start_level(request)
        params = ladder.params_at(request, level)
        if level:
            self.store.append_log(job.id, f"adaptive start at level {level}: {reason}")
        outputs: dict[int, dict[str, Any]] = {}
        resume = 0
        while True:
            state = dict(seed_state)
            for i in range(resume):
                state.update(outputs[i])
            attempt = self._attempt_record(job, len(result.attempts) + 1, level, params)
            attempt["resumed_at"] = stages[resume].name
            try:
                self._run_stages(
                    job, stages, resume, state, request, level, outputs, attempt, emit, cancelled
                )
            except (JobCancelled, BackendError) as exc:
                outcome = "cancelled" if isinstance(exc, JobCancelled) else "error"
                self._close_attempt(
                    attempt,
                    outcome,
                    stages[attempt.pop("_stage", resume)],
                    exc.message,
                    gpu.vram(init=False),
                    partial=resume > 0,
                    error_code=exc.code.value,
                )
                result.attempts.append(attempt)
                raise
            except _Replan as replan:
                plan = replan.plan
                self._close_attempt(
                    attempt,
                    "predicted_oom",
                    stages[replan.stage_index],
                    str(replan),
                    gpu.vram(init=False),
                    partial=resume > 0,
                )
                result.attempts.append(attempt)
                level, params, resume = plan.level, plan.params, plan.resume_stage
                self._lower(
                    job, emit, stages, outputs, level, resume, replan.stage_index, (), "predicted"
                )
                self.store.append_log(job.id, f"the memory model: {replan}")
                continue
            except _Failure as failure:
                del state
                known = self._known_size(outputs, attempt.get("_counted"))
                cleanup_vram = gpu.cleanup(self.engine)
                read_so_far = frozenset().union(
                    *(s.knobs for s in stages[: failure.stage_index + 1])
                )
                self._close_attempt(
                    attempt,
                    failure.kind or "error",
                    stages[failure.stage_index],
                    failure.message,
                    cleanup_vram,
                    partial=resume > 0,
                    depends_on=read_so_far,
                )
                result.attempts.append(attempt)
                self.store.append_log(
                    job.id,
                    f"attempt {attempt['attempt']} failed at "
                    f"{stages[failure.stage_index].name}: {failure.message}",
                )
                if failure.kind == "poison":
                    self.store.append_log(job.id, failure.trace)
                    result.poisoned = True
                    raise BackendError(ErrorCode.GPU_POISONED, failure.message) from None
                if failure.kind == "disk_full":  # the user can fix this one: say so
                    raise BackendError(ErrorCode.DISK_FULL, failure.message) from None
                if failure.kind == "output_unwritable":
                    raise BackendError(ErrorCode.OUTPUT_UNWRITABLE, failure.message) from None
                if failure.kind != "oom":
                    self.store.append_log(job.id, failure.trace)
                    raise BackendError(ErrorCode.ENGINE_ERROR, failure.message) from None
                step = ladder.next_step(
                    request,
                    level,
                    failure.stage_index,
                    stages,
                    self.engine.capabilities,
                    self._no_saving(known, stages[failure.stage_index].name)
                    if self.engine.predicts_memory
                    else None,
                )
                if step is None:
                    raise BackendError(
                        ErrorCode.OUT_OF_MEMORY,
                        f"out of GPU memory at stage {stages[failure.stage_index].name} "
                        f"even at ladder level {level}",
                    ) from None
                level, params, resume = step.level, step.params, step.resume_stage
                self._lower(
                    job, emit, stages, outputs, level, resume, failure.stage_index, step.skipped
                )
                continue
            self._close_attempt(attempt, "ok", stages[-1], None, gpu.vram(), partial=resume > 0)
            result.attempts.append(attempt)
            self._accept_output(job, state, request, params, level, result)
            return

    def _lower(
        self, job, emit, stages, outputs, level, resume, at_stage, skipped, cause="oom"
    ) -> None:
        """Go down the ladder to `level`: forget the outputs of `resume` and later stages, say
        so (job_retry, the job log). `cause`: an OOM at `at_stage`, or the memory model's
        prediction after it."""
        for i in list(outputs):
            if i >= resume:
                del outputs[i]
        predicted = cause == "predicted"
        emit(
            "job_retry",
            {
                "job_id": job.id,
                "level": level,
                "level_name": ladder.describe(level),
                "reason": "predicted_out_of_memory" if predicted else "out_of_memory",
                "failed_stage": stages[at_stage].name,
                "resume_stage": stages[resume].name,
                "skipped_levels": list(skipped),
            },
        )
        what = "lowered before running out of memory" if predicted else "retrying"
        self.store.append_log(
            job.id,
            f"{what} at level {level} ({ladder.describe(level)}) from {stages[resume].name}",
        )

    def _run_stages(
        self, job, stages, resume, state, request, level, outputs, attempt, emit, cancelled
    ) -> None:
        params = attempt["_params"]
        count = len(stages)
        for index in range(resume, count):
            stage = stages[index]
            attempt["_stage"] = index

            def report(name: str, step: int, total: int, message: str, _i: int = index) -> None:
                fraction = (_i + (step / total if total else 0.0)) / count
                progress = {
                    "job_id": job.id,
                    "stage": name,
                    "label": stages[_i].label,
                    "step": step,
                    "total": total,
                    "fraction": round(min(1.0, fraction), 4),
                    "stage_index": _i,
                    "stage_count": count,
                    "level": level,
                    "message": message,
                }
                emit("job_progress", progress)

            def sized(facts: dict[str, Any], _i: int = index) -> None:
                self._plan_within(stages, _i, state, request, level, facts, attempt)

            ctx = StageContext(stage.name, report, cancelled, sized)
            ctx.progress(0, 1, stage.label)
            before = dict(state)
            began = self.clock()
            failure = None
            gpu.reset_peak()  # a peak per stage: the memory model of the engine (issue #12)
            try:
                self.engine.run_stage(stage.name, state, params, ctx)
            except (JobCancelled, BackendError, _Replan):
                raise
            except Exception as exc:
                # Keep text only: the exception's traceback pins frames and GPU tensors, so
                # it must not outlive this block (raised below, outside it, with no context).
                failure = _Failure(
                    _output_failure(exc, self.store.folder(job.id)) or gpu.classify_error(exc),
                    index,
                    f"{type(exc).__name__}: {exc}",
                    traceback.format_exc(),
                )
                traceback.clear_frames(exc.__traceback__)
            finally:
                attempt["stage_seconds"][stage.name] = round(self.clock() - began, 4)
                peak = gpu.peak_allocated()
                if peak is not None:
                    attempt.setdefault("stage_vram_peaks", {})[stage.name] = peak
            if failure is not None:
                del before
                raise failure
            outputs[index] = {
                k: v for k, v in state.items() if k not in before or before[k] is not v
            }
            self._predict(stages, index, state, request, level)

    def _no_saving(self, known: memmodel.Facts, stage: str):
        ratios = dict(self.tokens_per_voxel)
        return lambda current, candidate: memmodel.adds_no_saving(
            current, candidate, stage, known, ratios
        )

    @staticmethod
    def _known_size(outputs, counted) -> memmodel.Facts:
        """What the stages kept so far (and the attempt counted) say of the job's size."""
        structure: dict[str, Any] = {}
        for index in sorted(outputs):
            if isinstance(outputs[index].get("structure"), dict):
                structure = outputs[index]["structure"]
        return _size_facts(structure, counted)

    def _plan_within(self, stages, index, state, request, level, told, attempt) -> None:
        """Inside a stage that counted the cascade's tokens (before its costly part): lower
        the job now if this stage or an earlier one must run at a lower level for the rest to
        fit. A lowering that only changes later stages waits for the end of this stage, where
        `_predict` makes it with the exact count."""
        counted = told.get("cascade_tokens")
        if not (self.engine.predicts_memory and counted):
            return
        attempt["_counted"] = counted  # for the ladder, should this attempt still fail
        figures = gpu.vram(init=False)
        if not figures:
            return
        structure = state.get("structure") if isinstance(state.get("structure"), dict) else {}
        facts = _size_facts(structure, counted)
        caps = self.engine.capabilities
        plan = memmodel.plan(
            request,
            level,
            index - 1,
            stages,
            caps,
            facts,
            figures["available"],
            self.tokens_per_voxel,
        )
        if plan is None:
            return
        knobs = ladder.changed_knobs(ladder.params_at(request, level), plan.params, caps)
        first = ladder.first_affected_stage(stages, knobs)
        if first is not None and first > index:
            return
        attempt["predicted_within"] = True
        raise _Replan(plan, index)

    def _predict(self, stages, index, state, request, level) -> None:
        """After a stage that told the job's size, lower the job if what is still to run is
        predicted not to fit (memmodel.plan); learn the tokens per voxel from the shape."""
        structure = state.get("structure")
        if not (self.engine.predicts_memory and isinstance(structure, dict)):
            return
        voxels = structure.get("voxels")
        tokens = structure.get("shape_tokens")
        effective = state.get("effective_resolution")
        if (
            tokens is None
            and self.engine.counts_cascade_tokens
            and ladder.params_at(request, level).resolution > 512
        ):
            # A cascade: the shape stage counts its tokens before they cost memory
            # (_plan_within); the structure's estimate would choose too low a level.
            return
        if tokens and voxels and effective and effective > 512:
            key = memmodel.tier(effective)
            ratio = tokens / voxels / (effective / key) ** 2
            if self.tokens_per_voxel.get(key) != ratio:
                self.tokens_per_voxel[key] = ratio
                if self.profile is not None:
                    try:
                        self.profile.learn_tokens_per_voxel(key, ratio)
                    except Exception:  # the profile is an optimisation; never fail a job
                        log.warning("cannot save tokens per voxel", exc_info=True)
        figures = gpu.vram(init=False)
        if not figures:
            return
        facts = replace(
            _size_facts(structure), tokens=tokens, resolution=effective if tokens else None
        )
        plan = memmodel.plan(
            request,
            level,
            index,
            stages,
            self.engine.capabilities,
            facts,
            figures["available"],
            self.tokens_per_voxel,
        )
        if plan is not None:
            raise _Replan(plan, index)

    # -- helpers ---------------------------------------------------------------------

    def _initial_state(self, job: JobRecord, image: Any | None = None) -> dict[str, Any]:
        if job.kind == "reexport" and not job.parent:
            raise BackendError(ErrorCode.BAD_PARAMS, "reexport needs a parent job")
        # No link in the job's folder (or its parent's) and a fresh result.tmp.glb: what the
        # engine reads and writes there is never redirected outside the store.
        output = self.store.prepare(job.id, also=(job.parent,) if job.kind == "reexport" else ())
        folder = self.store.folder(job.id)
        state: dict[str, Any] = {"output_path": output, "job_dir": folder}
        if job.kind == "reexport":
            state.update(self.engine.load_cache(self.store.folder(job.parent)))
            return state
        # The folder's files are checked as a request's would be, and read no further than
        # the limits (one byte more tells a file over them): anything may have replaced them.
        if image is None:
            limits = images.ImageLimits()
            source = self.store.read_input(job.id, limit=limits.max_bytes + 1)
            if source is None:
                raise BackendError(ErrorCode.NOT_FOUND, f"job {job.id} has no input image")
            image = images.load_image(source[1], limits)
        state["image"] = image
        if job.kind == "texture":
            mesh = self.store.read_input(job.id, stem="mesh", limit=meshes.MAX_UPLOAD_BYTES + 1)
            if mesh is None:
                raise BackendError(ErrorCode.BAD_MESH_INPUT, f"job {job.id} has no input mesh")
            state["mesh_format"] = meshes.checked_upload(mesh[0].rsplit(".", 1)[-1], mesh[1])
            state["mesh_bytes"] = mesh[1]
        return state

    def _start_level(self, request: GenerationParams) -> tuple[int, str]:
        if not (self.config.adaptive_start and self.profile is not None and self.engine.uses_gpu):
            return 0, "as requested"
        figures = gpu.vram()
        if not figures:
            return 0, "no VRAM figures"
        return self.profile.choose_start_level(
            self.engine.name, request, self.engine.capabilities, figures["available"]
        )

    def _attempt_record(self, job, number, level, params) -> dict[str, Any]:
        gpu.reset_peak()
        figures = gpu.vram() or {}
        return {
            "job_id": job.id,
            "engine": self.engine.name,
            "attempt": number,
            "level": level,
            "params": params.to_dict(),
            "stage_seconds": {},
            "started": self.clock(),
            "free_before": figures.get("available"),
            "_params": params,
        }

    def _close_attempt(
        self,
        attempt,
        outcome,
        stage: Stage,
        error,
        figures,
        partial=False,
        depends_on=None,
        error_code=None,
    ) -> None:
        params = attempt.pop("_params")
        attempt.pop("_stage", None)
        attempt.pop("_counted", None)
        attempt["seconds"] = round(self.clock() - attempt.pop("started"), 4)
        attempt.update(
            outcome=outcome,
            stage=stage.name,
            error=error,
            error_code=error_code or (None if outcome == "ok" else outcome),
            vram_peak=_highest(
                (figures or {}).get("peak"), *attempt.get("stage_vram_peaks", {}).values()
            ),
        )
        self.stats.append("attempt", **attempt)
        if self.profile is not None and outcome in ("ok", "oom"):
            try:
                self.profile.record(
                    self.engine.name,
                    attempt["level"],
                    params,
                    attempt["vram_peak"],
                    attempt["free_before"] or 0,
                    outcome == "ok",
                    partial=partial,
                    depends_on=depends_on,
                )
            except Exception:  # the profile is an optimisation; never fail a job over it
                log.exception("memory profile update failed")

    def _accept_output(self, job, state, request, params, level, result: JobResult) -> None:
        """Validate mesh and GLB; only then publish result.glb. Never report a bad GLB."""
        for key in ("glb_path", "mesh_stats", "mesh_arrays"):
            if key not in state:
                raise OutputError(ErrorCode.INVALID_MESH, f"engine produced no {key}")
        vertices, faces = state["mesh_arrays"]
        warnings = meshcheck.validate_mesh(vertices, faces)
        self.store.check_output(job.id, state["glb_path"])  # still our file, not a link
        report = glbcheck.validate_glb_file(state["glb_path"])
        warnings += report.get("warnings", [])
        final = self.store.publish_result(job.id, state["glb_path"])
        if job.kind == "generate":
            try:
                self.engine.save_cache(state, self.store.folder(job.id))
            except Exception as exc:  # re-export is a convenience; the GLB is what matters
                self.store.append_log(job.id, f"could not cache state for re-export: {exc}")
        result.outcome = "done"
        result.level = level
        # What the engine really used (e.g. the resolution after the cascade's token budget),
        # over what was asked: users and the memory profile need the former.
        result.params = {**params.to_dict(), **state.get("effective_params", {})}
        result.glb_path = str(final)
        result.mesh_stats = dict(state["mesh_stats"], glb_bytes=self.store.result_size(job.id))
        if "structure" in state:
            result.mesh_stats["structure"] = dict(state["structure"])
        result.warnings = warnings
        if level:
            lowered = [a for a in result.attempts if a["outcome"] in ("oom", "predicted_oom")]
            last = lowered[-1] if lowered else None
            if last is None:
                reason = "the requested settings were predicted not to fit in free VRAM at start"
            elif last["outcome"] == "oom":
                reason = f"the requested settings ran out of GPU memory at {last['stage']}"
            elif last.get("predicted_within"):  # counted inside the stage, before its peak
                reason = f"during {last['stage']}, once its tokens were counted, {last['error']}"
            else:  # lowered by the memory model once the object's size was known
                reason = f"after {last['stage']}, {last['error']}"
            result.degraded_reason = (
                f"Quality reduced to level {level} ({ladder.describe(level)}): {reason}."
            )

    def _discard_tmp(self, job_id: str) -> None:
        self.store.discard_output(job_id)

    def _finish(self, job: JobRecord, result: JobResult, emit: Emit) -> None:
        summary = {
            "job_id": job.id,
            "kind": job.kind,
            "engine": self.engine.name,
            "outcome": result.outcome,
            "oom_quality_degradation_level": result.level,
            "final_params": result.params,
            "attempts": result.attempts,
            "mesh_stats": result.mesh_stats,
            "warnings": result.warnings,
            "degraded_reason": result.degraded_reason,
            "seconds": round(result.seconds, 4),
            "error": result.error,
        }
        try:
            self.store.write_json(job.id, "stats.json", summary)
        except BackendError as exc:
            log.warning("cannot write stats.json for %s: %s", job.id, exc.message)
        stage_seconds: dict[str, float] = {}
        for attempt in result.attempts:
            for name, secs in attempt["stage_seconds"].items():
                stage_seconds[name] = round(stage_seconds.get(name, 0.0) + secs, 4)
        mesh = result.mesh_stats or {}
        peaks = [a["vram_peak"] for a in result.attempts if a.get("vram_peak") is not None]
        if result.outcome == "interrupted":
            self.store.transition(job.id, "requeue", attempts=len(result.attempts))
            self.store.append_log(job.id, "backend stopping; the job runs again after a restart")
            emit("job_queued", {"job_id": job.id, "reason": "interrupted by a backend stop"})
            return
        if result.poisoned and job.may_run_again:
            result.outcome = "requeued"
            self.store.transition(
                job.id,
                "requeue",
                recoveries=job.recoveries + 1,
                attempts=len(result.attempts),
                error=result.error,
            )
            self.store.append_log(
                job.id, "GPU context poisoned; the job runs again on a fresh backend"
            )
            emit(
                "job_retry",
                {
                    "job_id": job.id,
                    "reason": "gpu_poisoned",
                    "message": "retrying on a fresh backend",
                },
            )
            return
        self.stats.append(
            "job",
            job_id=job.id,
            engine=self.engine.name,
            job_kind=job.kind,
            params=job.params,
            final_params=result.params,
            level=result.level,
            attempts=len(result.attempts),
            outcome=result.outcome,
            error_code=(result.error or {}).get("code"),
            seconds=round(result.seconds, 4),
            stage_seconds=stage_seconds,
            vertices=mesh.get("vertices"),
            faces=mesh.get("faces"),
            texture_size=mesh.get("texture_size"),
            vram_peak=max(peaks) if peaks else None,
        )
        common = {
            "attempts": len(result.attempts),
            "level": result.level,
            "final_params": result.params,
        }
        if result.outcome == "done":
            record = self.store.transition(
                job.id,
                "finish",
                result={
                    "glb_path": result.glb_path,
                    "mesh_stats": result.mesh_stats,
                    "warnings": result.warnings,
                    "degraded_reason": result.degraded_reason,
                    "seconds": round(result.seconds, 4),
                },
                **common,
            )
            self.store.append_log(job.id, f"done in {result.seconds:.2f} s at level {result.level}")
        elif result.outcome == "cancelled":
            record = self.store.transition(job.id, "cancel", error=result.error, **common)
            self.store.append_log(job.id, "cancelled")
        else:
            record = self.store.transition(job.id, "fail", error=result.error, **common)
            self.store.append_log(job.id, f"failed: {result.error}")
        emit(*outcome_event(record))
