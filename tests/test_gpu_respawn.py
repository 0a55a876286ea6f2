"""GPU: the supervisor's respawn gives a clean GPU (`pytest -m gpu`, skipped without CUDA).

A backend that ran an out-of-memory-degraded job, or whose CUDA context was poisoned, is
replaced by a fresh process whose VRAM right after start equals a fresh process's baseline.
Figures go to $GPU_RESULTS/respawn_*.json when that variable is set (docs/GPU.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("zmq")

from backend.procutil import pid_alive  # noqa: E402
from backend.supervision.supervisor import BackendSpec, RespawnPolicy, Supervisor  # noqa: E402
from tests.conftest import png_bytes  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def smi_used() -> dict[int, int]:
    """pid -> MiB used, from nvidia-smi (empty where the driver hides processes)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    used = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            used[int(parts[0])] = int(parts[1])
    return used


def backend_vram(sup: Supervisor) -> dict:
    vram = sup.client.status(timeout=30)["vram"]
    assert vram, "the backend reports no VRAM figures"
    return {k: vram[k] for k in ("allocated", "reserved", "peak")} | {
        "smi_mib": smi_used().get(sup.pid)
    }


def save(name: str, data: dict) -> None:
    folder = os.environ.get("GPU_RESULTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"respawn_{name}.json").write_text(json.dumps(data, indent=2))


def supervisor(tmp_path: Path, **options) -> Supervisor:
    spec = BackendSpec(
        output_dir=tmp_path / "out",
        connection_file=tmp_path / "run" / "backend.json",
        engine="tests.gpu_engines:CudaLoadEngine",
        engine_options={"weights_gb": "2", **options},
        extra_pythonpath=[str(ROOT)],
        extra_args=["--vram-cap-gb", "16"],
        min_free_disk_mb=1,
    )
    return Supervisor(spec, RespawnPolicy(after_failure=False, start_timeout=180))


def assert_same_as_fresh(fresh: dict, after: dict) -> None:
    assert after["allocated"] == fresh["allocated"], (fresh, after)
    # The health probe's tiny tensors may hold one 2 MiB allocator page at the moment of
    # measuring, in either process: equal up to a few pages.
    assert abs(after["reserved"] - fresh["reserved"]) <= 4 * 2 * MIB, (fresh, after)
    if fresh["smi_mib"] is not None and after["smi_mib"] is not None:
        assert abs(after["smi_mib"] - fresh["smi_mib"]) <= 64, (fresh, after)


def test_restart_after_a_degraded_job_gives_a_fresh_vram_baseline(tmp_path):
    sup = supervisor(tmp_path)
    try:
        sup.start_and_wait(timeout=180)
        fresh = backend_vram(sup)
        job_id = sup.submit(png_bytes(), {"preset": "high"})
        record = sup.wait_for_job(job_id, timeout=300)
        assert record["state"] == "done" and record["level"] > 0  # it ran out of memory
        after_job = backend_vram(sup)
        old_pid = sup.pid
        sup.restart("test: clean GPU state")
        sup.wait_ready(timeout=180)
        assert sup.pid != old_pid and not pid_alive(old_pid)
        assert old_pid not in smi_used()  # the old process's memory went with it
        after = backend_vram(sup)
        save(
            "after_degraded_job",
            {
                "fresh": fresh,
                "after_job": after_job,
                "after_respawn": after,
                "level": record["level"],
            },
        )
        assert_same_as_fresh(fresh, after)
    finally:
        sup.stop()


def test_poisoned_backend_is_respawned_clean_and_the_job_completes(tmp_path):
    sup = supervisor(tmp_path, poison="structure", poison_marker=str(tmp_path / "poisoned"))
    try:
        sup.start_and_wait(timeout=180)
        fresh = backend_vram(sup)
        first_pid = sup.pid
        job_id = sup.submit(png_bytes(), {"preset": "fast"})
        record = sup.wait_for_job(job_id, timeout=300)
        assert record["state"] == "done", record
        assert record["recoveries"] == 1  # poisoned once, then done on a fresh backend
        assert sup.pid != first_pid and not pid_alive(first_pid)
        assert (tmp_path / "poisoned").exists()
        sup.restart("test: measure a fresh baseline after the poisoned one")
        sup.wait_ready(timeout=180)
        after = backend_vram(sup)
        status = sup.status()
        save(
            "after_poison",
            {
                "fresh": fresh,
                "after_respawn": after,
                "restarts": status["restarts"],
                "last_shutdown": status["last_shutdown"],
            },
        )
        assert_same_as_fresh(fresh, after)
        log = (tmp_path / "out" / "jobs" / job_id / "log.txt").read_text()
        assert "poisoned" in log.lower()
    finally:
        sup.stop()
