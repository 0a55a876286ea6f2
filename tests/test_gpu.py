"""GPU tests (`pytest -m gpu`, skipped without CUDA): real OOMs on an emulated 16/24 GB card,
VRAM back at its baseline after every OOM and job, adaptive start, and a real poisoned context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from backend.pipeline import gpu

ALLOCATOR_CONFIGURED = gpu.configure_allocator()  # before torch is imported

torch = pytest.importorskip("torch")

from backend.checks import glbcheck  # noqa: E402
from backend.params import parse_params  # noqa: E402
from backend.pipeline import ladder  # noqa: E402
from backend.pipeline.memprofile import MemoryProfile  # noqa: E402
from backend.pipeline.runner import Runner, RunnerConfig  # noqa: E402
from backend.store.jobs import JobStore  # noqa: E402
from backend.store.stats import StatsLog  # noqa: E402
from tests.conftest import png_bytes  # noqa: E402
from tests.gpu_engines import STAGES, CudaLoadEngine, predicted_peaks  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GIB = 1 << 30
ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_GB = 2.0


@pytest.fixture(scope="module")
def engine():
    engine = CudaLoadEngine(weights_gb=WEIGHTS_GB)
    engine.load()
    yield engine
    engine.unload()
    gpu.cleanup()


@contextmanager
def card(gib: int):
    """Emulate a card with `gib` GiB on the big one."""
    gpu.set_memory_cap(gib * GIB)
    try:
        yield gib * GIB
    finally:
        gpu.set_memory_cap(None)


def _setup(tmp_path: Path, engine, profile=None):
    store = JobStore(tmp_path / "out")
    stats = StatsLog(tmp_path / "stats.jsonl")
    return store, Runner(engine, store, stats, profile, RunnerConfig(min_free_disk=0))


def _run_job(store, runner, preset: str):
    """Run one job, measuring memory_allocated() at every retry (cleanup has run by then)."""
    at_retry: list[int] = []

    def emit(kind, content):
        if kind == "job_retry":
            at_retry.append(torch.cuda.memory_allocated())

    job = store.create("generate", "cuda_load", {"preset": preset}, image=png_bytes())
    return runner.run(job, emit=emit), at_retry


def _fits(params, cap: int) -> bool:
    return max(predicted_peaks(params, WEIGHTS_GB).values()) <= cap


def _check_degraded_run(result, at_retry, baseline, request, cap):
    assert result.outcome == "done", result.error
    print(
        f"\ncap {cap / GIB:.0f} GiB: level {result.level}, "
        + ", ".join(
            f"L{a['level']} {a['stage']} {a['outcome']} peak "
            f"{(a['vram_peak'] or 0) / GIB:.1f} GiB {a['seconds']:.2f} s"
            for a in result.attempts
        )
    )
    ooms = [a for a in result.attempts if a["outcome"] == "oom"]
    assert ooms, "the emulated card should have run out of memory"
    assert all("OutOfMemoryError" in (a["error"] or "") for a in ooms)  # real CUDA OOMs
    assert result.level > 0
    assert _fits(ladder.params_at(request, result.level), cap)
    for attempt in ooms:  # every OOM was a level that really needs more than the card has
        assert not _fits(ladder.params_at(request, attempt["level"]), int(cap * 0.9))
    ok = result.attempts[-1]
    assert ok["outcome"] == "ok" and ok["vram_peak"] is not None and ok["vram_peak"] <= cap
    # no leak through tracebacks: back at the baseline after every OOM and after the job
    assert at_retry and all(m == baseline for m in at_retry), (at_retry, baseline)
    assert torch.cuda.memory_allocated() == baseline
    glbcheck.validate_glb_file(result.glb_path)


def test_allocator_uses_expandable_segments():
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    assert ALLOCATOR_CONFIGURED, "torch was imported before backend.pipeline.gpu could configure it"
    assert "expandable_segments:True" in conf


def test_16gb_card_walks_the_ladder_to_a_level_that_fits(engine, tmp_path):
    store, runner = _setup(tmp_path, engine)
    request = parse_params({"preset": "balanced"})
    with card(16) as cap:
        gpu.cleanup(engine)
        baseline = torch.cuda.memory_allocated()
        result, at_retry = _run_job(store, runner, "balanced")
        _check_degraded_run(result, at_retry, baseline, request, cap)
        # the OOM hit the structure stage; the ladder skipped "remesh off", which cannot help
        assert result.attempts[0]["stage"] == "structure"
        assert 4 not in [a["level"] for a in result.attempts]


def test_24gb_card_keeps_more_quality(engine, tmp_path):
    store, runner = _setup(tmp_path, engine)
    request = parse_params({"preset": "high"})
    with card(24) as cap:
        gpu.cleanup(engine)
        baseline = torch.cuda.memory_allocated()
        result, at_retry = _run_job(store, runner, "high")
        _check_degraded_run(result, at_retry, baseline, request, cap)
        # 24 GB keeps the 1536 cascade with a smaller token budget (level 1 or 2)
        assert result.level <= 2
        assert result.params["resolution"] == 1536


def test_adaptive_start_learns_from_the_first_job(engine, tmp_path):
    profile = MemoryProfile(tmp_path / "state" / "memory_profile.json", "test-16GiB")
    store, runner = _setup(tmp_path, engine, profile)
    with card(16):
        gpu.cleanup(engine)
        first, _ = _run_job(store, runner, "balanced")
        assert first.outcome == "done" and first.attempts[0]["level"] == 0
        assert any(a["outcome"] == "oom" for a in first.attempts)
        gpu.cleanup(engine)
        reloaded = MemoryProfile(tmp_path / "state" / "memory_profile.json", "test-16GiB")
        store2, runner2 = _setup(tmp_path, engine, reloaded)
        second, _ = _run_job(store2, runner2, "balanced")
    assert second.outcome == "done"
    assert second.attempts[0]["level"] > 0, "the second job should not start where it failed"
    assert len(second.attempts) <= len(first.attempts)
    assert second.level == first.level


POISON_CHILD = r"""
import json, sys
from pathlib import Path
from backend.pipeline import gpu
gpu.configure_allocator()
from backend.store.jobs import JobStore
from backend.pipeline.runner import Runner, RunnerConfig
from backend.store.stats import StatsLog
from tests.gpu_engines import CudaLoadEngine

