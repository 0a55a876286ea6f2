"""The preview engine: closed, textured, Y-up meshes from a silhouette; cancel and re-export."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import trimesh
from PIL import Image, ImageDraw

from backend import engines
from backend.engines import preview
from backend.engines.base import StageContext
from backend.engines.preview import PreviewEngine
from backend.errors import BackendError, ErrorCode, InputError, JobCancelled
from backend.params import parse_params

RED = (200, 40, 40)


def tall_subject(size: int = 512) -> Image.Image:
    """A red ellipse twice as tall as wide with a green stalk, on a transparent background."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.35, size * 0.15, size * 0.65, size * 0.85), fill=RED + (255,))
    draw.rectangle((size * 0.48, size * 0.05, size * 0.52, size * 0.3), fill=(40, 160, 40, 255))
    return image


def run(engine, state, params, kind="generate", cancelled=None, reports=None):
    for stage in engine.stages_for(kind):

        def report(name, step, total, message):
            if reports is not None:
                reports.append((name, step, total, message))

        engine.run_stage(stage.name, state, params, StageContext(stage.name, report, cancelled))
    return state


def generate(tmp_path, image, name="out.glb", **overrides):
    params = parse_params({"resolution": 512, "texture_size": 256, **overrides})
    state = {"image": image, "output_path": tmp_path / name}
    return run(PreviewEngine(), state, params)


def glb_json(path) -> dict:
    data = path.read_bytes()
    magic, version, _length = struct.unpack_from("<4sII", data, 0)
    assert (magic, version) == (b"glTF", 2)
    chunk_length, chunk_type = struct.unpack_from("<I4s", data, 12)
    assert chunk_type == b"JSON"
    return json.loads(data[20 : 20 + chunk_length])


def load(path) -> trimesh.Trimesh:
    mesh = trimesh.load(path, force="mesh")
    assert isinstance(mesh, trimesh.Trimesh)
    return mesh


def test_generate_writes_a_closed_textured_y_up_mesh(tmp_path):
    reports = []
    params = parse_params({"resolution": 512, "texture_size": 256})
    state = {"image": tall_subject(), "output_path": tmp_path / "out.glb"}
    run(PreviewEngine(), state, params, reports=reports)

    assert state["glb_path"] == tmp_path / "out.glb"
    mesh = load(state["glb_path"])
    assert mesh.is_watertight
    assert mesh.is_winding_consistent
    assert mesh.volume > 0  # outward normals
    assert np.all(mesh.bounds >= -0.5 - 1e-6) and np.all(mesh.bounds <= 0.5 + 1e-6)
    extent = mesh.extents
    assert extent.max() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(mesh.bounds.mean(axis=0), 0.0, atol=1e-5)
    assert np.argmax(extent) == 1  # the tall image stands up along +Y
    assert extent[2] > 0.3 * extent[0]  # inflated, not a flat card
    # the top of the model is the stalk (green), so the image is not upside down
    top = mesh.vertices[:, 1] > 0.45
    assert top.any() and abs(mesh.vertices[top, 0]).max() < 0.1

    gltf = glb_json(state["glb_path"])
    assert [image["mimeType"] for image in gltf["images"]] == ["image/png", "image/png"]
    material = gltf["materials"][0]
    assert material.get("alphaMode", "OPAQUE") == "OPAQUE"  # an opaque subject
    assert "metallicRoughnessTexture" in material["pbrMetallicRoughness"]
    texture = mesh.visual.material.baseColorTexture
    assert texture.size == (256, 256)
    assert texture.mode == "RGBA"
    # TRELLIS.2's packing: roughness in green, metallic in blue, factors 1.
    packed = np.asarray(mesh.visual.material.metallicRoughnessTexture)
    assert (packed[..., 1] == round(0.8 * 255)).all() and (packed[..., 2] == 0).all()

    vertices, faces = state["mesh_arrays"]
    assert state["mesh_stats"] == {
        "vertices": len(vertices),
        "faces": len(faces),
        "texture_size": 256,
    }
    assert len(mesh.faces) == len(faces)
    for stage in ("mask", "shape", "texture", "export"):
        assert sum(1 for r in reports if r[0] == stage) >= 2, stage


