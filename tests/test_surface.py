"""UV rasterisation and the alpha mode a base colour calls for (backend/engines/surface.py)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import trimesh
from PIL import Image
from trimesh.visual.material import PBRMaterial
from trimesh.visual.texture import TextureVisuals

from backend.engines import surface

SQUARE_UV = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
SQUARE_FACES = np.array([[0, 1, 2], [0, 2, 3]])


def test_two_triangles_covering_the_square_cover_every_texel_once():
    face, bary = surface.rasterize_uv(SQUARE_UV, SQUARE_FACES, 8)
    assert (face >= 0).all()
    assert np.allclose(bary.sum(axis=2), 1.0, atol=1e-6)
    # Interpolating the corners' UVs gives back each texel centre (v up: row 0 is v near 1).
    uv = (SQUARE_UV[SQUARE_FACES[face]] * bary[..., None]).sum(axis=2)
    cols, rows = np.meshgrid(np.arange(8), np.arange(8))
    assert np.allclose(uv[..., 0], (cols + 0.5) / 8, atol=1e-6)
    assert np.allclose(uv[..., 1], 1 - (rows + 0.5) / 8, atol=1e-6)


def test_a_triangle_covers_only_texels_inside_it():
    face, _ = surface.rasterize_uv(SQUARE_UV, SQUARE_FACES[:1], 64)  # below the diagonal
    rows, cols = np.nonzero(face == 0)
    u, v = (cols + 0.5) / 64, 1 - (rows + 0.5) / 64
    assert (v <= u + 1e-9).all()
    assert abs(len(rows) / 64**2 - 0.5) < 0.02
    assert (face[face != 0] == -1).all()


def test_degenerate_and_outside_triangles_cover_nothing():
    uv = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [1.5, 1.5], [2.0, 1.5], [2.0, 2.0]])
    face, _ = surface.rasterize_uv(uv, np.array([[0, 1, 2], [3, 4, 5]]), 16)
    assert (face == -1).all()


def test_many_small_triangles_are_rasterised_in_chunks(monkeypatch):
    monkeypatch.setattr(surface, "_BUDGET", 50)  # force many chunks
    n = 16
    u, v = np.meshgrid(np.linspace(0, 1, n + 1), np.linspace(0, 1, n + 1))
    uv = np.stack([u.ravel(), v.ravel()], axis=1)
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]
    faces = np.concatenate([np.stack([a, b, c], -1), np.stack([a, c, d], -1)]).reshape(-1, 3)
    face, _ = surface.rasterize_uv(uv, faces, 64)
    assert (face >= 0).all()


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (np.ones(1000), ("OPAQUE", None)),
        (np.r_[np.ones(998), np.zeros(2)], ("OPAQUE", None)),  # a few stray texels
        (np.r_[np.full(990, 0.995), np.zeros(10)], ("MASK", surface.MASK_CUTOFF)),
        (np.r_[np.ones(900), np.full(100, 0.5)], ("BLEND", None)),
        (np.r_[np.ones(900), np.zeros(50), np.full(50, 0.6)], ("BLEND", None)),
        (np.array([]), ("OPAQUE", None)),
    ],
)
def test_alpha_mode(alpha, expected):
    assert surface.alpha_mode(alpha) == expected


def test_only_the_covered_part_of_the_texture_counts():
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:, 16:] = 0  # the right half is clear
    left = SQUARE_UV * [0.45, 1.0]
    assert surface.alpha_mode(surface.covered_alpha(alpha, left, SQUARE_FACES)) == ("OPAQUE", None)
    mode, cutoff = surface.alpha_mode(surface.covered_alpha(alpha, SQUARE_UV, SQUARE_FACES))
    assert (mode, cutoff) == ("MASK", 0.5)


def _glb_materials(data: bytes) -> list[dict]:
    length = struct.unpack_from("<I", data, 12)[0]
    return json.loads(data[20 : 20 + length])["materials"]


@pytest.mark.parametrize(
    ("fill", "expected"),
    [
        (255, {"alphaMode": "OPAQUE"}),
        (0, {"alphaMode": "MASK", "alphaCutoff": 0.5}),
        (128, {"alphaMode": "BLEND"}),
    ],
)
def test_marked_mesh_exports_its_alpha_mode(fill, expected):
    mesh = trimesh.Trimesh(
        vertices=np.c_[SQUARE_UV, np.zeros(4)], faces=SQUARE_FACES, process=False
    )
    texture = Image.new("RGBA", (64, 64), (200, 100, 50, 255))
    texture.paste((200, 100, 50, fill), (16, 16, 48, 48))  # a quarter of the surface
    mesh.visual = TextureVisuals(
        uv=SQUARE_UV, material=PBRMaterial(baseColorTexture=texture, alphaMode="OPAQUE")
    )
    assert surface.mark_alpha_mode(mesh) == expected["alphaMode"]
    (material,) = _glb_materials(mesh.export(file_type="glb"))
    assert {k: material[k] for k in expected} == expected
    assert "alphaCutoff" in material if fill == 0 else "alphaCutoff" not in material


def test_a_mesh_without_uvs_or_texture_keeps_its_mode():
    mesh = trimesh.creation.box()
    assert surface.mark_alpha_mode(mesh) == "OPAQUE"
    mesh.visual = TextureVisuals(
        uv=np.zeros((8, 2)), material=PBRMaterial(baseColorFactor=[1, 1, 1, 0.5], alphaMode="BLEND")
    )
    assert surface.mark_alpha_mode(mesh) == "BLEND"
