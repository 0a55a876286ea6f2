"""The TRELLIS.2 adapter end to end on CPU, against the fake trellis2/o_voxel in fake_trellis/."""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image, ImageDraw

from backend.checks import meshes
from backend.engines import attention, sparse_attention
from backend.engines.base import KNOBS, StageContext
from backend.errors import BackendError, ErrorCode, JobCancelled
from backend.params import GenerationParams, parse_params

torch = pytest.importorskip("torch")

FAKE = Path(__file__).resolve().parent / "fake_trellis"
DEVICE = "cpu:1"  # the fake records models moved here as "on the device"
_FAKE_MODULES = ("trellis2", "o_voxel", "cumesh", "flex_gemm", "nvdiffrast")
_ENV = (
    "ATTN_BACKEND",
    "SPARSE_ATTN_BACKEND",
    "SPARSE_CONV_BACKEND",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TRELLIS2_WEIGHTS",
    "TRELLIS2_DINOV3",
    "TRELLIS2_REMBG",
    "TRELLIS2_CHECKOUT",
)


def _purge_fake_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _FAKE_MODULES:
            del sys.modules[name]


@pytest.fixture(scope="module")
def fake_path():
    sys.path.insert(0, str(FAKE))
    yield
    sys.path.remove(str(FAKE))
    _purge_fake_modules()


@pytest.fixture(scope="module")
def weights(fake_path, tmp_path_factory):
    import fake_weights

    return fake_weights.make_weights_dir(tmp_path_factory.mktemp("weights"))


@pytest.fixture
def fake(fake_path, monkeypatch):
    import fake_control

    for name in _ENV:  # setenv+delenv: whatever the engine sets is undone after the test
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    fake_control.reset()
    yield fake_control
    fake_control.reset()
    if sparse_attention.installed():  # the engine's SDPA fallback stays in one test only
        del sys.modules[sparse_attention.MODULE_NAME]


def make_engine(weights_dir, **options):
    from backend.engines.trellis2 import Trellis2Engine

    options.setdefault("device", DEVICE)
    options.setdefault("attention", "sdpa")
    engine = Trellis2Engine(weights_dir=str(weights_dir), **options)
    engine.load()
    return engine


@pytest.fixture
def engine(fake, weights):
    engine = make_engine(weights)
    yield engine
    engine.unload()


