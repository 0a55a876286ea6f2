"""scripts/stats_report.py draws a PNG dashboard and prints numbers that match its input."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "stats_report.py"


def _synthetic(path: Path, seed: int = 7) -> dict:
    """Write a stats file like backend/store/stats.py does, and return what it should summarise."""
    rng = random.Random(seed)
    lines: list[str] = []
    expected = {
        "done": 0,
        "failed": 0,
        "cancelled": 0,
        "attempts": 0,
        "ooms": 0,
        "levels": {},
        "retries": [],
        "seconds": [],
        "ready": [],
        "peak": 0,
    }
    for n in range(23):
        outcome = rng.choice(["done", "done", "done", "failed", "cancelled"])
        tries = rng.randint(1, 4)
        level = rng.choice([0, 0, 1, 3, 5]) if outcome == "done" else 0
        for i in range(tries):
            last = i == tries - 1
            att = "ok" if last and outcome == "done" else ("oom" if not last else "error")
            peak = rng.randint(2, 30) * 2**30
            expected["peak"] = max(expected["peak"], peak)
            expected["attempts"] += 1
            expected["ooms"] += att == "oom"
            lines.append(
                json.dumps(
                    {
                        "kind": "attempt",
                        "ts": "2026-11-26T22:00:00Z",
                        "version": "0.1.0",
                        "job_id": f"j{n}",
                        "engine": "cuda_load",
                        "attempt": i + 1,
                        "level": i,
                        "params": {},
                        "stage": "texture",
                        "outcome": att,
                        "error_code": None,
                        "error": None,
                        "vram_peak": peak,
                        "seconds": 1.0,
                        "stage_seconds": {"cond": 0.1},
                    }
                )
            )
        seconds = round(rng.uniform(1, 60), 3)
        expected[outcome] += 1
        if outcome in ("done", "failed"):
            expected["retries"].append(tries - 1)
        if outcome == "done":
            expected["seconds"].append(seconds)
            expected["levels"][level] = expected["levels"].get(level, 0) + 1
        lines.append(
            json.dumps(
                {
                    "kind": "job",
                    "ts": "2026-11-26T22:00:05Z",
                    "version": "0.1.0",
                    "job_id": f"j{n}",
                    "engine": "cuda_load",
                    "job_kind": "generate",
                    "params": {},
                    "final_params": {},
                    "level": level,
                    "attempts": tries,
                    "outcome": outcome,
                    "error_code": "out_of_memory" if outcome == "failed" else None,
                    "seconds": seconds,
                    "stage_seconds": {"cond": 0.2, "structure": seconds / 2},
                    "vertices": 1000,
                    "faces": 2000,
                    "texture_size": 2048,
                    "vram_peak": None,
                }
            )
        )
        if n % 7 == 0:
            secs = round(rng.uniform(0.5, 20), 3)
            expected["ready"].append(secs)
            lines.append(
                json.dumps(
                    {
                        "kind": "ready",
                        "ts": "2026-11-26T22:00:00Z",
                        "engine": "cuda_load",
                        "seconds": secs,
                    }
                )
            )
    lines.insert(5, '{"kind": "job", "outcome": "done", truncated')  # a torn write
    lines.insert(9, "[1, 2, 3]")  # valid JSON, not a record
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected["records"] = len(lines) - 2
    return expected


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_dashboard_png_and_summary_match_the_input(tmp_path):
    stats = tmp_path / "stats.jsonl"
    exp = _synthetic(stats)
    out = tmp_path / "sub" / "dashboard.png"
    proc = _run(str(stats), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    width, height = _png_size(out)
    assert width >= 1000 and height >= 800
    printed = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert int(printed["records"]) == exp["records"]
    assert int(printed["malformed"]) == 2
    assert int(printed["jobs"]) == exp["done"] + exp["failed"] + exp["cancelled"]
    assert int(printed["done"]) == exp["done"]
    assert int(printed["failed"]) == exp["failed"]
    assert int(printed["cancelled"]) == exp["cancelled"]
    rate = exp["done"] / (exp["done"] + exp["failed"])
    assert float(printed["success_rate"]) == pytest.approx(rate, abs=1e-3)
    mean_retries = sum(exp["retries"]) / len(exp["retries"])
    assert float(printed["mean_retries"]) == pytest.approx(mean_retries, abs=1e-3)
    ordered = sorted(exp["seconds"])
    assert float(printed["seconds_p50"]) == pytest.approx(ordered[(len(ordered) + 1) // 2 - 1])
    assert int(printed["attempts"]) == exp["attempts"]
    assert int(printed["oom_attempts"]) == exp["ooms"]
    levels = dict(item.split(":") for item in printed["level_distribution"].split())
    assert {int(k): int(v) for k, v in levels.items()} == exp["levels"]
    assert float(printed["vram_peak_max_gib"]) == pytest.approx(exp["peak"] / 2**30)
    ready = sum(exp["ready"]) / len(exp["ready"])
    assert float(printed["time_to_ready_mean"]) == pytest.approx(ready, abs=1e-3)


def test_json_summary_and_an_empty_file(tmp_path):
    stats = tmp_path / "stats.jsonl"
    stats.write_text("not json\n\n", encoding="utf-8")
    out = tmp_path / "empty.png"
    proc = _run(str(stats), "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["records"] == 0 and summary["malformed"] == 1
    assert summary["success_rate"] is None
    assert _png_size(out)[0] >= 1000


def test_missing_file_is_a_clear_error(tmp_path):
    proc = _run(str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert "no stats file" in proc.stderr
    assert not (tmp_path / "x.png").exists()
