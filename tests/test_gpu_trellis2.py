"""The real TRELLIS.2 code under our backend, on the GPU (`pytest -m gpu`; `scripts/gpu_test.sh`).

Needs CUDA, upstream TRELLIS.2 with its extensions, and a weights folder (random weights from
`scripts/gpu/make_weights.py`): TRELLIS2_CHECKOUT and TRELLIS2_WEIGHTS name them. The backend
runs as the add-on runs it: `python -m backend serve --engine trellis2` under the supervisor,
driven through the client. Figures and GLBs go to $GPU_RESULTS; GPU_DEADLINE (epoch seconds)
makes tests that would not finish in time skip instead of being killed half-way.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("zmq")

from backend.checks import glbcheck, meshcheck  # noqa: E402
from backend.supervision.supervisor import (  # noqa: E402
    BackendSpec,
    RespawnPolicy,
    Supervisor,
    SupervisorEvent,
)

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = os.environ.get("TRELLIS2_WEIGHTS")
CHECKOUT = os.environ.get("TRELLIS2_CHECKOUT")
RESULTS = Path(os.environ.get("GPU_RESULTS") or ROOT / "gpu_out")
DEADLINE = float(os.environ.get("GPU_DEADLINE") or 0)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not (WEIGHTS and CHECKOUT), reason="needs TRELLIS2_WEIGHTS and _CHECKOUT"),
]

IMAGE = ROOT / "examples" / "robot.png"  # RGBA: no background removal needed
# What each preset may take on the H200 with the harness's occupancy (GPU run 6: fast 82 s
# on first use, balanced 83 s, high 152 s, game-asset more than 250 s).
# Wall time a job may need on an H200 (measured at level 0: high 156 s in run 8,
# game-asset 302 s in run 9).
PRESET_SECONDS = {"fast": 150, "balanced": 150, "high": 220, "game-asset": 330}


def need(seconds: float, sup: Supervisor | None = None) -> None:
    if DEADLINE and time.time() + seconds > DEADLINE:
        pytest.skip(f"not enough time left in this device call ({seconds:.0f} s needed)")
    if sup is not None:
        sup.wait_ready(timeout=300)  # a respawn from an earlier test must not fail this one


def record(name: str, data: dict) -> None:
    """Append one result to $GPU_RESULTS/results.json (kept across tests of one run)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[name] = data
    path.write_text(json.dumps(results, indent=1, default=str))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trellis2")


def serving(folder: Path, **engine_options: str):
    """A supervised backend on the real engine (the add-on's path), and what it said."""
    spec = BackendSpec(
        output_dir=folder / "out",
        connection_file=folder / "run" / "backend.json",
        engine="trellis2",
        engine_options={"weights_dir": WEIGHTS, "trellis_checkout": CHECKOUT, **engine_options},
        extra_pythonpath=[str(ROOT)],
        min_free_disk_mb=1,
    )
    policy = RespawnPolicy(after_failure=False, start_timeout=600, job_watchdog=1200)
    supervisor = Supervisor(spec, policy)
    seen: list[str] = []
    ids: set[int] = set()
    tick = supervisor.tick

    def recording_tick():  # wait_for_job hands events back to the next tick: note each once
        events = tick()
        for event in events:
            if isinstance(event, SupervisorEvent) and id(event) not in ids:
                ids.add(id(event))
                seen.append(f"{event.kind}: {event.reason}")
        return events

    supervisor.tick = recording_tick
    return supervisor, seen


def record_logs(folder: Path, seen: list[str], prefix: str = "") -> None:
    # What the backends said, for the run's record (docs/gpu_runs/).
    logs = sorted((folder / "out" / "logs").glob("*.log"))
    record(
        prefix + "backend_logs", {log.name: log.read_text(errors="replace")[-6000:] for log in logs}
    )
    record(prefix + "supervisor_events", seen)


@pytest.fixture(scope="module")
def sup(work):
    supervisor, seen = serving(work)
    began = time.time()
    supervisor.start_and_wait(timeout=600)
    record("time_to_ready_s", {"seconds": round(time.time() - began, 1)})
    yield supervisor
    supervisor.stop()
    record_logs(work, seen)


def job_files(sup: Supervisor, job_id: str) -> tuple[dict, dict]:
    folder = sup.spec.output_dir / "jobs" / job_id
    return (
        json.loads((folder / "job.json").read_text()),
        json.loads((folder / "stats.json").read_text()),
    )


