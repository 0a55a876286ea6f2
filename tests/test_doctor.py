"""`doctor` on a bare machine, a partial install and the fake TRELLIS.2 install."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend import doctor
from backend.engines import attention, upstream
from backend.engines import trellis2 as adapter
from backend.engines import weights as layout

ROOT = Path(__file__).resolve().parent.parent
FAKE = Path(__file__).resolve().parent / "fake_trellis"
_FAKE_MODULES = ("trellis2", "o_voxel", "cumesh", "flex_gemm", "nvdiffrast")


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _FAKE_MODULES:
            del sys.modules[name]


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # run_doctor may add the checkout
    for name in (
        "TRELLIS2_WEIGHTS",
        "TRELLIS2_DINOV3",
        "TRELLIS2_REMBG",
        "TRELLIS2_CHECKOUT",
        "ATTN_BACKEND",
        "SPARSE_ATTN_BACKEND",
        "SPARSE_CONV_BACKEND",
    ):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    _purge()
    yield
    _purge()


def checks(report) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_bare_machine_reports_every_missing_piece_with_a_fix(tmp_path):
    # -S: no site-packages at all (no torch, numpy, PIL, trellis2 ...), like a fresh Python.
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "from backend.doctor import run_doctor, format_report;"
        "r = run_doctor(); print(json.dumps(r)); sys.stderr.write(format_report(r))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRELLIS2_", "PYTHON"))}
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code, str(ROOT)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    found = checks(report)
    assert report["ok"] is False
    for name in (
        "torch",
        "transformers",
        "trellis2",
        "o_voxel",
        "cumesh",
        "flex_gemm",
        "nvdiffrast",
        "gpu",
        "attention",
        "weights",
        "signatures",
    ):
        assert found[name]["ok"] is False, name
        assert found[name]["hint"], f"{name} has no fix hint"
    assert "transformers>=4.56,<5" in found["transformers"]["hint"]
    assert "TRELLIS2_WEIGHTS" in found["weights"]["hint"]
    assert found["python"]["ok"] and found["disk"]["ok"]
    assert report["attention_backend"] is None
    assert "fix:" in proc.stderr and "problem(s) found" in proc.stderr


def test_partial_install_names_what_is_missing(tmp_path, clean):
    pytest.importorskip("torch")
    checkout = tmp_path / "TRELLIS.2"
    (checkout / "trellis2").mkdir(parents=True)
    # Like the real package: importing it needs the CUDA extensions.
    (checkout / "trellis2" / "__init__.py").write_text("import cumesh\n")
    weights = tmp_path / "weights"
    (weights / "ckpts").mkdir(parents=True)
    models = {name: f"ckpts/{name}" for name in layout.MODEL_NAMES}
    (weights / "pipeline.json").write_text(json.dumps({"args": {"models": models}}))
    (weights / "ckpts" / "tex_slat_decoder.json").write_text("{}")
    (weights / "ckpts" / "tex_slat_decoder.safetensors").write_bytes(b"\x10" + b"\x00" * 7)

    report = doctor.run_doctor(
        weights_dir=str(weights), trellis_checkout=str(checkout), output_dir=str(tmp_path)
    )
    found = checks(report)
    assert found["trellis2"]["ok"] and str(checkout) in found["trellis2"]["detail"]
    assert not found["cumesh"]["ok"] and "CuMesh" in found["cumesh"]["hint"]
    assert not found["signatures"]["ok"] and "cumesh" in found["signatures"]["detail"]
    assert all(not s["ok"] for s in report["signatures"])
    assert not found["weights"]["ok"] and not report["weights"]["complete"]
    assert "missing" in found["weights"]["detail"]
    assert not found["dinov3"]["ok"] and "TRELLIS2_DINOV3" in found["dinov3"]["hint"]
    assert found["background removal"]["ok"]  # optional: RGBA inputs still work
    assert "transparency" in found["background removal"]["detail"]
    json.dumps(report)
    text = doctor.format_report(report)
    assert "FAIL" in text and "fix:" in text


@pytest.fixture
def fake_install(clean, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(FAKE))
    import fake_weights

    root = fake_weights.make_weights_dir(tmp_path / "weights")
    _purge()
    monkeypatch.setattr(
        attention,
        "detect",
        lambda: {
            "flash_attn": True,
            "xformers": False,
            "compute_capability": (8, 6),
            "gpu_name": "fake",
        },
    )
    monkeypatch.setattr(attention, "usable", lambda backend: None)  # as if flash-attn imports
    return root


def test_fake_install_passes_package_weights_and_signature_checks(fake_install, tmp_path, capsys):
    report = doctor.run_doctor(weights_dir=str(fake_install), output_dir=str(tmp_path))
    assert "[ATTENTION]" not in capsys.readouterr().out  # stdout stays clean for --json
    found = checks(report)
    for name in (
        "trellis2",
        "o_voxel",
        "cumesh",
        "flex_gemm",
        "nvdiffrast",
        "attention",
        "weights",
        "texturing weights",
        "dinov3",
        "background removal",
        "signatures",
    ):
        assert found[name]["ok"], (name, found[name])
    assert report["attention_backend"] == "flash_attn"
    assert report["weights"]["complete"] and len(report["weights"]["files"]) == 9
    assert all(entry["bytes"] > 0 for entry in report["weights"]["files"].values())
    assert len(report["signatures"]) == len(upstream.UPSTREAM_CALLS)
    assert all(s["ok"] for s in report["signatures"])
    assert report["gpu"]["available"] is False and not found["gpu"]["ok"]  # CPU-only torch


def test_signature_drift_is_reported(fake_install, tmp_path, monkeypatch):
    from trellis2.pipelines.trellis2_image_to_3d import Trellis2ImageTo3DPipeline

    def older(
        self,
        lr_cond,
        cond,
        flow_model_lr,
        flow_model,
        lr_resolution,
        resolution,
        coords,
        sampler_params=None,
    ):  # an upstream revision without max_num_tokens
        raise AssertionError("never called")

    monkeypatch.setattr(Trellis2ImageTo3DPipeline, "sample_shape_slat_cascade", older)
    report = doctor.run_doctor(weights_dir=str(fake_install), output_dir=str(tmp_path))
    found = checks(report)
    assert not found["signatures"]["ok"]
    assert "sample_shape_slat_cascade" in found["signatures"]["detail"]
    bad = [s["target"] for s in report["signatures"] if not s["ok"]]
    assert bad == [f"{upstream._P}.Trellis2ImageTo3DPipeline.sample_shape_slat_cascade"]


def test_damaged_checkpoint_is_reported(fake_install, tmp_path):
    stem = layout.resolve_model_path(fake_install, "ckpts/tex_dec_next_dc_f16c32_fp16")
    tensors = stem.with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-16])
    found = checks(doctor.run_doctor(weights_dir=str(fake_install), output_dir=str(tmp_path)))
    assert not found["weights"]["ok"] and "truncated" in found["weights"]["detail"]


def _call_sites() -> dict[str, set[str]]:
    """Method name -> keyword names at every call site in the adapter's source."""
    tree = ast.parse(Path(adapter.__file__).read_text())
    names = {c.qualname.split(".")[-1] for c in upstream.UPSTREAM_CALLS}
    sites: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in names
            and node.func.attr not in ("to", "__init__")
        ):
            assert not node.args, f"{node.func.attr} called positionally (line {node.lineno})"
            sites.setdefault(node.func.attr, set()).update(k.arg for k in node.keywords)
    return sites


def test_signature_table_matches_the_adapters_call_sites():
    table: dict[str, set[str]] = {}
    for call in upstream.UPSTREAM_CALLS:
        table.setdefault(call.qualname.split(".")[-1], set()).update(call.args)
    sites = _call_sites()
    for method, keywords in sites.items():
        assert keywords <= table[method], (method, keywords - table[method])
    for must in (
        "get_cond",
        "sample_sparse_structure",
        "sample_shape_slat_cascade",
        "sample_tex_slat",
        "decode_latent",
        "to_glb",
        "encode_shape_slat",
        "postprocess_mesh",
    ):
        assert must in sites


def test_attention_without_flash_attn_or_xformers_is_the_sdpa_fallback(clean, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(
        attention,
        "detect",
        lambda: {"flash_attn": False, "xformers": False, "compute_capability": (9, 0)},
    )
    report = {"versions": {}}
    (check,) = doctor._attention(report)
    assert check["ok"] and "fallback" in check["detail"]
    assert report["attention_backend"] == "sdpa"
