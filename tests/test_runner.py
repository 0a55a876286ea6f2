"""The hardened runner on CPU with a fault-injecting engine: ladder order, skipping, stage
resume, texture last, adaptive start, poison, validation, stats and metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from backend.params import parse_params
from backend.pipeline import gpu, ladder
from backend.pipeline.memprofile import MemoryProfile
from backend.pipeline.runner import Runner, RunnerConfig
from backend.store.jobs import JobStore
from backend.store.stats import StatsLog, aggregate
from tests.conftest import png_bytes
from tests.gpu_engines import FaultEngine

ROOT = Path(__file__).resolve().parent.parent


class Harness:
    def __init__(self, tmp_path: Path, engine, profile=None):
        self.store = JobStore(tmp_path / "out")
        self.stats = StatsLog(tmp_path / "out" / "state" / "stats.jsonl")
        self.engine = engine
        self.runner = Runner(
            engine, self.store, self.stats, profile, RunnerConfig(min_free_disk=1 << 20)
        )
        self.events: list[tuple[str, dict]] = []

    def run(self, params=None, kind="generate", parent=None, **kw):
        image = png_bytes() if kind != "reexport" else None
        record = self.store.create(
            kind, self.engine.name, parse_params(params or {}).to_dict(), image=image, parent=parent
        )
        result = self.runner.run(record, emit=lambda t, c: self.events.append((t, c)), **kw)
        return record.id, result

    def lines(self, kind):
        return [r for r in self.stats.read() if r["kind"] == kind]


def test_oom_resumes_at_the_earliest_affected_stage_and_keeps_earlier_outputs(tmp_path):
    h = Harness(tmp_path, FaultEngine(fail="texture:oom:1"))
    job_id, result = h.run({"preset": "high"})  # 1536: the token budget (level 1) helps
    assert result.outcome == "done", result.error
    assert result.level == 1
    # cond ran once; structure (reads max_num_tokens) and everything after ran again
    assert h.engine.calls == {"cond": 1, "structure": 2, "texture": 2, "decode": 1, "export": 1}
    assert [a["level"] for a in result.attempts] == [0, 1]
    assert [a["outcome"] for a in result.attempts] == ["oom", "ok"]
    assert result.attempts[0]["stage"] == "texture"
    assert result.attempts[1]["resumed_at"] == "structure"
    retry = [c for t, c in h.events if t == "job_retry"]
    assert retry and retry[0]["level"] == 1 and retry[0]["failed_stage"] == "texture"
    done = [c for t, c in h.events if t == "job_done"][0]
    assert done["degraded"] is True and done["oom_quality_degradation_level"] == 1
    assert "level 1" in done["degraded_reason"] and "texture" in done["degraded_reason"]
    assert done["final_params"]["max_num_tokens"] == 32_768
    record = h.store.get(job_id)
    assert record.state.value == "done" and record.level == 1 and record.attempts == 2
    saved = json.loads((h.store.folder(job_id) / "stats.json").read_text())
    assert saved["oom_quality_degradation_level"] == 1 and len(saved["attempts"]) == 2
    assert h.engine.released >= 1  # models were moved off the GPU after the OOM


def test_no_op_levels_are_skipped_and_export_oom_does_not_rerun_sampling(tmp_path):
    h = Harness(tmp_path, FaultEngine(fail="export:cumesh_oom:1"))
    _, result = h.run({"preset": "balanced"})  # 1024, remesh on
    assert result.outcome == "done" and result.level == 2  # 1 changes nothing here
    assert [a["level"] for a in result.attempts] == [0, 2]
    assert h.engine.calls["structure"] == 1 and h.engine.calls["export"] == 2
    retry = [c for t, c in h.events if t == "job_retry"][0]
    assert retry["skipped_levels"] == [1] and retry["resume_stage"] == "export"
    assert result.params["remesh_band"] == 0.5 and result.params["remesh"] is True


def test_texture_is_reduced_last(tmp_path):
    h = Harness(tmp_path, FaultEngine(fail_above="export:texture_size=1024"))
    _, result = h.run({"preset": "game-asset"})  # 1536, texture 4096
    assert result.outcome == "done" and result.level == 11
    levels = [a["level"] for a in result.attempts]
    assert levels == sorted(levels) and levels[-2:] == [10, 11]
    for attempt in result.attempts:
        if attempt["level"] < 10:
            assert attempt["params"]["texture_size"] == 4096
    assert result.params["texture_size"] == 1024
    assert result.params["resolution"] == 512  # structure went first


def test_exhausted_ladder_fails_once_with_out_of_memory(tmp_path):
    h = Harness(tmp_path, FaultEngine(fail_above="cond:image_size=100"))
    job_id, result = h.run({"preset": "fast"})
    assert result.outcome == "failed" and result.error["code"] == "out_of_memory"
    assert result.error["hint"]
    assert not (h.store.folder(job_id) / "result.glb").exists()
    assert len(h.lines("job")) == 1 and h.lines("job")[0]["outcome"] == "failed"
    assert [t for t, _ in h.events].count("job_failed") == 1


def test_other_engine_errors_fail_with_the_trace_in_the_job_log(tmp_path):
    h = Harness(tmp_path, FaultEngine(fail="structure:error:1"))
    job_id, result = h.run()
    assert result.outcome == "failed" and result.error["code"] == "engine_error"
    assert "RuntimeError: boom" in result.error["message"]
    assert "Traceback" in h.store.log_excerpt(job_id)
    assert len(result.attempts) == 1


def test_poison_requeues_once_then_fails(tmp_path):
    h = Harness(tmp_path, FaultEngine(fail="texture:poison:2"))
    job_id, result = h.run()
    assert result.poisoned and result.outcome == "requeued"
    record = h.store.get(job_id)
    assert record.state.value == "queued" and record.recoveries == 1
    assert record.error["code"] == "gpu_poisoned"
    result = h.runner.run(record)
    assert result.poisoned and result.outcome == "failed"
    assert h.store.get(job_id).state.value == "failed"
    assert [r["outcome"] for r in h.lines("job")] == ["failed"]  # one outcome per job


def test_a_broken_glb_is_never_reported_as_success(tmp_path):
    class BrokenExport(FaultEngine):
        def run_stage(self, stage, state, params, ctx):
            super().run_stage(stage, state, params, ctx)
            if stage == "export":
                data = Path(state["glb_path"]).read_bytes()
                Path(state["glb_path"]).write_bytes(data[: len(data) // 2])

    h = Harness(tmp_path, BrokenExport())
    job_id, result = h.run()
    assert result.outcome == "failed" and result.error["code"] == "invalid_glb"
    assert not any(p.suffix == ".glb" for p in h.store.folder(job_id).iterdir())


def test_reexport_reruns_only_decode_and_export(tmp_path):
    h = Harness(tmp_path, FaultEngine())
    parent, result = h.run({"preset": "balanced"})
    assert result.outcome == "done"
    before = dict(h.engine.calls)
    _, again = h.run({"preset": "balanced", "texture_size": 512}, kind="reexport", parent=parent)
    assert again.outcome == "done", again.error
    assert h.engine.calls["structure"] == before["structure"]
    assert h.engine.calls["decode"] == before["decode"] + 1
    assert again.mesh_stats["texture_size"] <= 512


def test_cancel_and_interrupt(tmp_path):
    h = Harness(tmp_path, FaultEngine())
    job_id, result = h.run(cancelled=lambda: h.engine.calls["structure"] > 0)
    assert result.outcome == "cancelled" and h.store.get(job_id).state.value == "cancelled"
    job_id, result = h.run(interrupted=lambda: h.engine.calls["structure"] > 1)
    assert result.outcome == "interrupted"
    assert h.store.get(job_id).state.value == "queued"  # runs again after a restart


def test_disk_threshold_is_checked_before_the_job_starts(tmp_path):
    h = Harness(tmp_path, FaultEngine())
    h.runner.config.min_free_disk = 1 << 60
    _, result = h.run()
    assert result.error["code"] == "disk_full"
    assert sum(h.engine.calls.values()) == 0


def test_an_input_replaced_in_the_folder_is_read_no_further_than_the_limit(tmp_path):
    """A queued job's input is re-read when it runs; a file swapped for a huge one ends the
    job typed after reading just past the limit, not the whole file into memory."""
    import tracemalloc

    from backend.checks.images import ImageLimits

    h = Harness(tmp_path, FaultEngine())
    record = h.store.create(
        "generate", h.engine.name, parse_params({}).to_dict(), image=png_bytes()
    )
    huge = h.store.folder(record.id) / "input.png"
    with open(huge, "r+b") as f:
        f.truncate(4 << 30)  # sparse: 4 GiB on paper, nothing on the disk
    tracemalloc.start()
    try:
        result = h.runner.run(record, emit=lambda t, c: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.error["code"] == "image_too_large"
    assert peak < 3 * ImageLimits().max_bytes
    assert sum(h.engine.calls.values()) == 0


class GpuFault(FaultEngine):
    uses_gpu = True


def test_adaptive_start_learns_from_ooms_and_skips_them_next_time(tmp_path, monkeypatch):
    free = {"v": 16 << 30}

    def figures():
        return {
            "available": free["v"],
            "free": free["v"],
            "peak": 4 << 30,
            "device": "fake",
            "capability": [9, 0],
            "total": 80 << 30,
        }

    monkeypatch.setattr(gpu, "vram", lambda init=True: figures())
    monkeypatch.setattr(gpu, "reset_peak", lambda: None)
    profile = MemoryProfile(tmp_path / "profile.json", gpu_key="fake")
    # OOMs while resolution > 1024: fits from level 3 on
    h = Harness(tmp_path, GpuFault(fail_above="structure:resolution=1024"), profile)
    _, first = h.run({"preset": "high"})
    # levels 0 and 1 (1536) fail; 2 (remesh band) is skipped: structure never reads it
    assert first.outcome == "done" and first.level == 3 and len(first.attempts) == 3
    h2 = Harness(
        tmp_path / "b",
        GpuFault(fail_above="structure:resolution=1024"),
        MemoryProfile(tmp_path / "profile.json", gpu_key="fake"),
    )  # reloaded
    _, second = h2.run({"preset": "high"})
    assert second.outcome == "done" and second.level == 3 and len(second.attempts) == 1
    assert "adaptive start at level 3" in h2.store.log_excerpt(h2.store.list()[0][0].id)
    # with much more free memory than when it failed, it tries full quality again
    free["v"] = 60 << 30
    _, third = h2.run({"preset": "high"})
    assert third.attempts[0]["level"] == 0


def test_stats_lines_and_aggregates(tmp_path):
    h = Harness(tmp_path, FaultEngine(fail="texture:oom:1"))
    h.run({"preset": "high"})
    h.run({"preset": "high"})
    h.run(cancelled=lambda: True)
    attempts, jobs = h.lines("attempt"), h.lines("job")
    assert len(attempts) == 4 - 0 and len(jobs) == 3  # 2 + 1 + 1 (cancelled at its first stage)
    for line in jobs:
        for field in ("ts", "version", "engine", "params", "stage_seconds", "outcome", "level"):
            assert field in line
    agg = aggregate(h.stats.read())
    assert agg["success_rate"] == 1.0  # cancelled jobs are neither success nor failure
    assert agg["level_distribution"] == {"0": 1, "1": 1}
    assert agg["mean_retries"] == 0.5
    assert agg["oom_attempts"] == 1


def test_poisoned_backend_exits_with_the_documented_code_and_a_fresh_one_finishes(tmp_path):
    from backend.wire.client import Client

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    conn = tmp_path / "conn.json"
    out = tmp_path / "out"

    def serve(*extra):
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backend",
                "serve",
                "--connection-file",
                str(conn),
                "--output-dir",
                str(out),
                "--engine",
                "tests.gpu_engines:FaultEngine",
                "--min-free-disk-mb",
                "1",
                *extra,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def wait_conn(proc):
        deadline = time.monotonic() + 30
        while not conn.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)

    proc = serve("--engine-opt", "fail=texture:poison:1")
    try:
        wait_conn(proc)
        with Client(conn) as client:
            job_id = client.generate(png_bytes())
        assert proc.wait(timeout=30) == gpu.POISONED_EXIT_CODE == 75
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((out / "jobs" / job_id / "job.json").read_text())["state"] == "queued"
    proc = serve()
    try:
        wait_conn(proc)
        with Client(conn) as client:
            final = client.wait_for_job(job_id, timeout=30)
            assert final["event"] == "job_done"
            assert client.job(job_id)["job"]["recoveries"] == 1
            client.shutdown()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ladder_level_names_match_the_table():
    assert ladder.describe(0) == "as requested" and len({lv.name for lv in ladder.LEVELS}) == 13


def test_each_stage_records_its_own_vram_peak(tmp_path, monkeypatch):
    """The per-stage peaks are the engine's memory model on a real GPU (issue #12): reset
    before each stage, read after it; the attempt's peak is the highest of them."""
    peaks = iter([100, 700, 300, 900, 200, 400, 500, 600, 800])
    resets: list[int] = []
    monkeypatch.setattr(gpu, "reset_peak", lambda: resets.append(1))
    monkeypatch.setattr(gpu, "peak_allocated", lambda: next(peaks))
    h = Harness(tmp_path, FaultEngine())
    _, result = h.run({"preset": "fast"})
    assert result.outcome == "done", result.error
    (attempt,) = result.attempts
    stages = [s.name for s in h.engine.stages]
    assert list(attempt["stage_vram_peaks"]) == stages
    assert attempt["vram_peak"] == max(attempt["stage_vram_peaks"].values())
    assert len(resets) >= len(stages)
    line = h.lines("attempt")[-1]
    assert line["stage_vram_peaks"] == attempt["stage_vram_peaks"]
