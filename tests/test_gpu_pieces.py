"""GLBs brought back from the GPU machine in pieces (scripts/gpu/bring_back.py there,
scripts/gpu/join_pieces.py here): what a call cannot return waits for the next one, and the
file put together here is the one the GPU made, or the join says it is not."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import trimesh

from tests.khronos import requires_khronos

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts" / "gpu"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bring_back(monkeypatch):
    module = load("bring_back")
    # Small pieces and a small call so a few MB exercise several calls.
    monkeypatch.setattr(module, "PIECE", 1_000_000)
    monkeypatch.setattr(module, "MAX_BYTES", 3_500_000)
    return module


def call(bring_back, tmp_path: Path, number: int, new: dict[str, bytes]) -> Path:
    """One device call: its $OUT with a log and the new GLBs; returns what came back."""
    out = tmp_path / f"call{number}"
    (out / "glb").mkdir(parents=True)
    (out / "run.log").write_text("log")
    for name, data in new.items():
        (out / "glb" / name).write_bytes(data)
    bring_back.main(out, tmp_path / "pending")
    returned = list(out.rglob("*"))
    files = [p for p in returned if p.is_file()]
    assert len(files) <= bring_back.MAX_FILES
    assert sum(p.stat().st_size for p in files) <= bring_back.MAX_BYTES + 100
    return out / "glb"


def test_a_large_glb_comes_back_over_several_calls_and_is_joined_whole(bring_back, tmp_path):
    join = load("join_pieces")
    big, small = os.urandom(5_200_000), os.urandom(300_000)
    first = call(bring_back, tmp_path, 1, {"big.glb": big})
    assert not (first / "big.glb").exists()  # cut, never sent whole
    second = call(bring_back, tmp_path, 2, {"small.glb": small})
    third = call(bring_back, tmp_path, 3, {})
    assert not any((tmp_path / "pending").glob("*.p*"))  # everything went back
    joined = tmp_path / "joined"
    join.main(joined, [first, second, third])  # Khronos fails on random bytes: not checked
    assert (joined / "big.glb").read_bytes() == big
    assert (joined / "small.glb").read_bytes() == small


def test_a_missing_or_altered_piece_is_reported_not_joined(bring_back, tmp_path, capsys):
    join = load("join_pieces")
    first = call(bring_back, tmp_path, 1, {"big.glb": os.urandom(2_500_000)})
    pieces = sorted(first.glob("big.glb.p*"))
    pieces[0].write_bytes(b"x" + pieces[0].read_bytes()[1:])
    assert join.main(tmp_path / "joined", [first]) == 1
    assert "does not match" in capsys.readouterr().out
    assert not (tmp_path / "joined" / "big.glb").exists()
    pieces[1].unlink()
    assert join.main(tmp_path / "joined", [first]) == 1
    assert "missing pieces [2]" in capsys.readouterr().out


@requires_khronos
def test_a_joined_glb_is_validated_by_khronos(bring_back, tmp_path, capsys):
    join = load("join_pieces")
    glb = trimesh.creation.icosphere(subdivisions=6).export(file_type="glb")
    first = call(bring_back, tmp_path, 1, {"sphere.glb": glb})
    assert join.main(tmp_path / "joined", [first]) == 0
    assert "sphere.glb: " in capsys.readouterr().out
    assert '"errors": 0' in (tmp_path / "joined" / "khronos.json").read_text()