root, job_id = Path(sys.argv[1]), sys.argv[2]
engine = CudaLoadEngine(weights_gb=1, poison="decode", poison_marker=str(root / "poisoned"))
engine.load()
store = JobStore(root / "out")
runner = Runner(engine, store, StatsLog(root / "stats.jsonl"), config=RunnerConfig(min_free_disk=0))
result = runner.run(store.get(job_id))
print(json.dumps({"outcome": result.outcome, "poisoned": result.poisoned,
                  "error": result.error, "probe": gpu.probe_health(10.0)}), flush=True)
if result.poisoned:
    gpu.exit_poisoned("test job poisoned the CUDA context")
sys.exit(0 if result.outcome == "done" else 1)
"""


def _child(tmp_path: Path, job_id: str) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-c", POISON_CHILD, str(tmp_path), job_id],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stderr[-3000:]
    return proc.returncode, json.loads(lines[-1])


def test_device_side_assert_poisons_and_a_fresh_process_completes_the_job(tmp_path):
    store = JobStore(tmp_path / "out")
    job = store.create("generate", "cuda_load", {"preset": "fast"}, image=png_bytes())
    code, report = _child(tmp_path, job.id)
    assert code == gpu.POISONED_EXIT_CODE, report
    assert report["poisoned"] is True
    assert report["error"]["code"] == "gpu_poisoned"
    assert "device-side assert" in report["error"]["message"]
    assert report["probe"]["ok"] is False and report["probe"]["kind"] == "poison"
    assert store.get(job.id).state.value == "queued"  # requeued for a fresh backend
    code, report = _child(tmp_path, job.id)  # the marker file makes the fault a one-off
    assert code == 0, report
    assert report["outcome"] == "done"
    record = store.get(job.id)
    assert record.state.value == "done"
    glbcheck.validate_glb_file(Path(store.folder(job.id)) / "result.glb")


def test_probe_and_figures_on_a_healthy_gpu(engine):
    health = gpu.probe_health(5.0)
    assert health["ok"] is True and health["gpu"] is True
    figures = gpu.vram()
    assert figures["total"] > 0 and 0 <= figures["free"] <= figures["total"]
    with card(16) as cap:
        capped = gpu.vram()
        assert capped["total"] == cap and capped["free"] <= cap
        assert gpu.device_key(capped).endswith("16GiB")
    assert len(STAGES) == 5