def subject_image(mode="RGBA", size=96) -> Image.Image:
    image = Image.new(mode, (size, size), (0, 0, 0, 0) if mode == "RGBA" else (235, 235, 235))
    fill = (40, 120, 220, 255) if mode == "RGBA" else (40, 120, 220)
    ImageDraw.Draw(image).ellipse((size // 4, size // 6, 3 * size // 4, 5 * size // 6), fill=fill)
    return image


class Recorder:
    """StageContext factory that keeps every progress report and can cancel on demand."""

    def __init__(self, cancel_after: int | None = None):
        self.events: list[tuple[str, int, int]] = []
        self.cancel_after = cancel_after

    def ctx(self, stage: str) -> StageContext:
        return StageContext(stage, self._report, self._cancelled)

    def _report(self, stage, step, total, message) -> None:
        self.events.append((stage, step, total))

    def _cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.events) >= self.cancel_after

    def totals(self) -> dict[str, int]:
        return {stage: total for stage, _, total in self.events}


def run(engine, params, state, kind="generate", names=None, recorder=None):
    recorder = recorder or Recorder()
    for stage in engine.stages_for(kind):
        if names is None or stage.name in names:
            engine.run_stage(stage.name, state, params, recorder.ctx(stage.name))
    return recorder


def new_state(tmp_path, image=None) -> dict:
    return {"image": image or subject_image(), "output_path": tmp_path / "result.glb"}


def glb_json(path) -> dict:
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<I", data[12:16])
    return json.loads(data[20 : 20 + length])


def placements(engine) -> dict[str, str]:
    pipe = engine.pipeline
    out = {name: m.placement for name, m in pipe.models.items()}
    out["image_cond_model"] = pipe.image_cond_model.placement
    if pipe.rembg_model is not None:
        out["rembg_model"] = pipe.rembg_model.placement
    if engine.texturing is not None:
        out["shape_slat_encoder"] = engine.texturing.models["shape_slat_encoder"].placement
    return out


def on_device(engine) -> list[str]:
    return [name for name, where in placements(engine).items() if where != "cpu"]


# -- presets and parameters --------------------------------------------------------------

PRESET_EXPECT = {
    # preset: (pipeline type, steps per stage (ss, shape incl. cascade LR+HR, texture))
    "fast": ("512", (12, 12, 12)),
    "balanced": ("1024_cascade", (12, 24, 12)),
    "high": ("1536_cascade", (12, 24, 12)),
    "game-asset": ("1536_cascade", (12, 48, 36)),
}


@pytest.mark.parametrize("preset", list(PRESET_EXPECT))
def test_each_preset_generates_a_png_textured_glb(engine, fake, tmp_path, preset):
    params = parse_params({"preset": preset, "seed": 7})
    state = new_state(tmp_path)
    recorder = run(engine, params, state)

    pipeline_type, (ss, shape, tex) = PRESET_EXPECT[preset]
    assert state["pipeline_type"] == pipeline_type
    assert state["effective_resolution"] == params.resolution
    totals = recorder.totals()
    assert (totals["sparse_structure"], totals["shape"], totals["texture"]) == (ss, shape, tex)
    call = fake.CALLS[-1][1]
    assert call["texture_size"] == params.texture_size
    assert call["decimation_target"] == params.decimation_target
    assert call["remesh"] is params.remesh
    assert call["grid_size"] == params.resolution
    doc = glb_json(state["glb_path"])
    assert doc["images"] and all(img["mimeType"] == "image/png" for img in doc["images"])
    assert "EXT_texture_webp" not in doc.get("extensionsUsed", [])
    loaded = trimesh.load(state["glb_path"], force="mesh")
    vertices, faces = state["mesh_arrays"]
    assert len(loaded.faces) == len(faces) == state["mesh_stats"]["faces"] > 0
    assert state["mesh_stats"]["texture_size"] == params.texture_size
    # Latents live on the CPU between stages (an OOM later must not pin them on the GPU).
    assert state["shape_slat"].feats.device.type == "cpu"
    assert on_device(engine) == []


def test_engine_declares_knobs_and_stages(fake, weights):
    from backend.engines.trellis2 import Trellis2Engine

    # what cannot lower the real code's memory is not offered to the ladder
    assert Trellis2Engine.capabilities == KNOBS - {"image_size", "steps_scale", "guidance"}
    knobs = {s.name: s.knobs for s in Trellis2Engine.stages}
    assert knobs["conditioning"] == {"image_size"}
    assert "resolution" in knobs["shape"] and "max_num_tokens" in knobs["shape"]
    assert knobs["decode"] == frozenset()
    assert knobs["export"] == {"texture_size", "decimation_target", "remesh", "remesh_band"}
    read = set().union(*knobs.values())
    assert read == KNOBS  # every knob a request holds is read by some stage


def test_sampler_overrides_are_merged_scaled_and_whitelisted(engine, fake, tmp_path):
    seen: dict[str, dict] = {}
    pipe = engine.pipeline
    for stage, attr in (
        ("ss", "sparse_structure_sampler"),
        ("shape", "shape_slat_sampler"),
        ("tex", "tex_slat_sampler"),
    ):
        sampler = getattr(pipe, attr)
        original = sampler.sample

        def spy(*args, _stage=stage, _orig=original, **kwargs):
            seen[_stage] = kwargs
            return _orig(*args, **kwargs)

        sampler.sample = spy
    params = parse_params(
        {
            "preset": "fast",
            "steps_scale": 0.5,
            "guidance": False,
            "samplers": {"shape": {"steps": 8, "rescale_t": 2.0}},
        }
    )
    run(engine, params, new_state(tmp_path))
    assert seen["ss"]["steps"] == 6 and seen["ss"]["guidance_rescale"] == 0.7  # default kept
    assert seen["shape"]["steps"] == 4 and seen["shape"]["rescale_t"] == 2.0
    assert all(kwargs["guidance_strength"] == 1.0 for kwargs in seen.values())
    forwarded = set().union(*(set(k) for k in seen.values()))
    assert forwarded <= {
        "steps",
        "guidance_strength",
        "guidance_rescale",
        "guidance_interval",
        "rescale_t",
        "cond",
        "neg_cond",
        "verbose",
        "tqdm_desc",
        "concat_cond",
    }


def test_unknown_sampler_key_is_rejected_before_reaching_the_model(engine, fake, tmp_path):
    # parse_params already refuses it; the engine refuses it too if params come from elsewhere.
    params = GenerationParams(resolution=512, samplers={"sparse_structure": {"cfg_strength": 3}})
    state = new_state(tmp_path)
    run(engine, params, state, names={"conditioning"})
    with pytest.raises(BackendError) as err:
        run(engine, params, state, names={"sparse_structure"})
    assert err.value.code is ErrorCode.BAD_PARAMS and "cfg_strength" in err.value.message
    assert fake.FORWARDS.get("sparse_structure", 0) == 0


def test_stray_key_in_pipeline_json_does_not_reach_the_flow_model(fake, tmp_path):
    import fake_weights

    root = fake_weights.make_weights_dir(tmp_path / "w")
    config = json.loads((root / "pipeline.json").read_text())
    config["args"]["sparse_structure_sampler"]["params"]["cfg_strength"] = 3.0
    (root / "pipeline.json").write_text(json.dumps(config))
    engine = make_engine(root)
    state = new_state(tmp_path)
    run(engine, parse_params({"preset": "fast"}), state)  # the real model would TypeError
    assert state["glb_path"].is_file()


def test_max_num_tokens_lowers_the_effective_resolution(engine, fake, tmp_path):
    params = parse_params({"preset": "high", "max_num_tokens": 4096})
    state = new_state(tmp_path)
    run(engine, params, state)
    effective = state["effective_resolution"]
    assert 1024 <= effective < 1536 and (1536 - effective) % 128 == 0
    assert fake.CALLS[-1][1]["grid_size"] == effective
    assert engine.describe()["effective_resolution"] == effective


def test_options_arrive_as_strings(fake, weights):
    engine = make_engine(weights, low_vram="false")
    assert engine.low_vram is False
    assert on_device(engine)  # not low-VRAM: everything sits on the device after load
    engine.release_gpu()
    assert on_device(engine) == []
    with pytest.raises(BackendError) as err:
        make_engine(weights, low_vram="maybe")
    assert err.value.code is ErrorCode.BAD_PARAMS


def test_images_with_alpha_skip_background_removal(engine, fake, tmp_path):
    params = parse_params({"preset": "fast"})
    run(engine, params, new_state(tmp_path), names={"conditioning"})
    assert fake.FORWARDS.get("rembg", 0) == 0
    state = new_state(tmp_path, subject_image("RGB"))
    run(engine, params, state, names={"conditioning"})
    assert fake.FORWARDS["rembg"] == 1
    assert state["prepared_image"].mode == "RGB"


@pytest.mark.parametrize("image", ["transparent", "blank_rgb"])
def test_empty_alpha_is_rejected_clearly(engine, fake, tmp_path, image):
    if image == "transparent":
        picture = Image.new("RGBA", (64, 64), (255, 0, 0, 30))
    else:
        picture = Image.new("RGB", (64, 64), (200, 200, 200))  # nothing for rembg to find
    with pytest.raises(BackendError) as err:
        run(engine, parse_params({}), new_state(tmp_path, picture), names={"conditioning"})
    assert err.value.code is ErrorCode.EMPTY_ALPHA


def test_empty_sparse_structure_is_rejected(engine, fake, tmp_path):
    fake.EMPTY_STRUCTURE = True
    with pytest.raises(BackendError) as err:
        run(engine, parse_params({"preset": "fast"}), new_state(tmp_path))
    assert err.value.code is ErrorCode.EMPTY_STRUCTURE


# -- failures, release and resume ------------------------------------------------------------

STAGES = ("conditioning", "sparse_structure", "shape", "texture", "decode", "export")


@pytest.mark.parametrize(
    "where,stage,kind",
    [
        ("conditioning", "conditioning", "oom"),
        ("sparse_structure", "sparse_structure", "oom"),
        ("shape", "shape", "oom"),
        ("texture", "texture", "oom"),
        ("decode", "decode", "oom"),
        ("export", "export", "cumesh_oom"),
    ],
)
def test_oom_propagates_unchanged_and_the_stage_resumes(engine, fake, tmp_path, where, stage, kind):
    params = parse_params({"preset": "balanced", "seed": 3, "texture_size": 256})
    reference = new_state(tmp_path)
    run(engine, params, reference)

    index = STAGES.index(stage)
    state = new_state(tmp_path)
    run(engine, params, state, names=set(STAGES[:index]))
    earlier = dict(state)
    fake.FORWARDS.clear()
    fake.FAIL.append({"where": where, "kind": kind, "times": 1})
    expected = torch.OutOfMemoryError if kind == "oom" else RuntimeError
    with pytest.raises(expected) as err:
        run(engine, params, state, names={stage})
    assert type(err.value) is expected  # not wrapped: the runner classifies it
    if kind == "cumesh_oom":
        assert "[CuMesh]" in str(err.value) and "out of memory" in str(err.value)
    elif stage != "export":
        assert on_device(engine)  # upstream has no try/finally: the model stayed on the GPU
    engine.release_gpu()
    assert on_device(engine) == []

    # Resume at the failed stage from the earlier stages' outputs, as the runner does.
    resumed = dict(earlier)
    fake.FORWARDS.clear()
    run(engine, params, resumed, names=set(STAGES[index:]))
    for done in STAGES[:index]:
        counter = {"conditioning": "dinov3_512"}.get(done, done)  # shape computes cond_1024
        assert fake.FORWARDS.get(counter, 0) == 0, f"{done} ran again"
    # Same seed, same result as the uninterrupted run (the RNG state travels in the state).
    assert torch.equal(resumed["tex_slat"].feats, reference["tex_slat"].feats)
    assert resumed["glb_path"].is_file()


def test_cancel_stops_at_the_next_sampler_step(engine, fake, tmp_path):
    params = parse_params({"preset": "balanced"})
    state = new_state(tmp_path)
    run(engine, params, state, names={"conditioning", "sparse_structure"})
    recorder = Recorder(cancel_after=5)
    fake.FORWARDS.clear()
    with pytest.raises(JobCancelled):
        run(engine, params, state, names={"shape"}, recorder=recorder)
    steps = [step for stage, step, _ in recorder.events if stage == "shape"]
    assert steps and max(steps) < 24  # stopped inside the stage, not after it
    assert 0 < fake.FORWARDS["shape"] < 2 * 24  # CFG: up to two forwards per step
    assert "sample_once" not in vars(engine.pipeline.shape_slat_sampler)  # hook removed
    engine.release_gpu()
    assert on_device(engine) == []


def test_release_gpu_is_safe_any_time(fake, weights):
    from backend.engines.trellis2 import Trellis2Engine

    Trellis2Engine(weights_dir=str(weights)).release_gpu()  # never loaded
    engine = make_engine(weights)
    engine.release_gpu()
    engine.release_gpu()
    assert on_device(engine) == []


# -- re-export, texturing --------------------------------------------------------------------


def test_reexport_reruns_only_decode_and_export(engine, fake, tmp_path):
    params = parse_params({"preset": "balanced", "texture_size": 1024})
    state = new_state(tmp_path)
    run(engine, params, state)
    job = tmp_path / "job"
    job.mkdir()
    engine.save_cache(state, job)

    cached = engine.load_cache(job)
    assert [s.name for s in engine.stages_for("reexport")] == ["decode", "export"]
    fake.FORWARDS.clear()
    fake.CALLS.clear()
    again = {**cached, "output_path": tmp_path / "re.glb"}
    new = params.replace(texture_size=512, decimation_target=100_000, remesh=False)
    run(engine, new, again, kind="reexport")
    assert not {"conditioning", "sparse_structure", "shape", "texture"} & set(fake.FORWARDS)
    assert "rembg" not in fake.FORWARDS
    assert fake.FORWARDS["decode"] == 1
    call = fake.CALLS[-1][1]
    assert (call["texture_size"], call["decimation_target"], call["remesh"]) == (
        512,
        100_000,
        False,
    )
    assert call["grid_size"] == state["effective_resolution"]
    assert again["mesh_stats"]["texture_size"] == 512
    assert np.allclose(again["mesh_arrays"][0], state["mesh_arrays"][0])
    # A re-export can itself be re-exported: its folder gets the latents too.
    second = tmp_path / "job2"
    second.mkdir()
    engine.save_cache(again, second)
    reloaded = engine.load_cache(second)
    assert np.array_equal(
        reloaded["cached_latents"]["tex_slat_feats"], state["tex_slat"].feats.float().numpy()
    )


def test_reexport_without_cache_is_a_clear_error(engine, tmp_path):
    with pytest.raises(BackendError) as err:
        engine.load_cache(tmp_path)
    assert err.value.code is ErrorCode.NOT_FOUND


@pytest.mark.parametrize("fmt", ["glb", "ply"])
def test_texturing_keeps_the_mesh_in_place(engine, fake, tmp_path, fmt):
    box = trimesh.creation.box(extents=(2.0, 0.5, 1.0))
    box.apply_translation((10.0, -3.0, 4.0))
    state = new_state(tmp_path)
    state["mesh_bytes"] = box.export(file_type=fmt)
    state["mesh_format"] = fmt
    params = parse_params({"preset": "balanced", "texture_size": 256})
    recorder = run(engine, params, state, kind="texture")
    out = trimesh.load(state["glb_path"], force="mesh")
    assert np.allclose(out.bounds, box.bounds, atol=1e-4)
    assert glb_json(state["glb_path"])["images"][0]["mimeType"] == "image/png"
    assert recorder.totals()["tex_sample"] == 12
    engine.release_gpu()
    assert on_device(engine) == []


def test_texturing_keeps_the_uvs_the_mesh_has(engine, fake, tmp_path):
    box = trimesh.creation.box(extents=(2.0, 0.5, 1.0))
    uv = np.random.default_rng(3).random((len(box.vertices), 2))
    state = new_state(tmp_path)
    state["mesh_bytes"] = meshes.write_glb(box.vertices, box.faces, uv)
    state["mesh_format"] = "glb"
    run(engine, parse_params({"preset": "balanced", "texture_size": 256}), state, kind="texture")
    out = trimesh.load(state["glb_path"], force="mesh", process=False)
    assert np.allclose(out.vertices, box.vertices, atol=1e-4)
    assert np.allclose(out.visual.uv, uv, atol=1e-6)  # baked into the input's own layout


def test_the_glb_says_when_its_base_colour_is_see_through(engine, tmp_path):
    from trimesh.visual.material import PBRMaterial
    from trimesh.visual.texture import TextureVisuals

    glb = trimesh.creation.box()
    texture = Image.new("RGBA", (64, 64), (90, 90, 90, 0))  # alpha 0 everywhere: a cut-out
    glb.visual = TextureVisuals(
        uv=np.random.default_rng(0).random((len(glb.vertices), 2)),
        material=PBRMaterial(baseColorTexture=texture, alphaMode="OPAQUE"),  # as upstream
    )
    state = {"output_path": tmp_path / "out.glb"}
    engine._write_glb(glb, state, 64)
    (material,) = glb_json(state["glb_path"])["materials"]
    assert (material["alphaMode"], material["alphaCutoff"]) == ("MASK", 0.5)


def test_texturing_rejects_a_mesh_without_triangles(engine, fake, tmp_path):
    state = new_state(tmp_path)
    state["mesh_bytes"] = b"not a mesh"
    state["mesh_format"] = "glb"
    with pytest.raises(BackendError) as err:
        run(engine, parse_params({}), state, kind="texture", names={"tex_prepare"})
    assert err.value.code is ErrorCode.BAD_MESH_INPUT


# -- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["shape_slat_decoder", "sparse_structure_flow_model"])
def test_a_missing_parameter_fails_the_load(fake, tmp_path, model):
    import fake_weights

    root = fake_weights.make_weights_dir(tmp_path / "w", mismatch=model, texturing=False)
    with pytest.raises(BackendError) as err:
        make_engine(root)
    assert err.value.code is ErrorCode.WEIGHTS_MISMATCH
    assert model in err.value.message and "parameters missing" in err.value.message


def test_computed_buffers_and_unused_keys_are_tolerated_and_reported(fake, tmp_path):
    """Upstream loads with strict=False: a file without the buffers a model computes itself
    (rope_phases) and with keys the model does not use loads fine, and we say so."""
    import fake_weights
    from fake_weights import load_file, save_file

    root = fake_weights.make_weights_dir(tmp_path / "w", texturing=False)
    ss = root / fake_weights.MODELS["sparse_structure_flow_model"][0]
    tensors = load_file(ss.with_suffix(".safetensors"))
    assert "rope_phases" not in tensors  # as in the weights we test with
    tensors["legacy.extra.weight"] = torch.zeros(2)
    save_file(tensors, ss.with_suffix(".safetensors"))
    engine = make_engine(root)
    tolerated = engine.describe()["weights_tolerated"]["sparse_structure_flow_model"]
    assert tolerated == {"missing_buffers": ["rope_phases"], "unexpected": ["legacy.extra.weight"]}


def test_missing_checkpoint_and_missing_folder_are_engine_unavailable(fake, tmp_path):
    import fake_weights

    root = fake_weights.make_weights_dir(tmp_path / "w", skip=("tex_slat_decoder",))
    with pytest.raises(BackendError) as err:
        make_engine(root)
    assert (
        err.value.code is ErrorCode.ENGINE_UNAVAILABLE and "tex_slat_decoder" in err.value.message
    )
    with pytest.raises(BackendError) as err:
        make_engine(tmp_path / "nowhere")
    assert err.value.code is ErrorCode.ENGINE_UNAVAILABLE
    from backend.engines.trellis2 import Trellis2Engine

    with pytest.raises(BackendError) as err:
        Trellis2Engine().load()
    assert "TRELLIS2_WEIGHTS" in err.value.hint


def test_missing_dinov3_says_where_to_put_it(fake, tmp_path):
    import fake_weights

    root = fake_weights.make_weights_dir(tmp_path / "w", aux=False, texturing=False)
    with pytest.raises(BackendError) as err:
        make_engine(root)
    assert err.value.code is ErrorCode.ENGINE_UNAVAILABLE
    assert "TRELLIS2_DINOV3" in err.value.hint


XFORMERS_STUB = """
import torch.nn.functional as F


def memory_efficient_attention(q, k, v, attn_bias=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
"""


def _stub_package(root, name: str, ops_source: str) -> None:
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "ops.py").write_text(ops_source)


