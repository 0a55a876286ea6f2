"""`doctor` as the add-on runs it: with the preview engine the preview engine is checked and
healthy and the TRELLIS.2 items are optional; the backend's own packages (pyzmq, Pillow, numpy)
and the output folder's writability are checked; hints name the add-on's preference fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from backend import doctor
from tests.conftest import ROOT

ENV_WORDS = ("TRELLIS2_", "--engine-opt", "environment variable")


def by_name(report) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_preview_engine_is_healthy_and_trellis2_items_are_optional(tmp_path):
    report = doctor.run_doctor(output_dir=str(tmp_path / "out"), engine="preview")
    checks = by_name(report)
    assert checks["preview engine"]["ok"] and not checks["preview engine"]["optional"]
    for name in ("pyzmq", "Pillow", "numpy", "output folder", "python", "trimesh"):
        assert checks[name]["ok"] and not checks[name]["optional"], checks[name]
    for name in ("trellis2", "weights", "gpu", "attention", "signatures"):
        assert checks[name]["optional"], name
    assert not all(c["ok"] for c in report["checks"])  # no TRELLIS.2 here ...
    assert report["ok"] is True  # ... and that is fine for the preview engine
    assert not (tmp_path / "out").exists()  # the writability probe left nothing behind
    text = doctor.format_report(report)
    assert "[opt ] weights" in text and "needed only for TRELLIS.2" in text


def test_without_an_engine_trellis2_items_stay_required(tmp_path):
    report = doctor.run_doctor(output_dir=str(tmp_path))
    assert report["ok"] is False and not any(c["optional"] for c in report["checks"])


def test_hints_for_blender_name_preference_fields(tmp_path, monkeypatch):
    monkeypatch.delenv("TRELLIS2_WEIGHTS", raising=False)
    report = doctor.run_doctor(output_dir=str(tmp_path), engine="trellis2", for_blender=True)
    hints = {c["name"]: c["hint"] for c in report["checks"] if c["hint"]}
    assert "weights" in hints and "trellis2" in hints
    for name, hint in hints.items():
        assert not any(word in hint for word in ENV_WORDS), (name, hint)
    assert "Weights Directory" in hints["weights"] and "preferences" in hints["weights"]
    assert "TRELLIS.2 Checkout" in hints["trellis2"]
    cli = doctor.run_doctor(output_dir=str(tmp_path), engine="trellis2")
    assert "TRELLIS2_WEIGHTS" in by_name(cli)["weights"]["hint"]  # the command line's words
    monkeypatch.setenv("TRELLIS2_WEIGHTS", str(tmp_path / "no-weights-here"))
    missing = doctor.run_doctor(output_dir=str(tmp_path), engine="trellis2", for_blender=True)
    assert by_name(missing)["weights"]["hint"].startswith("Download")  # specific hints stay


def test_an_output_folder_inside_a_file_is_reported(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    report = doctor.run_doctor(output_dir=str(blocker / "out"), engine="preview", for_blender=True)
    check = by_name(report)["output folder"]
    assert not check["ok"] and str(blocker) in check["detail"] and report["ok"] is False
    assert "Output Directory" in check["hint"]


def test_checks_started_together_on_a_missing_folder_all_find_it_writable(tmp_path):
    """Four doctors started at once (the GPU run's healthy and broken variants; an add-on
    checking while its backend starts) each make the missing folder, probe it and remove it.
    One must not report another's folder as a problem: "File exists" was (GPU run 8)."""
    import threading

    from backend.paths import output_dir_problem

    problems: list[str | None] = []
    for round_ in range(40):
        target = tmp_path / f"round{round_}" / "deeper" / "out"
        start = threading.Barrier(4)

        def check(target=target, start=start) -> None:
            start.wait()
            problems.append(output_dir_problem(target))

        threads = [threading.Thread(target=check) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not target.exists()  # no trace left: the backend creates it
    assert problems == [None] * 160


def test_a_bare_interpreter_misses_the_backends_own_packages(tmp_path):
    # -S: no site-packages at all (no pyzmq, Pillow, numpy), like a fresh Python.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRELLIS2_", "PYTHON"))}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "backend", "doctor", "--json", "--engine", "preview"]
        + ["--for-blender", "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    report = json.loads(proc.stdout)
    checks = by_name(report)
    assert proc.returncode == 1 and report["ok"] is False
    for name in ("pyzmq", "Pillow", "numpy"):
        assert not checks[name]["ok"] and checks[name]["hint"].startswith("pip install")
    assert not checks["preview engine"]["ok"]  # it needs numpy: said, never a traceback
    assert "Traceback" not in proc.stdout
