"""Mutation check: wiring mistakes in the TRELLIS.2 adapter that the CPU tests must catch.

Each mutation is applied to a copy of the repository, and the adapter's fake-backed tests run
against the copy in a child process: every one must fail. A mutation whose original text is
no longer in the adapter fails this test too, so the list stays honest as the code changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = Path("backend/engines/trellis2.py")
TESTS = ["tests/test_trellis2_fidelity.py"]

# name -> [(original text, replacement)], each original occurring exactly once
MUTATIONS: dict[str, list[tuple[str, str]]] = {
    "cascade conditions swapped (512 <-> 1024)": [
        (
            'lr_cond=cond_512,\n                    cond=_to(state["cond_1024"], device),',
            'lr_cond=_to(state["cond_1024"], device),\n                    cond=cond_512,',
        ),
    ],
    "low- and high-resolution shape models swapped": [
        (
            'flow_model_lr=pipe.models["shape_slat_flow_model_512"],',
            'flow_model_lr=pipe.models["shape_slat_flow_model_1024"],',
        ),
        (
            'flow_model=pipe.models["shape_slat_flow_model_1024"],',
            'flow_model=pipe.models["shape_slat_flow_model_512"],',
        ),
    ],
    "512 and 1024 texture models swapped": [
        (
            '"tex_slat_flow_model_512" if small else "tex_slat_flow_model_1024"]\n'
            '        torch.set_rng_state(state["rng_after_shape"])',
            '"tex_slat_flow_model_1024" if small else "tex_slat_flow_model_512"]\n'
            '        torch.set_rng_state(state["rng_after_shape"])',
        ),
    ],
    "512 conditioning for cascade textures": [
        (
            'cond = state["cond_512"] if small else state["cond_1024"]',
            'cond = state["cond_512"]',
        ),
    ],
    "decoding at a fixed 1024": [
        ('resolution=state["effective_resolution"],', "resolution=1024,"),
    ],
    "remesh_project changed": [
        ("remesh_project=0,", "remesh_project=0.9,"),
    ],
    # Fidelity fixes found on the real code, kept from coming back:
    "texturing models left on the CPU when low_vram is off": [
        ("for loaded in (pipe, self.texturing):", "for loaded in (pipe,):"),
    ],
    "no cache release between sampling and decoding": [
        (
            "fit where the flow models' blocks were.\n        gpu.release_cache()\n",
            "fit where the flow models' blocks were.\n",
        ),
    ],
    "o-voxel asked for its timings (SIGSEGV on the real build)": [
        ("        quiet_voxeliser(o_voxel.convert)\n", ""),
    ],
    "the ladder's remesh band not passed to to_glb": [
        ("remesh_band=params.remesh_band,", "remesh_band=1,"),
    ],
    "zero normals left in the GLB": [
        ('state["repaired_normals"] = unit_normals(glb)', 'state["repaired_normals"] = 3'),
    ],
    "a guessed default for sampler steps": [
        ('merged.get("steps", _default_steps(sampler))', 'merged.get("steps", 12)'),
    ],
}


def _copy_repository(target: Path) -> None:
    # out/ and dist/ hold what scripts made (main_job.sh links the repository into out/).
    ignore = shutil.ignore_patterns(
        ".git",
        ".venv*",
        "node_modules",
        "__pycache__",
        "*.pyc",
        "docs",
        "examples",
        ".gpukit",
        "out",
        "dist",
        "build",
    )
    shutil.copytree(ROOT, target, ignore=ignore)
    for shared in ("examples", "node_modules"):  # read-only: linked, not copied
        if (ROOT / shared).is_dir():
            (target / shared).symlink_to(ROOT / shared)


def _pytest(copy: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            *TESTS,
        ],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("pristine") / "repo"
    _copy_repository(copy)
    probe = subprocess.run(
        [sys.executable, "-c", "import backend.engines.trellis2 as m; print(m.__file__)"],
        cwd=copy,
        env=dict(os.environ, PYTHONPATH=str(copy)),
        capture_output=True,
        text=True,
    )
    assert Path(probe.stdout.strip()).is_relative_to(copy), probe.stdout + probe.stderr
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_each_wiring_mutation_fails_a_test(pristine, tmp_path, name):
    copy = tmp_path / "repo"
    shutil.copytree(pristine, copy, symlinks=True)
    source = (copy / ADAPTER).read_text(encoding="utf-8")
    for original, replacement in MUTATIONS[name]:
        assert source.count(original) == 1, f"{name}: {original!r} is not in the adapter once"
        source = source.replace(original, replacement)
    (copy / ADAPTER).write_text(source, encoding="utf-8")
    result = _pytest(copy)
    assert result.returncode == 1, (
        f"no test failed with the mutation {name!r}\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
    )
