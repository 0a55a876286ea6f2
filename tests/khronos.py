"""Run the Khronos glTF-Validator (npm `gltf-validator`, through node) on files, for tests."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "tools" / "gltf_validate.mjs"
PACKAGE = ROOT / "node_modules" / "gltf-validator" / "package.json"
SKIP_REASON = (
    "Khronos glTF-Validator not installed: needs `node` on PATH and `npm ci` at the repo root"
)


def khronos_available() -> bool:
    return shutil.which("node") is not None and PACKAGE.is_file()


def khronos_reports(paths: list[str | Path], timeout: float = 60.0) -> list[dict]:
    """One validator report per file, from a single node process (node starts in ~0.1 s)."""
    if not paths:
        return []
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH")
    proc = subprocess.run(
        [node, str(SCRIPT), *(str(Path(p).resolve()) for p in paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"gltf_validate.mjs failed ({proc.returncode}): {proc.stderr[-2000:]}")
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if len(reports) != len(paths):
        raise RuntimeError(f"expected {len(paths)} reports, got {len(reports)}")
    return reports


def khronos_report(path: str | Path, timeout: float = 60.0) -> dict:
    return khronos_reports([path], timeout)[0]


def error_codes(report: dict) -> list[str]:
    return [m["code"] for m in report["issues"]["messages"] if m.get("severity") == 0]


def assert_khronos_valid(path: str | Path) -> dict:
    """Assert the Khronos validator finds no errors in the file (skip if it is not installed)."""
    if not khronos_available():
        pytest.skip(SKIP_REASON)
    report = khronos_report(path)
    assert report["issues"]["numErrors"] == 0, (
        f"Khronos glTF-Validator: {report['issues']['numErrors']} errors in {path}: "
        f"{error_codes(report)[:10]}"
    )
    return report


requires_khronos = pytest.mark.skipif(not khronos_available(), reason=SKIP_REASON)
