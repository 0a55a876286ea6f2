"""The add-on inside real Blender (bpy from PyPI), loaded as an extension: panel, generate end to
end through a real backend process, import, cancel, restart, history, image sources."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

bpy = pytest.importorskip("bpy")

from .conftest import EXAMPLE, MODULE, ROOT, submodule  # noqa: E402
from .support import FakeLayout, draw, operators_in, props_in, tick_until  # noqa: E402

pytestmark = pytest.mark.bpy


# -- registration and UI --------------------------------------------------------------------


def test_extension_registers_sidebar_tab_and_preferences(addon, prefs):
    assert MODULE in bpy.context.preferences.addons
    panel = bpy.types.TRELLIS2_PT_main
    assert (panel.bl_space_type, panel.bl_region_type, panel.bl_category) == (
        "VIEW_3D",
        "UI",
        "TRELLIS.2",
    )
    assert prefs.engine == "preview" and prefs.python == ""  # zero-setup default
    assert bpy.app.timers.is_registered(submodule("runtime").timer)


def test_the_sidebar_offers_exactly_what_the_backend_accepts(scene):
    """Choices and bounds come from backend.params: nothing offered is refused (a texture of
    256 px used to be accepted but not offered; face limits differed)."""
    params = sys.modules[f"{MODULE}.backend.params"]
    settings = type(scene.trellis2).bl_rna.properties

    def enum(name):
        return [item.identifier for item in settings[name].enum_items]

    assert enum("texture_size") == [str(s) for s in params.TEXTURE_SIZES]
    assert enum("resolution") == [str(r) for r in params.RESOLUTIONS]
    assert enum("preset") == list(params.PRESETS)
    for name in ("decimation_target", "steps_scale", "image_size", "remesh_band"):
        low, high = params.limits(name)
        assert (settings[name].hard_min, settings[name].hard_max) == pytest.approx((low, high))
    # what the advanced settings send is a request the backend takes as it is
    props = scene.trellis2
    props.use_advanced, props.texture_size, props.remesh_band = True, "256", 0.5
    sent = submodule("properties").params_from(props, 7)
    assert params.parse_params(sent).texture_size == 256
    assert params.parse_params(sent).remesh_band == 0.5
    props.use_advanced = False


def test_panels_draw_generate_source_seed_and_history(scene, ctrl, prefs):
    props = scene.trellis2
    props.filepath = str(EXAMPLE)
    log = draw(bpy.types.TRELLIS2_PT_main, bpy.context)
    assert "trellis2.generate" in operators_in(log)
    assert {"source", "filepath", "preset", "seed", "random_seed", "engine"} <= set(props_in(log))
    # The input thumbnail is loaded (background mode hands out no icon ids, so it isn't drawn).
    previews = submodule("runtime")._previews
    assert str(EXAMPLE) in previews and previews[str(EXAMPLE)].image_size[:] == (256, 256)
    for cls in ("advanced", "import", "backend"):
        assert draw(getattr(bpy.types, f"TRELLIS2_PT_{cls}"), bpy.context)
    assert "fix_alpha" in props_in(draw(bpy.types.TRELLIS2_PT_import, bpy.context))
    history = draw(bpy.types.TRELLIS2_PT_history, bpy.context)
    assert history  # "No jobs yet" or entries
    preferences = []
    prefs.draw.__func__(
        SimpleNamespace(
            layout=FakeLayout(preferences),
            **{k: getattr(prefs, k) for k in ("python", "respawn", "every_n", "backend")},
        ),
        bpy.context,
    )
    assert {"trellis2.backend", "trellis2.open_log", "trellis2.doctor"} <= set(
        operators_in(preferences)
    )


def test_disabled_generate_says_why(scene, ctrl):
    scene.trellis2.source = "FILE"
    scene.trellis2.filepath = ""
    assert not bpy.ops.trellis2.generate.poll()
    with pytest.raises(RuntimeError, match="Choose an image file"):
        bpy.ops.trellis2.generate()
    scene.trellis2.source = "RENDER"
    with pytest.raises(RuntimeError, match="Render Result"):
        bpy.ops.trellis2.generate()
    scene.trellis2.source = "CLIPBOARD"
    with pytest.raises(RuntimeError, match="Paste"):
        bpy.ops.trellis2.generate()
    with pytest.raises(RuntimeError, match="background mode"):
        bpy.ops.trellis2.paste_clipboard()


# -- generate end to end --------------------------------------------------------------------


def test_generate_async_through_a_real_backend_imports_at_the_cursor(scene, ctrl):
    props = scene.trellis2
    props.filepath = str(EXAMPLE)
    props.preset = "fast"
    props.random_seed = True
    scene.cursor.location = (1.0, 2.0, 3.0)
    assert ctrl.state == "stopped"

    # Returns before the backend is up; the job waits for it.
    assert bpy.ops.trellis2.generate(mode="ASYNC") == {"FINISHED"}
    (view,) = ctrl.jobs.values()
    assert view.state == "waiting" and props.last_seed >= 0
    fractions = []

    def finished():
        current = next(iter(ctrl.jobs.values()))
        fractions.append(current.fraction)
        return current.terminal

    intervals = tick_until(ctrl, finished)
    view = next(iter(ctrl.jobs.values()))
    assert view.state == "done", view.message
    assert view.seed == props.last_seed  # the seed used is recorded
    assert 0.1 in intervals  # busy cadence while the job ran
    assert any(0 < f < 1 for f in fractions)  # progress was reported on the way
    obj = bpy.data.objects["duck_on_grey"]
    assert obj.type == "MESH" and obj["trellis2_job"] == view.job_id
    assert [c.name for c in obj.users_collection] == ["TRELLIS.2"]
    assert tuple(round(v, 5) for v in obj.location) == (1.0, 2.0, 3.0)
    assert obj.select_get() and bpy.context.view_layer.objects.active == obj
    # Idle cadence afterwards, once the history refresh the outcome asked for is answered: the
    # backend reads the store on its reader threads, so that reply may follow the result's.
    tick_until(ctrl, lambda: not ctrl._requests, timeout=10.0)
    assert submodule("runtime").timer() == 0.5

    history = ctrl.history_blocking()
    assert history[0]["job_id"] == view.job_id and history[0]["seed"] == props.last_seed
    log = draw(bpy.types.TRELLIS2_PT_history, bpy.context)
    assert {"trellis2.import_result", "trellis2.reexport", "trellis2.regenerate"} <= set(
        operators_in(log)
    )


def test_blocking_generate_for_background_scripts(scene, ctrl):
    scene.trellis2.filepath = str(EXAMPLE)
    scene.trellis2.preset = "fast"
    scene.trellis2.random_seed = False
    scene.trellis2.seed = 1234
    assert bpy.ops.trellis2.generate() == {"FINISHED"}  # AUTO blocks in background mode
    (view,) = [v for v in ctrl.jobs.values() if v.seed == 1234]
    assert view.state == "done" and Path(view.glb_path).is_file()
    assert "duck_on_grey" in bpy.data.objects


def test_cancel_a_queued_job(scene, ctrl):
    ctrl.start(wait=True, timeout=60)
    image = EXAMPLE.read_bytes()
    first = ctrl.submit(image, {"preset": "high", "seed": 1}, "first", auto_import=False)
    second = ctrl.submit(image, {"preset": "fast", "seed": 2}, "second", auto_import=False)
    tick_until(ctrl, lambda: second.job_id)  # the backend named it
    assert bpy.ops.trellis2.cancel(job_id=second.job_id) == {"FINISHED"}
    tick_until(ctrl, lambda: first.terminal and second.terminal)
    assert second.state == "cancelled"
    assert first.state == "done"


def test_restart_from_preferences_gives_a_new_backend_session(scene, ctrl):
    bpy.ops.trellis2.backend(action="START")
    before = ctrl.status()
    assert before["state"] == "ready" and before["session"]
    bpy.ops.trellis2.backend(action="RESTART")
    after = ctrl.status()
    assert after["state"] == "ready"
    assert after["session"] != before["session"] and after["pid"] != before["pid"]
    bpy.ops.trellis2.backend(action="STOP")
    assert ctrl.state == "stopped"
    from backend.procutil import pid_alive

    assert not pid_alive(after["pid"])  # no orphan backend


def test_history_survives_a_blender_restart(scene, ctrl):
    scene.trellis2.filepath, scene.trellis2.preset = str(EXAMPLE), "fast"
    assert bpy.ops.trellis2.generate(mode="BLOCKING") == {"FINISHED"}
    expected = ctrl.history_blocking()[0]
    ctrl.shutdown()
    script = f"""
