"""Meshes sent for texturing: the client's GLB writer and the reader both engines use."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from backend import params
from backend.checks import meshes
from backend.errors import ErrorCode, InputError

from .khronos import SKIP_REASON, khronos_available, khronos_reports

QUAD = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
TRIANGLES = np.array([[0, 1, 2], [0, 2, 3]])
UV = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # v up


def test_written_glb_reads_back_with_positions_triangles_and_uvs():
    mesh = meshes.read_mesh(meshes.write_glb(QUAD, TRIANGLES, UV), "glb")
    assert np.allclose(mesh.vertices, QUAD) and np.array_equal(mesh.faces, TRIANGLES)
    assert np.allclose(mesh.visual.uv, UV)  # v up again after glTF's v-down storage


def test_a_mesh_without_uvs_reads_back_without_them():
    mesh = meshes.read_mesh(meshes.write_glb(QUAD, TRIANGLES), "glb")
    assert np.array_equal(mesh.faces, TRIANGLES)
    assert getattr(mesh.visual, "uv", None) is None


@pytest.mark.skipif(not khronos_available(), reason=SKIP_REASON)
def test_written_glb_is_valid_for_khronos(tmp_path):
    paths = []
    for name, uv in (("uv", UV), ("plain", None)):
        path = tmp_path / f"{name}.glb"
        path.write_bytes(meshes.write_glb(QUAD, TRIANGLES, uv))
        paths.append(path)
    for report in khronos_reports(paths):
        assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
        assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]


def test_a_scene_of_several_parts_is_one_mesh_and_keeps_uvs_only_if_all_have_them():
    a = trimesh.Trimesh(QUAD, TRIANGLES, process=False)
    a.visual = trimesh.visual.TextureVisuals(uv=UV)
    b = trimesh.Trimesh(QUAD + [0, 0, 2], TRIANGLES, process=False)
    b.visual = trimesh.visual.TextureVisuals(uv=UV)
    both = meshes.read_mesh(trimesh.Scene([a, b]).export(file_type="glb"), "glb")
    assert len(both.faces) == 4 and np.allclose(both.visual.uv, np.r_[UV, UV])
    plain = trimesh.Trimesh(QUAD + [0, 0, 4], TRIANGLES, process=False)
    mixed = meshes.read_mesh(trimesh.Scene([a, plain]).export(file_type="glb"), "glb")
    assert len(mixed.faces) == 4 and getattr(mixed.visual, "uv", None) is None


@pytest.mark.parametrize(
    ("data", "fmt", "words"),
    [
        (b"not a mesh", "glb", "cannot read"),
        (b"x", "obj", "unsupported"),
        (meshes.write_glb(np.zeros((4, 3)), TRIANGLES), "glb", "zero size"),
        (meshes.write_glb(QUAD * np.nan, TRIANGLES), "glb", "non-finite"),
    ],
)
def test_bad_meshes_are_bad_mesh_input(data, fmt, words):
    with pytest.raises(InputError) as info:
        meshes.read_mesh(data, fmt)
    assert info.value.code is ErrorCode.BAD_MESH_INPUT and words in str(info.value)


def test_too_many_triangles_is_refused_with_the_limit(monkeypatch):
    monkeypatch.setattr(meshes, "TEXTURE_MAX_FACES", 1)
    with pytest.raises(InputError) as info:
        meshes.read_mesh(meshes.write_glb(QUAD, TRIANGLES), "glb")
    assert "at most 1" in str(info.value)
    assert params.TEXTURE_MAX_FACES >= 100_000  # the real limit is not a toy one


def _placed(glb: bytes, copies: int) -> bytes:
    """The GLB with its one mesh placed `copies` times (a node each): the file hardly grows,
    the triangles do."""
    import json
    import struct

    length = struct.unpack_from("<I", glb, 12)[0]
    doc = json.loads(glb[20 : 20 + length])
    rest = glb[20 + length :]
    doc["nodes"] = [{"mesh": 0, "translation": [i, 0, 0]} for i in range(copies)]
    doc["scenes"] = [{"nodes": list(range(copies))}]
    text = json.dumps(doc).encode()
    text += b" " * (-len(text) % 4)
    body = struct.pack("<II", len(text), 0x4E4F534A) + text + rest
    return struct.pack("<III", 0x46546C67, 2, 12 + len(body)) + body


def test_a_mesh_placed_many_times_is_counted_as_placed_before_it_is_copied(monkeypatch):
    """A small file placing one mesh thousands of times would need gigabytes once each
    placement is copied: it is refused by its placed count first."""
    glb = _placed(meshes.write_glb(QUAD, TRIANGLES), 50)
    assert len(meshes.read_mesh(glb, "glb").faces) == 100  # placements are real triangles
    monkeypatch.setattr(meshes, "TEXTURE_MAX_FACES", 99)
    copied = []
    monkeypatch.setattr(trimesh.Scene, "dump", lambda self, *a, **k: copied.append(1) or [])
    with pytest.raises(InputError) as info:
        meshes.read_mesh(glb, "glb")
    assert "100 triangles" in str(info.value) and not copied


def test_texture_uploads_are_checked_the_same_for_the_backend_and_the_gateway():
    from backend.checks import meshes
    from backend.errors import ErrorCode, InputError

    assert meshes.checked_upload("GLB", b"x") == "glb"
    for fmt, data in (("obj", b"x"), ("glb", b""), ("ply", b"x" * (meshes.MAX_UPLOAD_BYTES + 1))):
        with pytest.raises(InputError) as err:
            meshes.checked_upload(fmt, data)
        assert err.value.code is ErrorCode.BAD_MESH_INPUT


def test_a_damaged_file_that_sends_trimesh_after_an_optional_module_reads_as_damaged(
    monkeypatch,
):
    """trimesh reaches for optional text decoders on some damaged files; the error says the
    file is damaged, not which module this machine lacks."""

    def load(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'charset_normalizer'")

    monkeypatch.setattr(trimesh, "load", load)
    with pytest.raises(InputError) as info:
        meshes.read_mesh(meshes.write_glb(QUAD, TRIANGLES), "glb")
    assert info.value.code is ErrorCode.BAD_MESH_INPUT
    assert "damaged" in info.value.message and "charset" not in info.value.message
