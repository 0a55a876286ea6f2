"""Every GLB the product produces passes the Khronos glTF-Validator with 0 errors: the preview
engine on every example and preset, re-exports, texture jobs, and the test engines' output."""

from __future__ import annotations

from pathlib import Path

from backend.params import PRESETS, parse_params
from backend.pipeline.runner import Runner, RunnerConfig
from backend.store.jobs import JobStore
from backend.store.stats import StatsLog
from tests.gpu_engines import FaultEngine
from tests.khronos import error_codes, khronos_reports, requires_khronos

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.png"))


def _runner(tmp_path, engine):
    store = JobStore(tmp_path / engine.name)
    return store, Runner(
        engine,
        store,
        StatsLog(tmp_path / "stats.jsonl"),
        config=RunnerConfig(min_free_disk=1 << 20),
    )


@requires_khronos
def test_all_produced_glbs_have_zero_khronos_errors(tmp_path):
    from backend.engines.preview import PreviewEngine

    assert len(EXAMPLES) >= 4
    produced: list[str] = []
    store, runner = _runner(tmp_path, PreviewEngine())
    presets = [p for p in PRESETS if p != "game-asset"]  # 4096 textures only cost time here
    first_done = None
    for i, example in enumerate(EXAMPLES):
        preset = presets[i % len(presets)]
        record = store.create(
            "generate",
            "preview",
            parse_params({"preset": preset}).to_dict(),
            image=example.read_bytes(),
            filename=example.name,
        )
        result = runner.run(record)
        assert result.outcome == "done", (example.name, result.error)
        produced.append(result.glb_path)
        first_done = first_done or record.id
    reexport = store.create(
        "reexport", "preview", parse_params({"texture_size": 512}).to_dict(), parent=first_done
    )
    result = runner.run(reexport)
    assert result.outcome == "done", result.error
    produced.append(result.glb_path)
    texture = store.create(
        "texture",
        "preview",
        parse_params({"preset": "fast"}).to_dict(),
        image=EXAMPLES[0].read_bytes(),
        mesh=Path(produced[1]).read_bytes(),
        mesh_ext="glb",
    )
    result = runner.run(texture)
    assert result.outcome == "done", result.error
    produced.append(result.glb_path)
    fstore, frunner = _runner(tmp_path, FaultEngine())
    record = fstore.create("generate", "fault", {}, image=EXAMPLES[0].read_bytes())
    produced.append(frunner.run(record).glb_path)

    reports = khronos_reports(produced)
    assert len(reports) == len(produced)
    for path, report in zip(produced, reports, strict=True):
        assert report["issues"]["numErrors"] == 0, (path, error_codes(report))
        assert report["info"]["totalTriangleCount"] > 0