def test_background_of_the_texture_takes_the_edge_colour(tmp_path):
    state = generate(tmp_path, tall_subject())
    texture = np.asarray(state["preview_texture"])
    mask = Image.fromarray(state["preview_mask"].astype(np.uint8) * 255, "L")
    outside = np.asarray(mask.resize(texture.shape[:2][::-1])) == 0
    assert outside.mean() > 0.2
    # no black fringe: outside the subject the texture has the nearby subject colours, and
    # it is opaque (the mesh is the silhouette: its rim is no see-through material)
    assert texture[outside][:, :3].astype(int).sum(axis=1).min() > 150
    assert (texture[..., 3] == 255).all()


def test_see_through_parts_of_the_subject_make_a_blended_material(tmp_path):
    image = tall_subject()
    ImageDraw.Draw(image).rectangle((200, 150, 310, 380), fill=RED + (150,))  # tinted glass
    state = generate(tmp_path, image)
    material = glb_json(state["glb_path"])["materials"][0]
    assert material["alphaMode"] == "BLEND"
    texture = np.asarray(state["preview_texture"])
    assert ((texture[..., 3] > 140) & (texture[..., 3] < 160)).mean() > 0.05


def test_face_budget_lowers_the_grid(tmp_path):
    state = generate(tmp_path, tall_subject(), resolution=1536, decimation_target=2000)
    mesh = load(state["glb_path"])
    assert 0 < len(mesh.faces) <= 2000
    assert mesh.is_watertight


def test_resolution_raises_the_face_count(tmp_path):
    counts = []
    for resolution in (512, 1024, 1536):
        state = generate(tmp_path, tall_subject(), f"r{resolution}.glb", resolution=resolution)
        counts.append(state["mesh_stats"]["faces"])
    assert counts[0] < counts[1] < counts[2]


def test_rgb_image_gets_its_background_removed():
    size = 512
    image = Image.new("RGB", (size, size), (224, 224, 226))
    known = Image.new("L", (size, size), 0)
    for target, colour in ((ImageDraw.Draw(image), (60, 90, 200)), (ImageDraw.Draw(known), 255)):
        target.ellipse((120, 150, 380, 430), fill=colour)
        target.polygon([(250, 40), (330, 200), (170, 200)], fill=colour)
    draw = ImageDraw.Draw(image)
    draw.ellipse((220, 280, 260, 320), fill=(224, 224, 226))  # a highlight of background colour
    draw.ellipse((30, 470, 38, 478), fill=(20, 20, 20))  # a speck away from the subject
    state = {"image": image}
    PreviewEngine().run_stage("mask", state, parse_params({}), StageContext("mask"))

    x0, y0, x1, y1 = state["preview_crop"]
    found = np.zeros((size, size), bool)
    crop = state["preview_mask"]
    assert crop.shape == (y1 - y0, x1 - x0)
    found[max(y0, 0) : min(y1, size), max(x0, 0) : min(x1, size)] = crop[
        max(-y0, 0) : crop.shape[0] - max(y1 - size, 0),
        max(-x0, 0) : crop.shape[1] - max(x1 - size, 0),
    ]
    truth = np.asarray(known) > 127
    iou = (found & truth).sum() / (found | truth).sum()
    assert iou > 0.9
    assert found[300, 240]  # the background-coloured highlight is a filled hole, not background
    assert not found[474, 34]  # the speck is not part of the subject
    assert np.asarray(state["preview_rgba"])[..., 3].max() == 255


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGBA", (64, 64), (255, 0, 0, 0)),  # alpha hides everything
        Image.new("RGB", (64, 64), (200, 200, 200)),  # nothing stands out from the background
    ],
)
def test_no_subject_is_an_empty_alpha_error(tmp_path, image):
    with pytest.raises(InputError) as info:
        generate(tmp_path, image)
    assert info.value.code is ErrorCode.EMPTY_ALPHA
    assert info.value.hint