def _probe(flash: bool, xformers: bool):
    return lambda: {
        "flash_attn": flash,
        "xformers": xformers,
        "compute_capability": (8, 6),
        "gpu_name": "x",
    }


def test_attention_backend_is_set_before_trellis2_is_imported(fake, weights, monkeypatch, tmp_path):
    import fake_control

    _purge_fake_modules()
    _stub_package(tmp_path, "xformers", XFORMERS_STUB)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(attention, "detect", _probe(flash=False, xformers=True))
    engine = make_engine(weights, attention="auto")
    assert fake_control.IMPORT_ENV["ATTN_BACKEND"] == "sdpa"  # dense: native upstream choice
    assert fake_control.IMPORT_ENV["SPARSE_ATTN_BACKEND"] == "xformers"
    assert fake_control.IMPORT_ENV["SPARSE_CONV_BACKEND"] == "flex_gemm"
    assert fake_control.IMPORT_ENV["HF_HUB_OFFLINE"] == "1"
    assert engine.describe()["attention_backend"] == "xformers"
    run(
        engine,
        parse_params({"preset": "fast"}),
        new_state(tmp_path),
        names={"conditioning", "sparse_structure", "shape"},
    )
    assert fake_control.FORWARDS.get("sparse_attention_xformers", 0) > 0
    sys.modules.pop("xformers.ops", None)
    sys.modules.pop("xformers", None)