import sys, json
sys.path.insert(0, {str(ROOT / "tests" / "bpy")!r})
import conftest
import bpy
bpy.context.preferences.extensions.repos.new(name=conftest.REPO, module=conftest.REPO,
    custom_directory=str(conftest.EXT_REPO_DIR), source="USER")
bpy.ops.preferences.addon_enable(module=conftest.MODULE)
ctrl = sys.modules[conftest.MODULE + ".blender_addon.runtime"].get()
bpy.ops.trellis2.backend(action="START")  # the backend keeps the history (blocks: -b)
print("HISTORY" + json.dumps(ctrl.history_blocking()))
ctrl.shutdown()
"""
    env = dict(os.environ, TRELLIS2_TEST_OUTPUT_DIR=os.environ["TRELLIS2_OUTPUT_DIR"])
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("HISTORY"))
    history = json.loads(line[len("HISTORY") :])
    again = next(e for e in history if e["job_id"] == expected["job_id"])
    assert again["glb_path"] == expected["glb_path"] and again["seed"] == expected["seed"]
    assert again["state"] == "done" and again["mesh_stats"]["faces"] > 0


# -- import ---------------------------------------------------------------------------------


def test_import_scales_places_and_fixes_alpha_in_one_undo_step(scene, ctrl, rgba_glb):
    props = scene.trellis2
    props.use_scale, props.scale_to, props.fix_alpha, props.at_cursor = True, 2.0, True, True
    scene.cursor.location = (0.0, 0.0, 5.0)
    bpy.ops.mesh.primitive_cube_add()
    bpy.ops.object.mode_set(mode="EDIT")  # import must switch to Object mode first
    assert bpy.ops.trellis2.import_result(filepath=str(rgba_glb), name="box") == {"FINISHED"}
    obj = bpy.data.objects["box"]
    assert bpy.context.mode == "OBJECT"
    assert max(obj.dimensions) == pytest.approx(2.0, rel=1e-4)
    assert tuple(obj.location) == pytest.approx((0.0, 0.0, 5.0))
    assert obj.users_collection[0].name == "TRELLIS.2"
    material = obj.material_slots[0].material
    bsdf = next(n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    assert bsdf.inputs["Alpha"].is_linked
    assert bsdf.inputs["Alpha"].links[0].from_node.type == "TEX_IMAGE"
    if hasattr(material, "surface_render_method"):
        assert material.surface_render_method == "DITHERED"
    assert [o for o in bpy.context.selected_objects] == [obj]


def test_import_without_alpha_fix_or_scaling_keeps_the_glb_as_is(scene, ctrl, rgba_glb):
    props = scene.trellis2
    props.use_scale, props.fix_alpha, props.at_cursor = False, False, False
    scene.cursor.location = (3.0, 3.0, 3.0)
    bpy.ops.trellis2.import_result(filepath=str(rgba_glb), name="plain")
    obj = bpy.data.objects["plain"]
    assert max(obj.dimensions) == pytest.approx(1.0, rel=1e-4)
    assert tuple(obj.location) == pytest.approx((0.0, 0.0, 0.0))
    bsdf = next(
        n for n in obj.material_slots[0].material.node_tree.nodes if n.type == "BSDF_PRINCIPLED"
    )
    assert not bsdf.inputs["Alpha"].is_linked


# -- image sources --------------------------------------------------------------------------


def _png_size(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.format, im.size


def test_image_datablock_source_sends_its_pixels(scene, ctrl):
    sources = submodule("sources")
    image = bpy.data.images.new("painted", 40, 30, alpha=True)
    scene.trellis2.source, scene.trellis2.image = "IMAGE", image
    data, name = sources.read(bpy.context, scene.trellis2)
    assert name == "painted" and _png_size(data) == ("PNG", (40, 30))
    loaded = bpy.data.images.load(str(EXAMPLE))
    scene.trellis2.image = loaded
    data, name = sources.read(bpy.context, scene.trellis2)
    assert data == EXAMPLE.read_bytes() and name == "duck_on_grey"  # the file itself


def _camera_scene(scene):
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 4
    scene.render.resolution_x, scene.render.resolution_y = 1920, 1080
    bpy.ops.mesh.primitive_cube_add()
    bpy.ops.object.camera_add(location=(6, -6, 4), rotation=(1.1, 0, 0.785))
    scene.camera = bpy.context.object


def test_camera_view_source_renders_small_and_restores_settings(scene, ctrl):
    sources = submodule("sources")
    _camera_scene(scene)
    scene.trellis2.source, scene.trellis2.camera_size = "CAMERA", 160
    data, name = sources.read(bpy.context, scene.trellis2)
    assert _png_size(data) == ("PNG", (160, 90)) and name == "Camera"
    assert (scene.render.resolution_x, scene.render.film_transparent) == (1920, False)


def test_render_result_source(scene, ctrl):
    sources = submodule("sources")
    _camera_scene(scene)
    scene.render.resolution_percentage = 5
    bpy.ops.render.render()
    scene.trellis2.source = "RENDER"
    data, name = sources.read(bpy.context, scene.trellis2)
    assert _png_size(data) == ("PNG", (96, 54)) and name == "render"
