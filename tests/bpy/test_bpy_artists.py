"""What artists asked for, end to end in real Blender with the preview engine: texture the
selected mesh (onto it, keeping its UVs, or as a copy), seed variations with Keep, a batch of a
folder with its log, and materials that import with their alpha and metallic/roughness."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

bpy = pytest.importorskip("bpy")

from .conftest import EXAMPLE, ROOT, submodule  # noqa: E402
from .support import draw, labels_in, operators_in, tick_until  # noqa: E402

pytestmark = pytest.mark.bpy

EXAMPLES = ROOT / "examples"


def _image(props, path=EXAMPLE):
    props.source, props.filepath, props.preset = "FILE", str(path), "fast"
    props.use_advanced, props.texture_size = True, "512"  # small textures: quick tests


def _world_bounds(obj):
    from mathutils import Vector

    bpy.context.view_layer.update()
    corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
    return [min(c[i] for c in corners) for i in range(3)] + [
        max(c[i] for c in corners) for i in range(3)
    ]


def _bsdf(material):
    return next(n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")


def _source(socket):
    assert socket.is_linked, socket.name
    link = socket.links[0]
    return link.from_node, link.from_socket.name


# -- texture the selected mesh ---------------------------------------------------------------


def test_texture_button_says_why_it_is_disabled(scene, ctrl, monkeypatch):
    _image(scene.trellis2)
    log = draw(bpy.types.TRELLIS2_PT_texture, bpy.context)
    assert "trellis2.texture_mesh" in operators_in(log)
    assert ("Select a mesh object", "INFO") in labels_in(log)
    with pytest.raises(RuntimeError, match="Select a mesh object"):
        bpy.ops.trellis2.texture_mesh()
    bpy.ops.object.camera_add()
    with pytest.raises(RuntimeError, match="not a mesh"):
        bpy.ops.trellis2.texture_mesh()
    bpy.ops.mesh.primitive_cube_add()
    bpy.context.object.modifiers.new("sub", "SUBSURF").levels = 2
    monkeypatch.setattr(submodule("selection"), "TEXTURE_MAX_FACES", 100)
    # 6 quads, twice subdivided: 96 quads, 192 triangles with the modifier
    with pytest.raises(RuntimeError, match="192 triangles .* at most 100"):
        bpy.ops.trellis2.texture_mesh()
    monkeypatch.undo()
    assert bpy.ops.trellis2.texture_mesh.poll()
    scene.trellis2.filepath = ""
    with pytest.raises(RuntimeError, match="Choose an image file"):
        bpy.ops.trellis2.texture_mesh()


def test_the_mesh_sent_is_in_world_space_y_up_with_its_uvs_per_corner(scene, ctrl):
    import numpy as np

    from backend.checks import meshes

    obj = _textured_cube()
    sent = submodule("selection").export(bpy.context, obj)
    got = meshes.read_mesh(sent.data, "glb")
    evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh()
    evaluated.calc_loop_triangles()
    matrix = obj.matrix_world
    uv_layer = evaluated.uv_layers["UVMap"].uv
    expected_pos, expected_uv = [], []
    for tri in evaluated.loop_triangles:
        for vertex, loop in zip(tri.vertices, tri.loops, strict=True):
            x, y, z = matrix @ evaluated.vertices[vertex].co
            expected_pos.append((x, z, -y))  # glTF is Y-up
            expected_uv.append(tuple(uv_layer[loop].vector))
    corners = np.asarray(got.faces).ravel()
    assert np.allclose(np.asarray(got.vertices)[corners], expected_pos, atol=1e-5)
    assert np.allclose(np.asarray(got.visual.uv)[corners], expected_uv, atol=1e-6)
    # Split only at seams: fewer vertices than corners, more than positions.
    assert len(evaluated.vertices) < len(got.vertices) < len(corners)
    assert (sent.triangles, sent.uv_map, sent.modifiers_applied) == (44, "UVMap", True)
    obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh_clear()


def _textured_cube(location=(3.0, 1.0, 0.5)):
    bpy.ops.mesh.primitive_cube_add(location=location, rotation=(0.0, 0.0, 0.6))
    obj = bpy.context.object
    obj.name = "crate"
    obj.scale = (1.0, 0.5, 0.75)
    obj.modifiers.new("bevel", "BEVEL").width = 0.1
    return obj


def test_texture_onto_a_mesh_with_uvs_keeps_the_mesh_its_uvs_and_modifiers(scene, ctrl):
    _image(scene.trellis2)
    scene.trellis2.texture_result = "APPLY"
    obj = _textured_cube()
    mesh, counts = obj.data, (len(obj.data.vertices), len(obj.data.polygons))
    obj.data.materials.append(bpy.data.materials.new("old"))
    assert bpy.ops.trellis2.texture_mesh(mode="ASYNC") == {"FINISHED"}
    (view,) = ctrl.jobs.values()
    assert view.kind == "texture" and view.uv_map == "UVMap" and view.modifiers_applied
    tick_until(ctrl, lambda: view.terminal and view.imported)
    assert view.state == "done", view.message
    assert obj.data is mesh and (len(mesh.vertices), len(mesh.polygons)) == counts
    assert [m.type for m in obj.modifiers] == ["BEVEL"]  # the object stays non-destructive
    (material,) = mesh.materials
    assert material.name == "crate_texture" and material.name != "old"
    colour, _ = _source(_bsdf(material).inputs["Base Color"])
    assert colour.type == "TEX_IMAGE" and colour.image.size[:] == (512, 512)
    uv_node, _ = _source(colour.inputs["Vector"])
    assert uv_node.type == "UVMAP" and uv_node.uv_map == "UVMap"  # the map that was sent
    assert obj["trellis2_texture_job"] == view.job_id
    assert bpy.context.view_layer.objects.active == obj


def test_texture_onto_a_mesh_without_uvs_gives_it_the_textured_mesh(scene, ctrl):
    _image(scene.trellis2)
    scene.trellis2.texture_result = "APPLY"
    obj = _textured_cube()
    obj.data.uv_layers.remove(obj.data.uv_layers[0])
    before = _world_bounds(obj.evaluated_get(bpy.context.evaluated_depsgraph_get()))
    assert bpy.ops.trellis2.texture_mesh() == {"FINISHED"}  # AUTO waits in background mode
    (view,) = ctrl.jobs.values()
    assert view.state == "done" and view.uv_map == "" and view.imported
    assert len(obj.data.uv_layers) == 1  # the backend's UVs came with the mesh
    assert not obj.modifiers  # they were applied to what was sent: not twice
    after = _world_bounds(obj)
    assert after == pytest.approx(before, abs=1e-4)  # in place, with the object's transform
    assert tuple(obj.location) == pytest.approx((3.0, 1.0, 0.5))
    assert obj.data.name.startswith("Cube")  # the object's mesh name is kept
    (material,) = obj.data.materials
    assert _source(_bsdf(material).inputs["Base Color"])[0].type == "TEX_IMAGE"


def test_texture_as_a_copy_beside_the_object_leaves_it_alone(scene, ctrl):
    _image(scene.trellis2)
    obj = _textured_cube()
    assert bpy.ops.trellis2.texture_mesh(result="COPY") == {"FINISHED"}
    copy = bpy.data.objects["crate textured"]
    assert not obj.data.materials and [m.type for m in obj.modifiers] == ["BEVEL"]
    flat = [v for row in copy.matrix_world.to_3x3() for v in row]
    assert flat == pytest.approx([v for row in obj.matrix_world.to_3x3() for v in row])
    got = _world_bounds(copy)
    was = _world_bounds(obj.evaluated_get(bpy.context.evaluated_depsgraph_get()))
    shift = 1.15 * (was[3] - was[0])  # to its right by a bit more than its width
    expected = [v + (shift if i % 3 == 0 else 0) for i, v in enumerate(was)]
    assert got == pytest.approx(expected, abs=1e-5)
    assert copy.users_collection[0] == obj.users_collection[0]
    assert len(copy.data.uv_layers) == 1 and copy.data.materials[0].name == "crate_texture"
    assert bpy.context.view_layer.objects.active == copy


# -- variations --------------------------------------------------------------------------------


def test_variations_in_a_row_then_keep_one(scene, ctrl):
    props = scene.trellis2
    _image(props)
    props.random_seed, props.variations_count = True, 3
    scene.cursor.location = (0.0, 5.0, 1.0)
    assert bpy.ops.trellis2.variations(mode="ASYNC") == {"FINISHED"}
    (group,) = ctrl.groups.values()
    assert len({item.seed for item in group.items}) == 3
    log = draw(bpy.types.TRELLIS2_PT_main, bpy.context)
    assert any("Variations of duck_on_grey: 0 of 3 done" in kw["text"] for kw in _bars(log))
    tick_until(ctrl, lambda: group.ended and all(i.object for i in group.items), timeout=120)
    row = bpy.data.collections["Variations"]
    objects = sorted(row.objects, key=lambda o: o.location.x)
    assert len(objects) == 3
    assert [o.location.x for o in objects] == pytest.approx([-1.25, 0.0, 1.25])
    assert {round(o.location.y, 5) for o in objects} == {5.0}
    for obj, item in zip(objects, group.items, strict=True):
        assert obj.name == f"duck_on_grey seed {item.seed}" and obj.show_name
        assert obj["trellis2_seed"] == item.seed
        assert ctrl.find(item.key).result["final_params"]["seed"] == item.seed  # really ran
    kept = objects[2]
    kept_mesh, gone_meshes = kept.data, {o.data.name for o in objects[:2]}
    bpy.context.view_layer.objects.active = kept
    assert bpy.ops.trellis2.keep_variation() == {"FINISHED"}
    assert list(bpy.data.objects) == [kept] and kept.data == kept_mesh
    assert not gone_meshes & {m.name for m in bpy.data.meshes}  # their data went too
    assert "Variations" not in bpy.data.collections  # the row is empty: no clutter
    assert [c.name for c in kept.users_collection] == ["TRELLIS.2"]
    assert tuple(kept.location) == pytest.approx((0.0, 5.0, 1.0))  # like a normal result
    assert kept.name == "duck_on_grey" and not kept.show_name
    assert kept["trellis2_seed"] == group.items[2].seed and "trellis2_group" not in kept


def _bars(log):
    return [kw for name, _, kw in log if name == "progress"]


def _slow(ctrl):
    """A CPU engine that takes a few seconds per job (set on the controller: the operators
    would configure it from the preferences, which offer only real engines)."""
    ctrl.configure(
        dataclasses.replace(
            ctrl.config,
            engine="tests.cpu_engines:SlowEngine",
            engine_options={"steps": "100", "step_seconds": "0.05"},
        )
    )


def test_keep_cancels_seeds_still_running_and_wants_a_variation(scene, ctrl):
    with pytest.raises(RuntimeError, match="Select one of the variations"):
        bpy.ops.trellis2.keep_variation()
    _slow(ctrl)
    groups = submodule("groups")
    image = EXAMPLE.read_bytes()
    group = groups.variations("duck", image, "duck.png", [1, 2, 3, 4], {"preset": "fast"}, (0,) * 3)
    ctrl.start_group(group)
    tick_until(ctrl, lambda: group.items[0].state == "running")
    assert [i.state for i in group.items[2:]] == ["pending", "pending"]  # fed a few at a time
    bpy.ops.mesh.primitive_cube_add()  # stands in for a variation already imported
    bpy.context.object["trellis2_group"] = group.key
    assert bpy.ops.trellis2.keep_variation() == {"FINISHED"}
    tick_until(ctrl, lambda: group.ended)
    assert {i.state for i in group.items} == {"cancelled"}
    assert ctrl.active_jobs() == []


# -- batch -------------------------------------------------------------------------------------


def _batch_folder(tmp_path):
    folder = tmp_path / "props shelf"
    folder.mkdir()
    for name in ("mug.png", "robot.png", "star_toy.png"):
        shutil.copy(EXAMPLES / name, folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "pot_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return folder


def test_batch_a_folder_into_a_grid_with_a_log(scene, ctrl, tmp_path):
    props = scene.trellis2
    _image(props)
    folder = _batch_folder(tmp_path)
    props.batch_folder, props.random_seed = str(folder), False
    scene.cursor.location = (10.0, 0.0, 0.0)
    assert bpy.ops.trellis2.batch() == {"FINISHED"}  # AUTO: waits for the batch in -b
    (group,) = ctrl.groups.values()
    assert [i.label for i in group.items] == [
        "mug.png",
        "pot_broken.png",
        "robot.png",
        "star_toy.png",
    ]
    assert [i.state for i in group.items] == ["done", "failed", "done", "done"]  # went on
    assert {i.seed for i in group.items} == {props.seed}  # no random seed: the panel's one
    grid = bpy.data.collections["props shelf"]
    assert sorted(o.name for o in grid.objects) == ["mug", "robot", "star_toy"]
    # A 2x2 grid centred on the cursor; the broken image's cell stays empty.
    spots = {o.name: (round(o.location.x, 3), round(o.location.y, 3)) for o in grid.objects}
    assert spots == {"mug": (9.375, 0.625), "robot": (9.375, -0.625), "star_toy": (10.625, -0.625)}
    log = json.loads(Path(group.log_path).read_text())
    assert Path(group.log_path).parent == folder and log["state"] == "done"
    assert log["counts"] == {"total": 4, "done": 3, "failed": 1, "cancelled": 0, "active": 0}
    entries = {e["file"]: e for e in log["images"]}
    assert entries["pot_broken.png"]["state"] == "failed" and entries["pot_broken.png"]["error"]
    assert entries["pot_broken.png"]["job_id"] is None  # refused before it became a job
    for name in ("mug.png", "robot.png", "star_toy.png"):
        assert entries[name]["state"] == "done" and entries[name]["job_id"]
        assert entries[name]["object"] == Path(name).stem
        assert Path(entries[name]["glb_path"]).is_file()
    assert log["ignored"] == ["notes.txt"]
    log_lines = labels_in(draw(bpy.types.TRELLIS2_PT_batch, bpy.context))
    assert any("3 of 4 done, 1 failed" in text for text, _ in log_lines)
    assert any(text.startswith("pot_broken.png:") for text, _ in log_lines)


def test_cancel_all_stops_a_batch_and_logs_it(scene, ctrl, tmp_path):
    _slow(ctrl)
    groups = submodule("groups")
    folder = _batch_folder(tmp_path)
    images, others = groups.split_folder([p.name for p in folder.iterdir()])
    group = ctrl.start_group(
        groups.batch(str(folder), images, others, {"preset": "fast"}, (0,) * 3)
    )
    tick_until(ctrl, lambda: group.items[0].state == "running")
    log = draw(bpy.types.TRELLIS2_PT_main, bpy.context)
    (bar,) = _bars(log)  # one line for the whole batch, none per job
    assert bar["text"].startswith("Batch props shelf: 0 of 4 done")
    assert "trellis2.cancel_group" in operators_in(log)
    assert bpy.ops.trellis2.cancel_group(group=group.key) == {"FINISHED"}
    tick_until(ctrl, lambda: group.ended)
    assert group.items[0].state == "cancelled" and group.items[-1].error.startswith("cancelled")
    log = json.loads(Path(group.log_path).read_text())
    assert log["state"] == "cancelled" and log["counts"]["cancelled"] >= 3
    assert ctrl.active_jobs() == [] and ctrl.active_groups() == []


def test_a_batch_waits_for_room_in_the_queue_instead_of_failing(scene, ctrl, tmp_path, monkeypatch):
    _slow(ctrl)
    monkeypatch.setattr(submodule("controller"), "QUEUE_LIMIT", 1)  # full with one job
    groups = submodule("groups")
    folder = _batch_folder(tmp_path)
    images = ["mug.png", "robot.png", "star_toy.png"]
    group = ctrl.start_group(groups.batch(str(folder), images, [], {"preset": "fast"}, (0,) * 3))
    tick_until(ctrl, lambda: group.items[0].state == "running")
    for _ in range(20):
        submodule("runtime").timer()
    assert [i.state for i in group.items] == ["running", "pending", "pending"]
    ctrl.cancel_group(group.key)
    tick_until(ctrl, lambda: group.ended)


def test_a_folder_without_images_is_refused(scene, ctrl, tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    scene.trellis2.batch_folder = str(tmp_path)
    with pytest.raises(RuntimeError, match="No images in"):  # an ERROR report raises here
        bpy.ops.trellis2.batch()
    assert ctrl.groups == {}
    scene.trellis2.batch_folder = ""
    with pytest.raises(RuntimeError, match="Choose a folder"):
        bpy.ops.trellis2.batch()


def test_rows_grids_and_folder_listings():
    groups = submodule("groups")
    row = groups.variations("x", b"", "x.png", [1, 2, 3, 4], {}, (1.0, 2.0, 3.0), spacing=2.0)
    assert [row.location(i) for i in range(4)] == [
        (-2.0, 2.0, 3.0),
        (0.0, 2.0, 3.0),
        (2.0, 2.0, 3.0),
        (4.0, 2.0, 3.0),
    ]
    grid = groups.batch("/f", list("abcde"), [], {}, (0.0, 0.0, 0.0), spacing=1.0)
    assert grid.columns == 3  # 5 images: 3 + 2
    assert [grid.location(i)[:2] for i in range(5)] == [
        (-1.0, 0.5),
        (0.0, 0.5),
        (1.0, 0.5),
        (-1.0, -0.5),
        (0.0, -0.5),
    ]
    names = ["b.PNG", ".hidden.png", "a.jpg", "notes.txt", "trellis2-batch-1.json", "c.webp"]
    assert groups.split_folder(names) == (["a.jpg", "b.PNG", "c.webp"], ["notes.txt"])


def test_a_batch_log_that_cannot_go_next_to_the_images_goes_to_the_temp_folder(tmp_path):
    groups = submodule("groups")
    gone = tmp_path / "gone"
    group = groups.batch(str(gone), ["a.png"], [], {}, (0.0, 0.0, 0.0))
    groups.write_log(group)
    assert Path(group.log_path).parent != gone and Path(group.log_path).is_file()
    assert str(gone) in group.log_error
    assert json.loads(Path(group.log_path).read_text())["images"][0]["state"] == "pending"
    Path(group.log_path).unlink()


# -- materials ---------------------------------------------------------------------------------


def _check_metallic_roughness(material):
    """TRELLIS.2's packing as Blender expects it: a non-colour texture, G to Roughness and B to
    Metallic through a Separate Color node, nothing in between."""
    bsdf = _bsdf(material)
    metal, metal_out = _source(bsdf.inputs["Metallic"])
    rough, rough_out = _source(bsdf.inputs["Roughness"])
    assert metal == rough and metal.type == "SEPARATE_COLOR"
    assert (metal_out, rough_out) == ("Blue", "Green")
    texture, _ = _source(metal.inputs[0])
    assert texture.type == "TEX_IMAGE"
    assert texture.image.colorspace_settings.name == "Non-Color"
    pixel = list(texture.image.pixels[:4])
    assert pixel[1] == pytest.approx(0.8, abs=0.01) and pixel[2] == pytest.approx(0.0, abs=0.01)
    colour, _ = _source(bsdf.inputs["Base Color"])
    assert colour.type == "TEX_IMAGE" and colour.image.colorspace_settings.name == "sRGB"
    return bsdf, colour


def test_an_opaque_model_imports_opaque_with_metallic_and_roughness(scene, ctrl):
    _image(scene.trellis2)
    assert bpy.ops.trellis2.generate() == {"FINISHED"}
    (material,) = bpy.data.objects["duck_on_grey"].data.materials
    bsdf, _ = _check_metallic_roughness(material)
    assert not bsdf.inputs["Alpha"].is_linked and bsdf.inputs["Alpha"].default_value == 1.0
    assert material.surface_render_method == "DITHERED"


def _see_through(tmp_path):
    from PIL import Image, ImageDraw

    image = Image.open(EXAMPLES / "star_toy.png").convert("RGBA")
    w, h = image.size
    alpha = image.getchannel("A")
    ImageDraw.Draw(alpha).rectangle((w * 0.35, h * 0.35, w * 0.65, h * 0.65), fill=150)
    image.putalpha(alpha)
    path = tmp_path / "glass_star.png"
    image.save(path)
    return path


def test_a_see_through_model_imports_blended(scene, ctrl, tmp_path):
    _image(scene.trellis2, _see_through(tmp_path))
    assert bpy.ops.trellis2.generate() == {"FINISHED"}
    (material,) = bpy.data.objects["glass_star"].data.materials
    bsdf, colour = _check_metallic_roughness(material)
    assert _source(bsdf.inputs["Alpha"]) == (colour, "Alpha")  # the base colour's own alpha
    assert material.surface_render_method == "BLENDED"


def test_a_cut_out_imports_with_an_alpha_clip(scene, ctrl, tmp_path):
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (256, 256), (70, 140, 60, 255))
    ImageDraw.Draw(image).ellipse((80, 80, 176, 176), fill=(0, 0, 0, 0))  # a hole
    image.save(tmp_path / "grille.png")
    _image(scene.trellis2, tmp_path / "grille.png")
    bpy.ops.mesh.primitive_plane_add(rotation=(1.5707963, 0.0, 0.0))  # facing the front (-Y)
    assert bpy.ops.trellis2.texture_mesh(result="APPLY") == {"FINISHED"}
    (material,) = bpy.context.object.data.materials
    bsdf, colour = _check_metallic_roughness(material)
    # The glTF importer's clip: Alpha = 1 - (alpha < cutoff).
    clip, _ = _source(bsdf.inputs["Alpha"])
    assert clip.type == "MATH" and clip.operation == "SUBTRACT"
    less, _ = _source(clip.inputs[1])
    assert less.type == "MATH" and less.operation == "LESS_THAN"
    assert less.inputs[1].default_value == pytest.approx(0.5)
    assert _source(less.inputs[0]) == (colour, "Alpha")
    assert material.surface_render_method == "DITHERED"


def test_alpha_for_opaque_models_is_only_for_old_results(scene, ctrl, rgba_glb):
    """The option wires alpha into a model that says OPAQUE (what the backend wrote before);
    a model with its own alpha mode is imported as it says either way."""
    props = scene.trellis2
    props.fix_alpha = True
    bpy.ops.trellis2.import_result(filepath=str(rgba_glb), name="old")
    bsdf = _bsdf(bpy.data.objects["old"].data.materials[0])
    assert bsdf.inputs["Alpha"].is_linked
    assert not type(props).bl_rna.properties["fix_alpha"].default  # off unless asked for