def check_glb(path: Path) -> dict:
    """Our own mesh and GLB validation, as the runner applies it, plus the figures."""
    import trimesh

    report = glbcheck.validate_glb_file(path)
    scene = trimesh.load(path, force="scene")
    mesh = trimesh.util.concatenate(list(scene.dump()))
    warnings = meshcheck.validate_mesh(mesh.vertices, mesh.faces)
    return {
        "bytes": path.stat().st_size,
        "vertices": len(mesh.vertices),
        "faces": len(mesh.faces),
        "bounds": mesh.bounds.round(4).tolist(),
        "glb_warnings": report.get("warnings", []),
        "mesh_warnings": warnings,
    }


def keep_glb(path: Path, name: str) -> None:
    """GLBs for the Khronos validator (run on the device and again on the CPU machine)."""
    folder = RESULTS / "glb"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, folder / f"{name}.glb")


def summary(job: dict, stats: dict) -> dict:
    attempts = stats.get("attempts") or []
    return {
        "state": job["state"],
        "level": job.get("level"),
        "attempts": len(attempts),
        "final_params": job.get("final_params"),
        "seconds": stats.get("seconds"),
        "stage_seconds": attempts[-1]["stage_seconds"] if attempts else None,
        "stage_vram_peaks": attempts[-1].get("stage_vram_peaks") if attempts else None,
        "vram_peak": max((a.get("vram_peak") or 0) for a in attempts) if attempts else None,
        "mesh_stats": stats.get("mesh_stats"),
    }


def test_the_backend_serves_the_real_engine(sup):
    status = sup.client.status(timeout=30)
    engine = status["engine"]
    record("status", {"engine": engine, "gpu": status.get("gpu"), "vram": status.get("vram")})
    assert engine["name"] == "trellis2" and engine["loaded"]
    assert engine["attention_backend"] in ("flash_attn", "xformers", "sdpa")
    assert engine["dense_attention"] == "sdpa"
    # The random weights hold no computed buffers, like released files may not: tolerated.
    tolerated = engine["weights_tolerated"]
    assert any(r["missing_buffers"] for r in tolerated.values()), tolerated
    assert engine["background_removal_loaded"] is False


def test_an_opaque_image_without_background_removal_is_refused_clearly(sup):
    buf = io.BytesIO()
    from PIL import Image

    Image.open(IMAGE).convert("RGB").save(buf, format="PNG")
    job_id = sup.submit(buf.getvalue(), {"preset": "fast"})
    job = sup.wait_for_job(job_id, timeout=120)
    record("opaque_image", {"state": job["state"], "error": job.get("error")})
    assert job["state"] == "failed"
    assert job["error"]["code"] == "needs_transparency"
    assert "transparent background" in job["error"]["hint"]


def generate(sup: Supervisor, preset: str, **extra) -> tuple[str, dict]:
    need(PRESET_SECONDS[preset], sup)
    job_id = sup.submit(IMAGE.read_bytes(), {"preset": preset, "seed": 1, **extra})
    outcome = sup.wait_for_job(job_id, timeout=PRESET_SECONDS[preset] + 120)
    assert outcome["state"] == "done", outcome.get("error")
    job, stats = job_files(sup, job_id)
    result = summary(job, stats)
    glb = sup.spec.output_dir / "jobs" / job_id / "result.glb"
    result["glb"] = check_glb(glb)
    keep_glb(glb, preset)
    return job_id, result


FAST_JOB: list[str] = []


def test_fast_preset_gives_a_valid_glb(sup):
    job_id, result = generate(sup, "fast")
    record("preset_fast", result)
    FAST_JOB.append(job_id)
    assert result["level"] == 0
    assert result["final_params"]["resolution"] == 512
    assert result["mesh_stats"]["structure"]["pipeline_type"] == "512"
    assert result["glb"]["faces"] > 0


