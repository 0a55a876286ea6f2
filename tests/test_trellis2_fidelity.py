"""The staged adapter does what upstream TRELLIS.2 does, checked against the fake package.

The fake mirrors upstream's wiring (its `run()` is upstream's, step for step) and its models
answer differently to each condition, model and resolution, so a wiring mistake in the
adapter changes the mesh. `tests/test_trellis2_mutations.py` proves these tests catch the
mistakes that matter. The same comparison on the real code and the GPU is
`scripts/gpu/bench_upstream.py`.
"""

from __future__ import annotations

import sys

import pytest

from backend.engines import trellis2 as adapter
from backend.errors import BackendError, ErrorCode, InputError
from backend.params import parse_params
from tests.test_trellis2_engine import (  # noqa: F401  (fixtures)
    DEVICE,
    Recorder,
    fake,
    fake_path,
    make_engine,
    new_state,
    run,
    subject_image,
    weights,
)

torch = pytest.importorskip("torch")

SAMPLING = {"conditioning", "sparse_structure", "shape", "texture", "decode"}
# (preset, extra parameters, upstream pipeline type, resolution upstream ends at)
CASES = {
    "512": ({"preset": "fast"}, "512", 512),
    "1024_cascade": ({"preset": "balanced"}, "1024_cascade", 1024),
    # a token budget that makes upstream step down from 1536 to 1152
    "1536_cascade_budget": ({"preset": "high", "max_num_tokens": 8000}, "1536_cascade", 1152),
}


@pytest.fixture
def engine(fake, weights):
    engine = make_engine(weights)
    yield engine
    engine.unload()


def _upstream(engine, image, params, pipeline_type):
    """Upstream's own run() on the same loaded models, same seed and sampler settings."""
    pipe = engine.pipeline
    meshes, (shape_slat, tex_slat, res) = pipe.run(
        image,
        seed=params.seed,
        pipeline_type=pipeline_type,
        max_num_tokens=params.max_num_tokens,
        return_latent=True,
    )
    return meshes[0], shape_slat, tex_slat, res


@pytest.mark.parametrize("case", list(CASES))
def test_staged_run_matches_upstream_run(engine, fake, tmp_path, case):
    raw, pipeline_type, expected_res = CASES[case]
    params = parse_params({**raw, "seed": 11})
    state = new_state(tmp_path)
    run(engine, params, state, names=SAMPLING)
    mesh, shape_slat, tex_slat, res = _upstream(engine, state["image"], params, pipeline_type)
    assert res == expected_res
    assert state["effective_resolution"] == res
    assert state["effective_params"] == {"resolution": res}
    assert torch.equal(state["shape_slat"].coords, shape_slat.coords)
    assert torch.allclose(state["shape_slat"].feats, shape_slat.feats, atol=1e-6)
    assert torch.allclose(state["tex_slat"].feats, tex_slat.feats, atol=1e-6)
    ours = state["decoded_mesh"]
    assert torch.allclose(ours.vertices, mesh.vertices, atol=1e-6)
    assert torch.equal(ours.faces, mesh.faces)
    assert torch.allclose(ours.attrs, mesh.attrs, atol=1e-6)
    assert float(ours.vertices.abs().max()) <= 0.5  # inside upstream's unit cube


def test_export_passes_the_upstream_demo_settings(engine, fake, tmp_path):
    """example.py / app.py: remesh with band 1 and no projection back onto the raw surface,
    on the grid of the resolution the shape was really made at."""
    params = parse_params({"preset": "high", "max_num_tokens": 8000})
    state = new_state(tmp_path)
    run(engine, params, state)
    (name, kwargs) = [c for c in fake.CALLS if c[0] == "to_glb"][-1]
    assert kwargs["remesh"] is True
    assert kwargs["remesh_project"] == 0
    assert kwargs["grid_size"] == 1152
    assert kwargs["texture_size"] == params.texture_size
    assert kwargs["decimation_target"] == params.decimation_target
    assert kwargs["remesh_band"] == 1.0
    # the ladder's narrower band reaches upstream (it lowers the export's peak by a third)
    state = new_state(tmp_path / "band")
    run(engine, params.replace(remesh_band=0.5), state)
    assert [c for c in fake.CALLS if c[0] == "to_glb"][-1][1]["remesh_band"] == 0.5


def test_the_cache_is_freed_between_sampling_and_decoding(engine, fake, tmp_path, monkeypatch):
    decodes_seen_at_empty_cache: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(
        torch.cuda,
        "empty_cache",
        lambda: decodes_seen_at_empty_cache.append(fake.FORWARDS.get("decode", 0)),
    )
    state = new_state(tmp_path)
    params = parse_params({"preset": "fast"})
    run(engine, params, state, names=SAMPLING - {"decode"})
    assert decodes_seen_at_empty_cache == []
    run(engine, params, state, names={"decode"})
    assert decodes_seen_at_empty_cache == [0]  # once, before the decoder ran
    assert fake.FORWARDS["decode"] == 1


def test_steps_default_to_the_upstream_sampler_default(fake, tmp_path):
    import json

    import fake_weights

    root = fake_weights.make_weights_dir(tmp_path / "w", texturing=False)
    config = json.loads((root / "pipeline.json").read_text())
    del config["args"]["sparse_structure_sampler"]["params"]["steps"]
    (root / "pipeline.json").write_text(json.dumps(config))
    engine = make_engine(root)
    recorder = run(
        engine,
        parse_params({"preset": "fast"}),
        new_state(tmp_path),
        names={"conditioning", "sparse_structure"},
    )
    assert recorder.totals()["sparse_structure"] == 50  # FlowEulerSampler.sample(steps=50)


