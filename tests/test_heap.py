"""The backend's memory between jobs: whatever a job leaves in reference cycles (trimesh does,
on every mesh) is freed when the job ends, not whenever CPython next runs a full collection.
Without this a loaded backend's RSS grew ~100 MB over 1,000 preview jobs (docs/RELIABILITY.md)."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from backend.params import parse_params
from backend.pipeline import heap
from backend.pipeline.runner import Runner, RunnerConfig
from backend.store.jobs import JobStore
from backend.store.stats import StatsLog
from tests.conftest import png_bytes
from tests.cpu_engines import SlowEngine

ROOT = Path(__file__).resolve().parent.parent


class _Cyclic:
    """A large array held in a reference cycle, as trimesh's cached meshes are."""

    def __init__(self):
        self.me = self
        self.data = np.ones(1 << 20, dtype=np.uint8)


class CycleLeavingEngine(SlowEngine):
    """Every stage leaves one unreachable cycle behind and remembers it weakly."""

    def __init__(self, **options):
        super().__init__(steps=1, step_seconds=0.0, **options)
        self.left_behind: list[weakref.ref] = []

    def run_stage(self, stage, state, params, ctx):
        self.left_behind.append(weakref.ref(_Cyclic()))
        super().run_stage(stage, state, params, ctx)


@pytest.fixture
def no_automatic_gc():
    """Only explicit collections run, so the test shows who freed the cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


def test_cycles_a_job_leaves_behind_are_freed_when_it_ends(tmp_path, no_automatic_gc):
    engine = CycleLeavingEngine()
    store = JobStore(tmp_path / "out")
    runner = Runner(
        engine, store, StatsLog(tmp_path / "stats.jsonl"), config=RunnerConfig(min_free_disk=0)
    )
    for _ in range(2):
        record = store.create(
            "generate", engine.name, parse_params({}).to_dict(), image=png_bytes()
        )
        assert runner.run(record).outcome == "done"
        alive = [ref for ref in engine.left_behind if ref() is not None]
        assert alive == [], f"{len(alive)} of {len(engine.left_behind)} cycles still held"
    assert len(engine.left_behind) == 2 * len(engine.stages)


def test_settle_freezes_start_up_objects_and_later_cycles_are_still_freed():
    # A child interpreter: freezing the test process's own objects would outlive this test.
    script = textwrap.dedent(
        """
        import gc, weakref
        from backend.pipeline import heap

        class Cyclic:
            def __init__(self):
                self.me = self

        kept = Cyclic()  # start-up state that lives on
        heap.settle()
        assert gc.get_freeze_count() > 0
        assert heap.figures()["gc_frozen"] == gc.get_freeze_count()
        gc.disable()
        ref = weakref.ref(Cyclic())
        assert ref() is not None
        heap.release_after_job()
        assert ref() is None, "a cycle made after settle() was not collected"
        assert kept.me is kept
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_preview_job_imports_nothing_the_collector_must_walk_after_settle(tmp_path):
    # The full collection after each job holds the GIL for as long as it walks the objects
    # settle() left unfrozen: trimesh (and networkx) imported by a job's export were ~27,000
    # of them. A child interpreter, as above.
    script = textwrap.dedent(
        """
        import gc, sys
        from pathlib import Path
        from backend.pipeline import heap
        from backend.engines import create
        from backend.store.jobs import JobStore
        from backend.params import parse_params
        from backend.pipeline.runner import Runner, RunnerConfig
        from backend.store.stats import StatsLog
        from tests.conftest import png_bytes

        out = Path(sys.argv[1])
        engine = create("preview")
        engine.load()
        store = JobStore(out / "out")
        runner = Runner(engine, store, StatsLog(out / "stats.jsonl"), config=RunnerConfig(0))
        heap.settle()
        params = parse_params({"preset": "fast"}).to_dict()
        record = store.create("generate", "preview", params, image=png_bytes())
        assert runner.run(record).outcome == "done"
        print(len(gc.get_objects()))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 10_000  # ~3,000; ~30,000 with trimesh unfrozen


def test_a_backend_process_freezes_its_start_up_objects_once_ready(tmp_path):
    from tests.reliability.support import BackendProcess

    b = BackendProcess(tmp_path, "preview")
    try:
        deadline = time.monotonic() + 30
        status = b.client.status()
        while status["state"] != "ready" and time.monotonic() < deadline:
            time.sleep(0.05)
            status = b.client.status()
        assert status["state"] == "ready", status
        memory = status["memory"]
        assert memory["gc_frozen"] > 1000, memory  # imports and the loaded engine
        assert memory["rss_bytes"] > 10 << 20, memory
    finally:
        assert b.stop() == 0


def test_an_in_thread_server_leaves_the_host_process_unfrozen(make_server):
    frozen_before = gc.get_freeze_count()
    server = make_server("preview")
    job = server.client.generate(png_bytes(), {"preset": "fast"})
    assert server.client.wait_for_job(job, 30)["event"] == "job_done"  # the engine has loaded
    memory = server.client.status()["memory"]
    assert memory["gc_frozen"] == frozen_before
    assert memory["rss_bytes"] is None or memory["rss_bytes"] > 0


def test_the_memory_figures_status_shows_walk_no_frozen_object(monkeypatch):
    # gc.get_freeze_count() walks every frozen object: 60-77 ms of the control loop per
    # `status` with TRELLIS.2 loaded (GPU run 12). The count is taken once, by settle().
    def walk() -> int:
        raise AssertionError("status walked the frozen objects")

    monkeypatch.setattr(heap.gc, "get_freeze_count", walk)
    monkeypatch.setattr(heap, "_frozen", 191_000)
    assert heap.figures()["gc_frozen"] == 191_000