def test_reexport_runs_only_decode_and_export_from_the_cached_latents(sup):
    if not FAST_JOB:
        pytest.skip("needs the fast job")
    need(120, sup)
    parent = FAST_JOB[0]
    job_id = sup.client.reexport(parent, {"texture_size": 512, "decimation_target": 50_000})
    outcome = sup.wait_for_job(job_id, timeout=240)
    assert outcome["state"] == "done", outcome.get("error")
    job, stats = job_files(sup, job_id)
    result = summary(job, stats)
    result["glb"] = check_glb(sup.spec.output_dir / "jobs" / job_id / "result.glb")
    record("reexport", result)
    assert job["state"] == "done", job.get("error")
    assert set(result["stage_seconds"]) == {"decode", "export"}  # no sampling
    assert result["mesh_stats"]["texture_size"] == 512
    assert result["glb"]["faces"] <= 50_000 * 1.05


def test_cancel_during_sampling_stops_the_job_and_frees_the_gpu(sup):
    need(120, sup)
    before = sup.client.status(timeout=30)["vram"]
    job_id = sup.submit(IMAGE.read_bytes(), {"preset": "balanced", "seed": 3})
    seen = None
    limit = time.time() + 180
    while time.time() < limit and seen is None:
        for event in sup.tick():
            content = getattr(event, "content", {}) or {}
            if (
                getattr(event, "msg_type", "") == "job_progress"
                and content.get("job_id") == job_id
                and content.get("stage") == "shape"
                and content.get("step", 0) >= 2
            ):
                seen = content
            ended = getattr(event, "msg_type", "") in ("job_failed", "job_done")
            if ended and content.get("job_id") == job_id:
                pytest.fail(f"the job ended before it could be cancelled: {content}")
        time.sleep(0.02)
    assert seen is not None, "no shape sampling progress seen"
    sup.cancel(job_id)
    job = sup.wait_for_job(job_id, timeout=60)
    after = sup.client.status(timeout=30)["vram"]
    record(
        "cancel",
        {"at": seen, "state": job["state"], "vram_before": before, "vram_after": after},
    )
    assert job["state"] == "cancelled"
    assert after["allocated"] <= before["allocated"] + 64 * 2**20  # models back on the CPU


def doctor(env_changes: dict, weights: str) -> subprocess.Popen:
    env = dict(os.environ, **env_changes)
    command = [
        sys.executable, "-m", "backend", "doctor", "--json",
        "--weights-dir", weights, "--trellis-checkout", CHECKOUT,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_doctor_reports_the_install_healthy_and_each_breakage_with_its_fix(work):
    """Healthy, and three broken variants side by side: a missing extension wheel,
    transformers 5 (what a plain `pip install transformers` gives today), a missing file."""
    need(120)
    path = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    hidden = {  # the device script keeps these packages in folders of their own
        "cumesh": os.environ.get("GPU_SITE_CUMESH"),
        "transformers": os.environ.get("GPU_SITE_TRANSFORMERS"),
    }
    if not all(hidden.values()):
        pytest.skip("GPU_SITE_CUMESH / GPU_SITE_TRANSFORMERS not set (scripts/gpu_test.sh)")
    broken = work / "weights_missing_file"
    if not broken.exists():
        shutil.copytree(WEIGHTS, broken, symlinks=True, copy_function=os.symlink)
    missing = broken / "ckpts" / "tex_dec_next_dc_f16c32_fp16.safetensors"
    missing.unlink(missing_ok=True)

    def without(folder: str) -> dict:
        return {"PYTHONPATH": os.pathsep.join(p for p in path if p != folder)}

    runs = {
        "healthy": doctor({}, WEIGHTS),
        "missing_wheel": doctor(without(hidden["cumesh"]), WEIGHTS),
        "transformers_5": doctor(without(hidden["transformers"]), WEIGHTS),
        "missing_weight_file": doctor({}, str(broken)),
    }
    reports = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        reports[name] = json.loads(out) if out.strip().startswith("{") else {"stderr": err[-3000:]}
    failed = {
        name: {c["name"]: c for c in report.get("checks", []) if not c["ok"]}
        for name, report in reports.items()
    }
    record("doctor", {"failed_checks": failed, "healthy": reports["healthy"]})
    assert reports["healthy"]["ok"], failed["healthy"]
    assert "cumesh" in failed["missing_wheel"]
    assert "CuMesh" in failed["missing_wheel"]["cumesh"]["hint"]
    assert "transformers" in failed["transformers_5"]
    assert "<5" in failed["transformers_5"]["transformers"]["hint"]
    assert "weights" in failed["missing_weight_file"]
    assert "tex_slat_decoder" in failed["missing_weight_file"]["weights"]["detail"]


PROBES: dict[str, int] = {}


def test_upstream_mesh_voxelisation_runs_in_a_process_of_its_own():
    """The first step of upstream's texturing (encode_shape_slat), alone and as the engine
    calls it (timings off). With `timing=True`, as upstream's texturing pipeline asks, the
    extension dies with SIGSEGV printing the first timing (runs 6 and 7): recorded, not
    asserted, so a fixed build shows up in the results."""
    need(60)
    probe = ROOT / "scripts" / "gpu" / "probe_voxelise.py"
    out = RESULTS / "voxelise_probe.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(probe), "--out", str(out)], check=True, timeout=300)
    probes = json.loads(out.read_text())
    record("dual_grid_probe", probes)
    PROBES["dual_grid"] = probes["timing=False"]["rc"]
    assert probes["timing=False"]["rc"] == 0, probes["timing=False"]["stderr"]


def test_texturing_an_existing_mesh_with_the_real_texturing_pipeline(sup):
    import trimesh

    if PROBES.get("dual_grid") not in (None, 0):
        pytest.skip("upstream's voxelisation crashes on its own (see dual_grid_probe)")
    need(150, sup)
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.8)
    mesh.apply_translation((2.0, 0.0, 1.0))  # placement must survive the round trip
    buf = io.BytesIO()
    mesh.export(buf, file_type="glb")
    job_id = sup.client.texture(
        IMAGE.read_bytes(), buf.getvalue(), "glb", {"preset": "fast", "texture_size": 1024}
    )
    outcome = sup.wait_for_job(job_id, timeout=300)
    record("texture_job", outcome)
    assert outcome["state"] == "done", outcome.get("error")
    job, stats = job_files(sup, job_id)
    result = summary(job, stats)
    glb = sup.spec.output_dir / "jobs" / job_id / "result.glb"
    result["glb"] = check_glb(glb)
    keep_glb(glb, "texture")
    record("texture", result)
    # The input sphere spans x 1.2..2.8, y -0.8..0.8, z 0.2..1.8 (its GLB is Y-up already).
    low, high = result["glb"]["bounds"]
    assert low == pytest.approx([1.2, -0.8, 0.2], abs=0.03)
    assert high == pytest.approx([2.8, 0.8, 1.8], abs=0.03)