def test_background_removal_is_loaded_only_when_an_image_needs_it(engine, fake, tmp_path):
    assert engine.pipeline.rembg_model is None  # not at start
    run(engine, parse_params({"preset": "fast"}), new_state(tmp_path), names={"conditioning"})
    assert engine.pipeline.rembg_model is None  # RGBA input: never needed
    state = new_state(tmp_path, image=subject_image("RGB"))
    run(engine, parse_params({"preset": "fast"}), state, names={"conditioning"})
    assert engine.pipeline.rembg_model is not None
    assert engine.describe()["background_removal_loaded"] is True


def test_without_background_removal_only_opaque_images_are_refused(fake, tmp_path):
    import fake_weights

    root = fake_weights.make_weights_dir(tmp_path / "w", texturing=False, aux=False)
    fake_weights._hf_folder(root / "facebook" / "dinov3-vitl16-pretrain-lvd1689m")
    engine = make_engine(root)  # loads: background removal is optional
    state = new_state(tmp_path)
    run(engine, parse_params({"preset": "fast"}), state)
    assert state["glb_path"].is_file()
    with pytest.raises(InputError) as err:
        run(
            engine,
            parse_params({"preset": "fast"}),
            new_state(tmp_path, image=subject_image("RGB")),
            names={"conditioning"},
        )
    assert err.value.code is ErrorCode.NEEDS_TRANSPARENCY
    assert "transparent background" in err.value.hint


def _mesh_bytes() -> bytes:
    import io

    import trimesh

    buf = io.BytesIO()
    trimesh.creation.box(extents=(1.0, 2.0, 0.5)).export(buf, file_type="glb")
    return buf.getvalue()


def _texture_state(tmp_path, name: str) -> dict:
    state = new_state(tmp_path)
    state["output_path"] = tmp_path / f"{name}.glb"
    state["mesh_bytes"] = _mesh_bytes()
    state["mesh_format"] = "glb"
    return state


def test_texturing_twice_with_low_vram_off_keeps_the_encoder_usable(fake, weights, tmp_path):
    """With low_vram off the models stay on the GPU; after a job the runner moves everything
    to the CPU, and the next job must bring the texturing pipeline's encoder back too."""
    engine = make_engine(weights, low_vram="false")
    params = parse_params({"preset": "fast"})
    for name in ("first", "second"):
        state = _texture_state(tmp_path, name)
        run(engine, params, state, kind="texture")
        assert state["glb_path"].is_file()
        engine.release_gpu()  # what the runner's cleanup does after every job
        assert engine.texturing.models["shape_slat_encoder"].placement == "cpu"


def test_texturing_uses_the_resolutions_upstream_has_models_for(engine, fake, tmp_path):
    state = _texture_state(tmp_path, "high")
    run(engine, parse_params({"preset": "high"}), state, kind="texture")
    assert state["effective_params"] == {"resolution": 1024}
    assert fake.FORWARDS.get("dinov3_1024") == 1 and "dinov3_1536" not in fake.FORWARDS


def test_runner_reports_the_resolution_really_used(engine, fake, tmp_path):
    from backend.pipeline.runner import Runner, RunnerConfig
    from backend.store.jobs import JobStore
    from backend.store.stats import StatsLog
    from tests.conftest import png_bytes

    store = JobStore(tmp_path / "out")
    stats = StatsLog(tmp_path / "stats.jsonl")
    runner = Runner(engine, store, stats, None, RunnerConfig(min_free_disk=0))
    events: list[tuple[str, dict]] = []
    request = {"preset": "high", "max_num_tokens": 8000}
    job = store.create("generate", "trellis2", request, image=png_bytes())
    runner.run(job, emit=lambda kind, content: events.append((kind, content)))
    done = next(content for kind, content in events if kind == "job_done")
    assert done["final_params"]["resolution"] == 1152
    assert done["mesh_stats"]["structure"]["pipeline_type"] == "1536_cascade"
    assert store.get(job.id).to_dict()["final_params"]["resolution"] == 1152
    job_line = [r for r in stats.read() if r.get("kind") == "job"][-1]
    assert job_line["final_params"]["resolution"] == 1152
    assert job_line["params"]["max_num_tokens"] == 8000  # the request itself is kept


@pytest.mark.parametrize(
    "device, visible, expected_device, expected_visible",
    [
        ("cuda", None, "cuda", None),
        ("cuda:0", None, "cuda", None),
        ("cuda:1", None, "cuda", "1"),
        ("cuda:1", "4,6", "cuda", "6"),  # the Nth of the GPUs this process may see
        ("cpu", None, "cpu", None),
    ],
)
def test_a_gpu_index_pins_the_process_to_that_gpu(
    monkeypatch, device, visible, expected_device, expected_visible
):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert adapter.pin_device(device) == expected_device
    import os

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == expected_visible


def test_a_gpu_index_after_cuda_started_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(BackendError) as err:
        adapter.pin_device("cuda:2")
    assert err.value.code is ErrorCode.ENGINE_UNAVAILABLE and "--gpu 2" in err.value.hint
    assert "torch" in sys.modules


def test_every_normal_in_the_glb_has_unit_length(engine, fake, tmp_path):
    """Khronos: ACCESSOR_VECTOR3_NON_UNIT is an error; upstream's export leaves zero normals
    on vertices of degenerate faces (seen in a real 432k-face GLB)."""
    from tests.khronos import assert_khronos_valid

    fake.ZERO_NORMALS = 3
    state = new_state(tmp_path)
    run(engine, parse_params({"preset": "fast"}), state)
    assert state["repaired_normals"] == 3
    assert_khronos_valid(state["glb_path"])