def test_sparse_attention_runs_without_flash_attn_or_xformers(fake, weights, tmp_path):
    """Upstream's sparse attention accepts only flash_attn/xformers; neither is installed
    here, and the SDPA fallback is routed in where upstream calls flash_attn."""
    import fake_control

    _purge_fake_modules()
    engine = make_engine(weights, attention="auto")
    assert engine.describe()["attention_backend"] == "sdpa"
    assert fake_control.IMPORT_ENV["SPARSE_ATTN_BACKEND"] == "flash_attn"
    state = new_state(tmp_path)
    run(engine, parse_params({"preset": "fast"}), state)
    assert fake_control.FORWARDS.get("sparse_attention_flash_attn", 0) > 0
    assert Path(state["glb_path"]).is_file()


def test_an_attention_package_without_working_operators_is_not_used(monkeypatch, tmp_path):
    """Imports fine, fails at the first call: what a wheel built for another torch does."""
    _stub_package(
        tmp_path,
        "xformers",
        "class fmha:\n"
        "    class BlockDiagonalMask:\n"
        "        from_seqlens = staticmethod(lambda *a: None)\n"
        "def memory_efficient_attention(*a, **k):\n"
        '    raise NotImplementedError("xFormers wasn\'t build with CUDA support")\n',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        reason = attention.usable("xformers", device="cpu")
        assert reason is not None and "CUDA support" in reason
        assert attention.usable("sdpa") is None
    finally:
        sys.modules.pop("xformers.ops", None)
        sys.modules.pop("xformers", None)


def test_a_broken_attention_package_falls_back_to_sdpa(fake, weights, monkeypatch, tmp_path):
    _purge_fake_modules()
    _stub_package(tmp_path, "xformers", "raise ImportError('built for another torch')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(attention, "detect", _probe(flash=False, xformers=True))
    engine = make_engine(weights, attention="auto")
    info = engine.describe()
    assert info["attention_backend"] == "sdpa"
    assert "xformers" in info["attention_note"] and "another torch" in info["attention_note"]
    sys.modules.pop("xformers", None)


@pytest.mark.parametrize(
    "flash,xformers,capability,expected",
    [
        (True, True, (9, 0), "flash_attn"),
        (True, False, (8, 0), "flash_attn"),
        (True, True, (7, 5), "xformers"),  # Turing: flash-attn 2 has no kernels
        (False, True, (8, 6), "xformers"),
        (True, True, None, "xformers"),
        (False, True, None, "xformers"),
        (True, False, (7, 0), "sdpa"),
        (False, False, (9, 0), "sdpa"),
    ],
)
def test_choose_attention_backend(flash, xformers, capability, expected):
    assert attention.choose_attention_backend(flash, xformers, capability) == expected


def test_apply_sets_both_variables_and_refuses_others(monkeypatch):
    import os

    for name in ("ATTN_BACKEND", "SPARSE_ATTN_BACKEND", "SPARSE_CONV_BACKEND"):
        monkeypatch.setenv(name, "spconv")
    attention.apply("xformers")
    assert os.environ["ATTN_BACKEND"] == "sdpa"
    assert os.environ["SPARSE_ATTN_BACKEND"] == "xformers"
    assert os.environ["SPARSE_CONV_BACKEND"] == "flex_gemm"
    attention.apply("sdpa")  # upstream's flash_attn branch, routed to the fallback
    assert os.environ["SPARSE_ATTN_BACKEND"] == "flash_attn"
    with pytest.raises(BackendError):
        attention.apply("spconv")


def test_safetensors_header_reader_detects_truncation(fake, tmp_path):
    import fake_weights

    from backend.engines.weights import read_safetensors_header

    path = tmp_path / "m.safetensors"
    fake_weights.save_file({"a": torch.ones(64)}, path)
    assert "a" in read_safetensors_header(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError):
        read_safetensors_header(path)
    buf = io.BytesIO()
    buf.write(struct.pack("<Q", 10**12))
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError):
        read_safetensors_header(path)


# -- through the hardened runner ---------------------------------------------------------------

RESUME_AFTER_OOM = {
    # failed stage: (the level the ladder picks for "balanced", the stage it resumes from)
    # resolution 768 (levels 2 and 4 change only the export's remesh)
    "shape": (5, "shape"),
    "texture": (5, "shape"),
    "decode": (5, "shape"),
    "export": (2, "export"),  # remesh band 0.5
}
# Nothing the ladder holds lowers these stages' memory in the real code (the input size,
# steps and guidance do not): an OOM there fails at once, clearly, with no lowered retry.
NO_USEFUL_LEVEL = ("conditioning", "sparse_structure")


@pytest.mark.parametrize("stage", NO_USEFUL_LEVEL)
def test_an_oom_no_level_can_help_fails_without_lowering_quality(engine, fake, tmp_path, stage):
    from backend.pipeline.runner import Runner, RunnerConfig
    from backend.store.jobs import JobStore
    from backend.store.stats import StatsLog

    store = JobStore(tmp_path / "out")
    runner = Runner(
        engine, store, StatsLog(tmp_path / "s.jsonl"), config=RunnerConfig(min_free_disk=1 << 20)
    )
    image = io.BytesIO()
    subject_image(size=128).save(image, format="PNG")
    params = parse_params({"preset": "balanced", "texture_size": 256}).to_dict()
    record = store.create("generate", "trellis2", params, image=image.getvalue())
    fake.FAIL.append({"where": stage, "kind": "oom", "times": 1})
    events: list[tuple[str, dict]] = []
    result = runner.run(record, emit=lambda kind, content: events.append((kind, content)))
    assert result.outcome == "failed" and result.error["code"] == "out_of_memory"
    assert stage in result.error["message"]
    assert [k for k, _ in events].count("job_retry") == 0
    assert len(result.attempts) == 1
    assert on_device(engine) == []


@pytest.mark.parametrize("stage", list(RESUME_AFTER_OOM))
def test_runner_resumes_trellis2_after_oom_at_each_stage(engine, fake, tmp_path, stage):
    from backend.pipeline.runner import Runner, RunnerConfig
    from backend.store.jobs import JobStore
    from backend.store.stats import StatsLog

    level, resume = RESUME_AFTER_OOM[stage]
    store = JobStore(tmp_path / "out")
    runner = Runner(
        engine,
        store,
        StatsLog(tmp_path / "stats.jsonl"),
        config=RunnerConfig(min_free_disk=1 << 20),
    )
    image = io.BytesIO()
    subject_image(size=128).save(image, format="PNG")
    params = parse_params({"preset": "balanced", "texture_size": 256}).to_dict()
    record = store.create("generate", "trellis2", params, image=image.getvalue())
    fake.FAIL.append(
        {"where": stage, "kind": "cumesh_oom" if stage == "export" else "oom", "times": 1}
    )
    forwards: list[dict] = []
    events: list[tuple[str, dict]] = []

    def emit(kind, content):
        events.append((kind, content))
        if kind == "job_retry":
            forwards.append(dict(fake.FORWARDS))

    result = runner.run(record, emit=emit)
    assert result.outcome == "done", result.error
    assert result.level == level
    retries = [c for k, c in events if k == "job_retry"]
    assert len(retries) == 1 and retries[0]["resume_stage"] == resume
    assert retries[0]["failed_stage"] == stage
    order = [s.name for s in engine.stages]
    counter = {"conditioning": "dinov3_512"}
    for done in order[: order.index(resume)]:  # kept, not recomputed
        name = counter.get(done, done)
        assert fake.FORWARDS.get(name, 0) == forwards[0].get(name, 0), f"{done} ran again"
    assert on_device(engine) == []  # release_gpu ran after the OOM and after the job
    glb = store.folder(record.id) / "result.glb"
    assert glb.is_file()
    meta = glb_json(glb)
    assert {img["mimeType"] for img in meta["images"]} == {"image/png"}
    assert "EXT_texture_webp" not in meta.get("extensionsUsed", [])
    exports = [call for name, call in fake.CALLS if name == "to_glb"]
    bands = [call["remesh_band"] for call in exports]
    # every level from 2 on narrows the remesh band, and the lowered export runs with it
    assert bands[-1] == 0.5 and all(band == 1.0 for band in bands[:-1])


def test_after_an_oom_a_cascade_with_no_fewer_tokens_is_not_tried(
    engine, fake, tmp_path, monkeypatch
):
    """Level 5 (the 768 cascade) lowers memory only where it has fewer tokens than 1024, which
    no object measured on the real code had (GPU run 11: 16,059 at 768 against 10,282). With
    the shape's counts known, an OOM in decode passes it over (reported as skipped) and goes
    to 512, instead of retrying at a level that needs more memory."""
    from backend.engines import trellis2

    runner, record = _predicting_runner(engine, tmp_path, monkeypatch, 80, preset="balanced")
    monkeypatch.setattr(trellis2, "cascade_token_counts", lambda *a: {1024: 10_282, 768: 16_059})
    fake.FAIL.append({"where": "decode", "kind": "oom", "times": 1})
    events: list[tuple[str, dict]] = []
    result = runner.run(record, emit=lambda kind, content: events.append((kind, content)))
    assert result.outcome == "done", result.error
    retry = [c for k, c in events if k == "job_retry"]
    assert len(retry) == 1 and retry[0]["failed_stage"] == "decode"
    assert result.level == 6 and result.params["resolution"] == 512
    assert 5 in retry[0]["skipped_levels"]


def test_runner_cancel_mid_shape_leaves_no_model_on_the_device(engine, fake, tmp_path):
    from backend.pipeline.runner import Runner, RunnerConfig
    from backend.store.jobs import JobStore
    from backend.store.stats import StatsLog

    store = JobStore(tmp_path / "out")
    runner = Runner(
        engine,
        store,
        StatsLog(tmp_path / "stats.jsonl"),
        config=RunnerConfig(min_free_disk=1 << 20),
    )
    image = io.BytesIO()
    subject_image(size=128).save(image, format="PNG")
    record = store.create(
        "generate", "trellis2", parse_params({}).to_dict(), image=image.getvalue()
    )
    result = runner.run(record, cancelled=lambda: fake.FORWARDS.get("shape", 0) >= 3)
    assert result.outcome == "cancelled"
    assert store.get(record.id).state.value == "cancelled"
    assert on_device(engine) == []
    assert not (store.folder(record.id) / "result.glb").exists()


# What upstream's cascade counted for the `high:mid` object of GPU run 9 (2,627 voxels): every
# resolution from 1536 to 1152 above the 32k budget, 1024 far below the squared-resolution law.
RUN9_COUNTS = {1536: 45_100, 1408: 40_200, 1280: 36_900, 1152: 33_300, 1024: 10_282, 768: 14_000}


def _predicting_runner(engine, tmp_path, monkeypatch, available_gib, preset="high"):
    from backend.pipeline import gpu
    from backend.pipeline.runner import Runner, RunnerConfig
    from backend.store.jobs import JobStore
    from backend.store.stats import StatsLog

    store = JobStore(tmp_path / "out")
    runner = Runner(
        engine, store, StatsLog(tmp_path / "s.jsonl"), config=RunnerConfig(min_free_disk=1 << 20)
    )
    image = io.BytesIO()
    subject_image(size=128).save(image, format="PNG")
    record = store.create(
        "generate", "trellis2", parse_params({"preset": preset}).to_dict(), image=image.getvalue()
    )
    monkeypatch.setattr(gpu, "vram", lambda init=True: {"available": available_gib * 2**30})
    return runner, record


def test_the_runner_lowers_a_cascade_once_the_shape_counted_its_tokens(
    engine, fake, tmp_path, monkeypatch
):
    """Prediction instead of retry, from exact counts: the shape stage counts the cascade's
    tokens at every resolution once its low-resolution pass is upsampled and, before the
    high-resolution sampling, the runner lowers the job to the best level those counts fit.
    On a 12 GB card that is level 1 (token budget 32k: the cascade settles at 1024 with
    10,282 tokens); the structure's estimate (~26,600 tokens at 1152) chose level 3."""
    from backend.engines import trellis2
    from backend.pipeline import memmodel

    runner, record = _predicting_runner(engine, tmp_path, monkeypatch, 12)
    ran: list[str] = []
    original = engine.run_stage

    hr_forwards: list[int] = []
    hr_before_shape: list[int] = []

    def run_stage(stage, state, params, ctx):
        ran.append(stage)
        if stage == "shape":
            hr_before_shape.append(len(hr_forwards))
        original(stage, state, params, ctx)
        if stage == "sparse_structure":
            state["structure"] = {"voxels": 2_627}

    monkeypatch.setattr(engine, "run_stage", run_stage)
    monkeypatch.setattr(trellis2, "cascade_token_counts", lambda *a: dict(RUN9_COUNTS))
    hr_model = engine.pipeline.models["shape_slat_flow_model_1024"]
    hr_forward = hr_model.forward
    monkeypatch.setattr(
        hr_model, "forward", lambda *a, **k: (hr_forwards.append(1), hr_forward(*a, **k))[1]
    )
    events: list[tuple[str, dict]] = []
    result = runner.run(record, emit=lambda kind, content: events.append((kind, content)))

    assert result.outcome == "done", result.error
    assert [a["outcome"] for a in result.attempts] == ["predicted_oom", "ok"]
    first = result.attempts[0]
    assert first["stage"] == "shape" and first["predicted_within"] is True
    retry = [c for k, c in events if k == "job_retry"]
    assert len(retry) == 1 and retry[0]["reason"] == "predicted_out_of_memory"
    assert retry[0]["failed_stage"] == retry[0]["resume_stage"] == "shape"
    assert result.level == 1 and result.params["max_num_tokens"] == 32_768
    assert result.params["remesh_band"] == 1.0
    assert "during shape, once its tokens were counted" in result.degraded_reason
    assert ran.count("sparse_structure") == 1 and ran.count("shape") == 2
    # the first attempt stopped before the high-resolution model ran; the second ran it
    assert hr_before_shape == [0, 0] and hr_forwards
    # the estimate alone would have lowered further
    estimate = memmodel.plan(
        parse_params({"preset": "high"}),
        0,
        1,
        engine.stages,
        engine.capabilities,
        memmodel.Facts(voxels=2_627),
        12 * 2**30,
    )
    assert estimate is not None and estimate.level > result.level


def test_a_cascade_that_fits_by_its_counts_is_not_lowered(engine, fake, tmp_path, monkeypatch):
    """The structure's estimate no longer lowers a cascade: on a card where the counted
    tokens fit, the job runs as requested in one attempt, and the counts are recorded."""
    from backend.engines import trellis2

    runner, record = _predicting_runner(engine, tmp_path, monkeypatch, 80, preset="balanced")
    monkeypatch.setattr(trellis2, "cascade_token_counts", lambda *a: {1024: 9_680, 768: 12_000})
    result = runner.run(record)
    assert result.outcome == "done", result.error
    assert [a["outcome"] for a in result.attempts] == ["ok"] and result.level == 0
    assert result.mesh_stats["structure"]["cascade_tokens"] == {1024: 9_680, 768: 12_000}


def test_the_counts_are_the_ones_upstreams_cascade_loop_chooses_from(engine, fake):
    """`cascade_token_counts` counts as upstream's loop does (the fake copies that loop): the
    resolution the cascade settles on for a budget, and its token count, are what the memory
    model derives from the counts."""
    import torch

    from backend.engines.trellis2 import cascade_token_counts
    from backend.pipeline import memmodel

    pipe = engine.pipeline
    generator = torch.Generator().manual_seed(3)
    lr = torch.randint(0, 64, (3_000, 3), generator=generator)
    coords = torch.cat([torch.zeros(3_000, 1, dtype=torch.int64), lr], 1).unique(dim=0).int()
    decoder = pipe.models["shape_slat_decoder"]
    hr_coords = decoder.upsample(type("S", (), {"coords": coords})(), upsample_times=4)
    counts = cascade_token_counts(hr_coords, 512, 1536)
    assert sorted(counts) == [768, 1024, 1152, 1280, 1408, 1536]
    for budget in sorted({*counts.values(), 1 << 30}):
        settled = memmodel.cascade_resolution(1536, counts.get, budget)
        res = 1536
        while True:  # upstream's loop, as the fake has it
            quant = torch.cat(
                [hr_coords[:, :1], ((hr_coords[:, 1:] + 0.5) / 512 * (res // 16)).int()], 1
            )
            n = quant.unique(dim=0).shape[0]
            if n < budget or res == 1024:
                break
            res -= 128
        assert (settled, counts[settled]) == (res, n), budget