def test_texturing_bakes_into_the_uvs_the_mesh_has(sup):
    """Issue 14: the adapter hands the input's UVs past upstream's preprocess_mesh, so the
    bake uses them. Written for the GPU machine; not run yet (docs/GPU.md, issue 14)."""
    import numpy as np
    import trimesh

    from backend.checks import meshes

    if PROBES.get("dual_grid") not in (None, 0):
        pytest.skip("upstream's voxelisation crashes on its own (see dual_grid_probe)")
    need(150, sup)
    sphere = trimesh.creation.uv_sphere(radius=0.8, count=(48, 48))
    v = sphere.vertices / 0.8  # a latitude/longitude layout of our own
    uv = np.c_[np.arctan2(v[:, 1], v[:, 0]) / (2 * np.pi) + 0.5, v[:, 2] / 2 + 0.5]
    data = meshes.write_glb(sphere.vertices, sphere.faces, uv)
    job_id = sup.client.texture(
        IMAGE.read_bytes(), data, "glb", {"preset": "fast", "texture_size": 1024}
    )
    outcome = sup.wait_for_job(job_id, timeout=300)
    record("texture_uv_job", outcome)
    assert outcome["state"] == "done", outcome.get("error")
    glb = sup.spec.output_dir / "jobs" / job_id / "result.glb"
    keep_glb(glb, "texture_uv")
    out = meshes.read_mesh(glb.read_bytes(), "glb")
    record(
        "texture_uv",
        {"glb": check_glb(glb), "uv_max_diff": float(np.abs(np.asarray(out.visual.uv) - uv).max())},
    )
    assert len(out.vertices) == len(sphere.vertices)
    assert np.allclose(out.visual.uv, uv, atol=1e-5)