def test_cancel_during_shape_stops_at_the_next_checkpoint():
    engine = PreviewEngine()
    params = parse_params({"resolution": 1536})
    state = {"image": tall_subject(1024)}
    engine.run_stage("mask", state, params, StageContext("mask"))
    flag = {"cancel": False, "after": 0}

    def report(stage, step, total, message):
        if flag["cancel"]:
            flag["after"] += 1
        if "inflating" in message:
            flag["cancel"] = True  # the user presses Cancel mid-inflation

    ctx = StageContext("shape", report, lambda: flag["cancel"])
    with pytest.raises(JobCancelled):
        engine.run_stage("shape", state, params, ctx)
    assert flag["after"] == 0
    assert "preview_vertices" not in state


def test_shape_stage_checks_in_often():
    # Cancel latency is bounded by the work between checkpoints; at the finest grid the
    # inflation must still check in many times (a stage that never checks could not cancel).
    engine = PreviewEngine()
    params = parse_params({"resolution": 1536})
    state = {"image": tall_subject(1024)}
    engine.run_stage("mask", state, params, StageContext("mask"))
    reports = []
    engine.run_stage("shape", state, params, StageContext("shape", lambda *r: reports.append(r)))
    assert len(reports) >= 8


def test_reexport_from_cache_changes_the_texture_without_the_mask_stage(tmp_path):
    first = generate(tmp_path, tall_subject())
    PreviewEngine().save_cache(first, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "preview_cache_image.png",
        "preview_cache_mask.png",
    ]

    engine = PreviewEngine()
    state = engine.load_cache(tmp_path / "cache")
    state["output_path"] = tmp_path / "again.glb"
    reports = []
    params = parse_params({"resolution": 512, "texture_size": 512})
    run(engine, state, params, kind="reexport", reports=reports)
    assert [s.name for s in engine.stages_for("reexport")] == ["shape", "texture", "export"]
    assert "mask" not in {r[0] for r in reports}
    mesh = load(state["glb_path"])
    assert mesh.visual.material.baseColorTexture.size == (512, 512)
    assert mesh.is_watertight
    assert len(mesh.faces) == first["mesh_stats"]["faces"]  # same silhouette, same grid


def test_load_cache_without_a_cache_is_not_found(tmp_path):
    with pytest.raises(BackendError) as info:
        PreviewEngine().load_cache(tmp_path)
    assert info.value.code is ErrorCode.NOT_FOUND


def test_same_input_gives_the_same_bytes(tmp_path):
    a = generate(tmp_path, tall_subject(), "a.glb", seed=1)
    b = generate(tmp_path, tall_subject(), "b.glb", seed=2)  # the preview ignores the seed
    assert a["glb_path"].read_bytes() == b["glb_path"].read_bytes()


def test_the_material_is_hashed_without_copying_its_texture(monkeypatch):
    # trimesh hashes a material before exporting it; hashing the pixels held the GIL for
    # 10-20 ms per job (scripts/bench_loop.py).
    material = preview._one_material()(baseColorTexture=Image.new("RGBA", (64, 64)))

    def copied(*args, **kwargs):
        raise AssertionError("the texture's pixels were copied to hash the material")

    monkeypatch.setattr(Image.Image, "tobytes", copied)
    assert hash(material) == hash(material)
    assert isinstance(material, trimesh.visual.material.PBRMaterial)


def test_texture_job_keeps_the_mesh_and_projects_the_image(tmp_path):
    box = trimesh.creation.box(extents=(0.4, 0.8, 0.3))
    box.apply_translation((1.0, 2.0, 3.0))
    engine = PreviewEngine()
    state = {
        "image": tall_subject(),
        "output_path": tmp_path / "textured.glb",
        "mesh_bytes": box.export(file_type="glb"),
        "mesh_format": "glb",
    }
    run(engine, state, parse_params({"texture_size": 256}), kind="texture")
    mesh = load(state["glb_path"])
    assert np.allclose(mesh.bounds, box.bounds, atol=1e-5)
    assert mesh.visual.uv is not None and len(mesh.visual.uv) == len(mesh.vertices)
    assert mesh.visual.material.baseColorTexture.size == (256, 256)