@pytest.mark.parametrize("preset", ["balanced", "high", "game-asset"])
def test_each_larger_preset_gives_a_valid_glb(sup, preset):
    job_id, result = generate(sup, preset)
    record(f"preset_{preset}", result)
    assert result["glb"]["faces"] > 0
    used = result["final_params"]["resolution"]
    structure = result["mesh_stats"]["structure"]
    expected_type = "1024_cascade" if preset == "balanced" else "1536_cascade"
    assert structure["pipeline_type"] == expected_type
    assert used in (1024, 1152, 1280, 1408, 1536)
    # what our count said upstream's cascade would have at the resolution it settled on is
    # what it had (the runner plans from these counts before the high-resolution sampling)
    assert structure["cascade_tokens"][str(used)] == structure["shape_tokens"]


def test_texturing_twice_with_low_vram_off(tmp_path):
    """With `low_vram` off upstream keeps its models on the GPU, and moved the texturing
    pipeline's shape encoder to the CPU after a job without bringing it back (issue #11): a
    second texturing job in the same process must run on the GPU as the first did."""
    import trimesh

    if PROBES.get("dual_grid") not in (None, 0):
        pytest.skip("upstream's voxelisation crashes on its own (see dual_grid_probe)")
    need(60 + 2 * 150)
    supervisor, seen = serving(tmp_path, low_vram="false")
    try:
        supervisor.start_and_wait(timeout=600)
        mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.8)
        buf = io.BytesIO()
        mesh.export(buf, file_type="glb")
        results = []
        for _ in range(2):
            job_id = supervisor.client.texture(
                IMAGE.read_bytes(), buf.getvalue(), "glb", {"preset": "fast", "texture_size": 1024}
            )
            outcome = supervisor.wait_for_job(job_id, timeout=300)
            results.append(outcome)
            assert outcome["state"] == "done", outcome.get("error")
            job, stats = job_files(supervisor, job_id)
            results[-1] = {
                **summary(job, stats),
                "glb": check_glb(supervisor.spec.output_dir / "jobs" / job_id / "result.glb"),
            }
        record("texture_low_vram_off", {"jobs": results})
        # Upstream's own placement is what is checked: a model left on the CPU fails the
        # second job with a device mismatch (the stage times are recorded for the record).
        assert all(r["glb"]["faces"] > 0 for r in results)
    finally:
        supervisor.stop()
        record_logs(tmp_path, seen, "low_vram_off_")


def gpu_memory_used() -> dict[int, int]:
    """MiB in use on each GPU, as the driver sees it (every process, any allocator)."""
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return {int(i): int(m) for i, m in (line.split(",") for line in out.strip().splitlines())}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_backend_asked_for_the_second_gpu_uses_only_that_gpu(tmp_path):
    """Upstream hard-codes the default CUDA device (`.cuda()`, "cuda" in the DINOv3 extractor,
    `to_glb`), so `device=cuda:1` used to split a job's tensors across both cards. The engine
    pins its process to the GPU asked for (CUDA_VISIBLE_DEVICES, before CUDA starts): a whole
    job then leaves the first GPU as it was. Run alone: nothing else may use the GPUs."""
    need(240)
    before = gpu_memory_used()
    supervisor, seen = serving(tmp_path, device="cuda:1")
    try:
        supervisor.start_and_wait(timeout=600)
        steps = {"steps": 4}
        job_id = supervisor.submit(
            IMAGE.read_bytes(),
            {
                "preset": "fast",
                "seed": 1,
                "samplers": {"sparse_structure": steps, "shape": steps, "texture": steps},
            },
        )
        outcome = supervisor.wait_for_job(job_id, timeout=300)
        assert outcome["state"] == "done", outcome.get("error")
        during = gpu_memory_used()  # the backend still holds its models and its context
        engine = supervisor.status()["backend"].get("engine") or {}
        glb = check_glb(supervisor.spec.output_dir / "jobs" / job_id / "result.glb")
        record(
            "pinned_to_gpu1",
            {"before_mib": before, "after_job_mib": during, "engine": engine, "glb": glb},
        )
        assert during[0] - before[0] < 256, (before, during)  # no context, no tensor on GPU 0
        # GPU 1 holds the backend's context and allocator cache (its models go back to the
        # CPU between stages with low_vram, upstream's default): 843 MiB in GPU run 11
        assert during[1] - before[1] > 300, (before, during)
        assert glb["faces"] > 0
    finally:
        supervisor.stop()
        record_logs(tmp_path, seen, "pinned_")