def _plane(uv):
    """A unit square facing +Z (the projection's front) with the given UVs."""
    vertices = [[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]]
    return trimesh.Trimesh(vertices, [[0, 1, 2], [0, 2, 3]], process=False), np.array(uv)


def _texture_plane(tmp_path, image, uv):
    from backend.checks import meshes

    plane, uv = _plane(uv)
    state = {
        "image": image,
        "output_path": tmp_path / "plane.glb",
        "mesh_bytes": meshes.write_glb(plane.vertices, plane.faces, uv),
        "mesh_format": "glb",
    }
    run(PreviewEngine(), state, parse_params({"texture_size": 256}), kind="texture")
    return state, load(state["glb_path"])


def _halves():
    """A square subject, red on the left and blue on the right, on a transparent background."""
    image = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 63, 119), fill=(200, 30, 30, 255))
    draw.rectangle((64, 8, 119, 119), fill=(30, 30, 200, 255))
    return image


def test_texture_job_paints_the_image_into_the_mesh_own_uvs(tmp_path):
    mirrored = [[1, 0], [0, 0], [0, 1], [1, 1]]  # u runs right to left over the plane
    state, mesh = _texture_plane(tmp_path, _halves(), mirrored)
    assert np.allclose(mesh.visual.uv, mirrored)  # kept, not replaced by a projection
    texture = np.asarray(mesh.visual.material.baseColorTexture)
    # The plane's left (red in the image) lies on the texture's right: the UVs were used.
    assert texture[:, 160:, 0].mean() > 150 and texture[:, 160:, 2].mean() < 80
    assert texture[:, :96, 2].mean() > 150 and texture[:, :96, 0].mean() < 80
    assert glb_json(state["glb_path"])["materials"][0].get("alphaMode", "OPAQUE") == "OPAQUE"


def test_a_hole_in_the_projected_image_makes_a_cut_out(tmp_path):
    image = Image.new("RGBA", (128, 128), (90, 160, 60, 255))
    ImageDraw.Draw(image).ellipse((40, 40, 88, 88), fill=(0, 0, 0, 0))  # a hole inside
    state, mesh = _texture_plane(tmp_path, image, [[0, 0], [1, 0], [1, 1], [0, 1]])
    material = glb_json(state["glb_path"])["materials"][0]
    assert (material["alphaMode"], material["alphaCutoff"]) == ("MASK", 0.5)
    alpha = np.asarray(mesh.visual.material.baseColorTexture)[..., 3]
    assert alpha[128, 128] == 0 and alpha[16, 16] == 255


def test_texture_job_rejects_an_unreadable_mesh(tmp_path):
    state = {
        "image": tall_subject(),
        "output_path": tmp_path / "x.glb",
        "mesh_bytes": b"not a mesh at all",
        "mesh_format": "ply",
    }
    with pytest.raises(InputError) as info:
        run(PreviewEngine(), state, parse_params({}), kind="texture")
    assert info.value.code is ErrorCode.BAD_MESH_INPUT


def test_registry_creates_the_preview_engine_with_unknown_options():
    engine = engines.create("preview", device="cuda", weights_dir="/nowhere")
    assert isinstance(engine, PreviewEngine)
    assert engine.describe()["label"] == "Preview (no GPU)"
    assert engine.uses_gpu is False
    assert engine.capabilities == {"resolution", "image_size", "texture_size", "decimation_target"}


def test_large_image_is_downscaled_to_image_size():
    state = {"image": tall_subject(1024)}
    params = parse_params({"image_size": 256})
    PreviewEngine().run_stage("mask", state, params, StageContext("mask"))
    height = state["preview_rgba"].height  # the subject spans 80 % of the height, plus margins
    assert 0.8 * 256 < height < 0.9 * 256
