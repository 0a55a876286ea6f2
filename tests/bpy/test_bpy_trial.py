"""What trying the extension as a new user found, one test each: impossible output folders,
a backend that cannot start, TRELLIS.2 failing to load, which engine runs, typed paths, import
into hidden collections, Stop during a job, where queued results land, bad input, doctor, the
preview engine's limits, an empty Render Result, Re-export without a backend, names."""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
from pathlib import Path

import pytest

bpy = pytest.importorskip("bpy")

from .conftest import EXAMPLE, ROOT, submodule  # noqa: E402
from .support import draw, labels_in, progress_in, tick_until  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.addon_engines import LOAD_HINT, LOAD_MESSAGE  # noqa: E402

pytestmark = pytest.mark.bpy
SLOW = "tests.cpu_engines:SlowEngine"


def texts(log) -> list[str]:
    return [text for text, _ in labels_in(log)]


@pytest.fixture
def engine(ctrl, monkeypatch):
    """Run a test engine: the operators' configuration follows it (the preferences' Engine
    lists only the real ones)."""

    def use(name: str, **options) -> None:
        config = dataclasses.replace(
            ctrl.config, engine=name, engine_options={k: str(v) for k, v in options.items()}
        )
        ctrl.configure(config)
        monkeypatch.setattr(submodule("operators"), "backend_config", lambda prefs: config)

    return use


# -- the output folder, the interpreter, the engine --------------------------------------------


@pytest.mark.parametrize("where", ["under a file", "/proc"])
def test_an_impossible_output_folder_is_refused_at_once(scene, ctrl, prefs, tmp_path, where):
    if where == "under a file":
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        prefs.output_dir, expected = str(blocker / "out"), "inside a file"
    else:
        prefs.output_dir, expected = "/proc/trellis2-output", "cannot write"
    scene.trellis2.filepath = str(EXAMPLE)
    assert not bpy.ops.trellis2.generate.poll()
    with pytest.raises(RuntimeError, match=expected):
        bpy.ops.trellis2.generate(mode="ASYNC")
    with pytest.raises(RuntimeError, match=f"Start failed: Output Directory: .*{expected}"):
        bpy.ops.trellis2.backend(action="START", mode="ASYNC")  # an ERROR report raises here
    assert ctrl.state == "stopped" and not ctrl.jobs  # never "starting" with no process
    log = draw(bpy.types.TRELLIS2_PT_main, bpy.context)
    assert any(t.startswith("Output Directory:") and expected in t for t in texts(log))
    assert not (tmp_path / "a-file" / "out").exists() and not Path("/proc/trellis2-output").exists()


def test_a_backend_that_cannot_start_fails_waiting_jobs_that_are_never_sent(scene, ctrl):
    good = ctrl.config
    ctrl.configure(dataclasses.replace(good, python="/nonexistent/python3"))
    view = ctrl.submit(EXAMPLE.read_bytes(), {"preset": "fast"}, "duck")
    tick_until(ctrl, lambda: ctrl.state == "dead")
    submodule("runtime").timer()
    assert view.state == "failed" and "cannot run the backend interpreter" in view.message
    assert "/nonexistent/python3" in ctrl.last_error
    assert not bpy.ops.trellis2.generate.poll()  # nothing piles up behind a dead backend
    ctrl.configure(good)
    ctrl.start(wait=True, timeout=60)
    for _ in range(10):
        submodule("runtime").timer()
    assert ctrl.history_blocking() == []  # the failed Generate never reached a backend
    assert view.state == "failed" and len(ctrl.jobs) == 1


def test_trellis2_failing_to_load_shows_the_reason_and_the_fix(scene, ctrl, engine):
    engine("tests.addon_engines:FailLoadEngine")
    ctrl.start()
    tick_until(ctrl, lambda: ctrl.state == "dead")
    assert ctrl.last_error == f"the engine failed to load: {LOAD_MESSAGE}"
    assert ctrl.last_hint == LOAD_HINT
    found = labels_in(draw(bpy.types.TRELLIS2_PT_main, bpy.context))
    assert (ctrl.last_error, "ERROR") in found and (LOAD_HINT, "INFO") in found
    assert not any("failed to load: the engine failed to load" in t for t, _ in found)


def test_the_status_names_the_running_engine_and_settings_waiting_for_a_restart(
    scene, ctrl, prefs, capfd
):
    scene.trellis2.filepath, scene.trellis2.preset = str(EXAMPLE), "fast"
    bpy.ops.trellis2.backend(action="START")
    found = texts(draw(bpy.types.TRELLIS2_PT_main, bpy.context))
    assert "Backend: ready - Preview (no GPU)" in found
    assert "Preview engine: seed, steps and guidance do not affect it" in found
    prefs.engine = "trellis2"
    assert ctrl.config_changed
    found = texts(draw(bpy.types.TRELLIS2_PT_main, bpy.context))
    assert "Backend: ready - Preview (no GPU)" in found  # what runs, not what is set
    assert "Settings changed: they wait for a Restart" in found
    assert "Running: Preview (no GPU); after Restart: TRELLIS.2" in found
    assert "Generate runs on Preview (no GPU) until a Restart" in found
    capfd.readouterr()
    assert bpy.ops.trellis2.generate(mode="ASYNC") == {"FINISHED"}
    out = capfd.readouterr().out
    assert "Runs on Preview (no GPU): the new settings (TRELLIS.2) apply after a Restart" in out
    (view,) = ctrl.jobs.values()
    assert view.engine == "Preview (no GPU)"
    tick_until(ctrl, lambda: view.terminal)
    assert view.state == "done"


def test_tilde_and_relative_paths_are_expanded_and_no_tilde_folder_appears(
    scene, ctrl, prefs, tmp_path, monkeypatch
):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    prefs.output_dir = "~/trellis-out"
    prefs.weights_dir = "models/weights"
    prefs.trellis_checkout = "~/TRELLIS.2"
    config = submodule("preferences").backend_config(prefs)
    assert config.output_dir == home / "trellis-out"
    assert config.engine_options["weights_dir"] == str(home / "models" / "weights")
    assert config.engine_options["trellis_checkout"] == str(home / "TRELLIS.2")
    path_setting = submodule("preferences").path_setting  # `//`: next to the .blend, or home
    assert path_setting("//models") == str(home / "models")
    prefs.python = "~/no-python-here"
    assert submodule("preferences").backend_config(prefs).python == str(home / "no-python-here")
    prefs.python = ""
    ctrl.configure(submodule("preferences").backend_config(prefs))
    ctrl.start(wait=True, timeout=60)
    assert (home / "trellis-out").is_dir()  # the backend took the expanded folder
    assert (home / "trellis-out" / "owner.lock").is_file()
    assert not (tmp_path / "~").exists() and not (Path.cwd() / "~").exists()


# -- import -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["excluded", "hidden"])
def test_import_into_an_excluded_or_hidden_collection(scene, ctrl, rgba_glb, how):
    coll = bpy.data.collections.new("TRELLIS.2")
    scene.collection.children.link(coll)
    layer = bpy.context.view_layer.layer_collection.children["TRELLIS.2"]
    if how == "excluded":
        layer.exclude = True
    else:
        layer.hide_viewport = True
        coll.hide_viewport = coll.hide_select = True
    assert bpy.ops.trellis2.import_result(filepath=str(rgba_glb), name="box") == {"FINISHED"}
    obj = bpy.data.objects["box"]
    assert obj.users_collection[0] == coll
    assert obj.visible_get() and obj.select_get()
    assert bpy.context.view_layer.objects.active == obj


def test_a_failing_import_leaves_nothing_half_imported(scene, ctrl, rgba_glb, monkeypatch):
    before = {k: set(getattr(bpy.data, k)) for k in ("objects", "meshes", "materials", "images")}

    def broken(material):
        raise RuntimeError("the alpha fix broke")

    monkeypatch.setattr(submodule("importer"), "fix_alpha", broken)
    scene.trellis2.fix_alpha = True
    with pytest.raises(RuntimeError, match="Import failed: the alpha fix broke"):
        bpy.ops.trellis2.import_result(filepath=str(rgba_glb), name="box")
    for kind, blocks in before.items():
        assert set(getattr(bpy.data, kind)) == blocks, kind


def test_imports_are_named_after_the_job_and_can_rest_on_the_cursor(scene, ctrl, rgba_glb):
    props = scene.trellis2
    props.at_cursor, props.rest_on_cursor, props.use_scale = True, True, False
    scene.cursor.location = (1.0, 2.0, 3.0)
    assert bpy.ops.trellis2.import_result(filepath=str(rgba_glb), name="mug") == {"FINISHED"}
    obj = bpy.data.objects["mug"]
    assert obj.data.name == "mug"
    (material,) = [s.material for s in obj.material_slots]
    assert material.name == "mug"
    images = [n.image for n in material.node_tree.nodes if n.type == "TEX_IMAGE"]
    assert images and all(i.name.startswith("mug_texture") for i in images)
    bpy.context.view_layer.update()
    lowest = min((obj.matrix_world @ v.co).z for v in obj.data.vertices)
    assert lowest == pytest.approx(3.0, abs=1e-5)  # the bottom rests on the cursor
    assert tuple(obj.location)[:2] == pytest.approx((1.0, 2.0))
    props.rest_on_cursor = False
    assert bpy.ops.trellis2.import_result(filepath=str(rgba_glb), name="mug") == {"FINISHED"}
    centred = bpy.context.view_layer.objects.active
    assert tuple(centred.location) == pytest.approx((1.0, 2.0, 3.0))


# -- jobs ---------------------------------------------------------------------------------------


def test_stop_during_a_job_shows_it_waiting_for_the_next_backend(scene, ctrl, engine):
    engine(SLOW, steps=40, step_seconds=0.05)
    scene.trellis2.filepath, scene.trellis2.auto_import = str(EXAMPLE), False
    ctrl.start(wait=True, timeout=60)
    bpy.ops.trellis2.generate(mode="ASYNC")
    (view,) = ctrl.jobs.values()
    tick_until(ctrl, lambda: view.state == "running" and view.fraction > 0)
    assert bpy.ops.trellis2.backend(action="STOP", mode="ASYNC") == {"FINISHED"}
    assert view.state == "waiting" and view.label == "Waiting for the next backend"
    assert view.fraction == 0.0
    log = draw(bpy.types.TRELLIS2_PT_main, bpy.context)
    assert not progress_in(log)  # no running bar for a job that does not run
    assert ("duck_on_grey: Waiting for the next backend", "SORTTIME") in labels_in(log)
    tick_until(ctrl, lambda: ctrl.state == "stopped")
    assert view.state == "waiting"
    bpy.ops.trellis2.backend(action="START", mode="ASYNC")
    tick_until(ctrl, lambda: view.terminal, timeout=90)
    assert view.state == "done"  # the next backend ran it


def test_a_job_whose_backend_dies_twice_ends_failed_though_its_events_are_missed(
    scene, ctrl, engine, monkeypatch
):
    """The backend that starts after a death settles the job it finds running (here: it ran
    once more, so it fails with backend_died) and says so in events that go out before anyone
    listens. Every backend job event is dropped here: the add-on still learns the outcome by
    asking `job` once a new backend answers."""
    monkeypatch.setenv("SLOW_ENGINE_EXIT_AT", "shape")  # every backend dies in this stage
    monkeypatch.setenv("SLOW_ENGINE_EXIT_CODE", "75")
    # Its first stage lasts longer than a heartbeat (<= 1 s): the supervisor sees each backend
    # run the job even when that backend's job_started went out before it subscribed (with
    # 0.1 s it missed the second run one time in five).
    engine(SLOW, steps=3, step_seconds=0.5)
    scene.trellis2.filepath, scene.trellis2.auto_import = str(EXAMPLE), False
    ctrl.start(wait=True, timeout=60)
    apply, dropped, retried = ctrl.apply, [], []

    def deaf(message):
        msg_type = getattr(message, "msg_type", "")
        if msg_type in ("job_queued", "job_failed", "job_cancelled", "job_done"):
            dropped.append(msg_type)
            return None
        if msg_type == "supervisor_job_retried":
            retried.append(message.content["job_id"])
        return apply(message)

    monkeypatch.setattr(ctrl, "apply", deaf)
    bpy.ops.trellis2.generate(mode="ASYNC")
    (view,) = ctrl.jobs.values()
    tick_until(ctrl, lambda: view.terminal, timeout=90)
    assert view.state == "failed", (view.state, view.message)
    assert "died twice" in view.message and "poisoned" in view.message
    assert retried == [view.job_id, view.job_id]  # the supervisor saw it die twice
    assert len(ctrl.sessions) >= 3  # the third backend settled it


def test_cancel_with_no_backend_ends_the_job_cancelled_at_once(scene, ctrl, engine):
    """Stopped: the backend's own `cancel` command runs (never a write from Blender), and
    the job shows cancelled without a backend being started for it."""
    engine(SLOW, steps=40, step_seconds=0.05)
    scene.trellis2.filepath, scene.trellis2.auto_import = str(EXAMPLE), False
    ctrl.start(wait=True, timeout=60)
    bpy.ops.trellis2.generate(mode="ASYNC")
    (view,) = ctrl.jobs.values()
    tick_until(ctrl, lambda: view.state == "running")
    bpy.ops.trellis2.backend(action="STOP", mode="ASYNC")
    tick_until(ctrl, lambda: ctrl.state == "stopped" and not ctrl.supervisor.stopping)
    assert view.state == "waiting"
    assert bpy.ops.trellis2.cancel(job_id=view.key) == {"FINISHED"}
    tick_until(ctrl, lambda: view.terminal, timeout=30)
    assert view.state == "cancelled" and ctrl.state == "stopped"
    ctrl.start(wait=True, timeout=60)  # the next backend: it stays cancelled, never runs
    entry = ctrl.job_entry_blocking(view.job_id)
    assert entry is not None and entry["state"] == "cancelled"


def test_queued_results_land_where_the_cursor_was_at_generate(scene, ctrl):
    props = scene.trellis2
    props.filepath, props.preset, props.at_cursor = str(EXAMPLE), "fast", True
    ctrl.start(wait=True, timeout=60)
    spots = [(1.0, 0.0, 0.0), (0.0, 5.0, 0.0)]
    for spot in spots:
        scene.cursor.location = spot
        assert bpy.ops.trellis2.generate(mode="ASYNC") == {"FINISHED"}
    scene.cursor.location = (9.0, 9.0, 9.0)  # moved on while the jobs queue
    views = list(ctrl.jobs.values())
    tick_until(ctrl, lambda: all(v.imported for v in views), timeout=90)
    placed = sorted(
        tuple(round(x, 5) for x in o.location) for o in bpy.data.objects if "trellis2_job" in o
    )
    assert placed == sorted(spots)


def test_bad_input_fails_the_job_keeps_the_backend_and_shows_why(scene, ctrl, engine):
    engine("tests.addon_engines:FailJobEngine", code="empty_alpha")
    scene.trellis2.filepath = str(EXAMPLE)
    ctrl.start(wait=True, timeout=60)
    pid, session = ctrl.status()["pid"], ctrl.status()["session"]
    bpy.ops.trellis2.generate(mode="ASYNC")
    (view,) = ctrl.jobs.values()
    tick_until(ctrl, lambda: view.terminal)
    for _ in range(10):  # a respawn would start now
        submodule("runtime").timer()
    assert view.state == "failed" and "empty_alpha" in view.message
    assert ctrl.state == "ready" and ctrl.status()["pid"] == pid
    assert ctrl.status()["session"] == session
    found = labels_in(draw(bpy.types.TRELLIS2_PT_main, bpy.context))
    assert ("duck_on_grey: failed", "ERROR") in found  # the main panel, not only the history
    assert (view.message, "ERROR") in found and (view.hint, "INFO") in found
    assert view.hint  # the error code's fix


def test_reexport_starts_the_backend_like_generate(scene, ctrl):
    scene.trellis2.filepath, scene.trellis2.preset = str(EXAMPLE), "fast"
    scene.trellis2.texture_size = "512"
    bpy.ops.trellis2.generate(mode="BLOCKING")
    (done,) = ctrl.history_blocking()
    bpy.ops.trellis2.backend(action="STOP")
    assert ctrl.state == "stopped"
    assert bpy.ops.trellis2.reexport(job_id=done["job_id"]) == {"FINISHED"}
    view = list(ctrl.jobs.values())[-1]
    assert view.kind == "reexport" and ctrl.state in ("starting", "loading", "ready")
    tick_until(ctrl, lambda: view.terminal, timeout=90)
    assert view.state == "done" and view.imported
    latest = ctrl.history_blocking()[0]
    assert latest["kind"] == "reexport" and latest["parent"] == done["job_id"]
    assert latest["label"] == f"duck_on_grey (re-export of {done['job_id']})"


# -- doctor, preview engine, render result ----------------------------------------------------


def test_doctor_on_the_preview_engine_is_healthy_with_trellis2_items_optional(scene, ctrl):
    assert bpy.ops.trellis2.doctor() == {"FINISHED"}  # waits in background mode
    report = ctrl.doctor.report
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] and checks["preview engine"]["ok"]
    assert checks["weights"]["optional"] and checks["output folder"]["ok"]
    assert {"pyzmq", "Pillow", "numpy"} <= set(checks)
    found = texts(draw(bpy.types.TRELLIS2_PT_backend, bpy.context))
    assert any(t.startswith("TRELLIS.2 only (optional") for t in found)
    assert not any("TRELLIS2_" in t or "--engine-opt" in t for t in found)


def test_no_traceback_reaches_the_panel(scene, ctrl, prefs, tmp_path):
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\necho 'Traceback (most recent call last):'\n"
        "echo '  File \"<frozen runpy>\", line 198, in _run_module_as_main'\n"
        "echo \"ModuleNotFoundError: No module named 'zmq'\"\nexit 1\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    prefs.python = str(fake)
    bpy.ops.trellis2.doctor()
    assert ctrl.doctor.text.endswith("ModuleNotFoundError: No module named 'zmq'")
    found = texts(draw(bpy.types.TRELLIS2_PT_backend, bpy.context))
    assert found and not any("Traceback" in t or "File " in t for t in found)


def test_an_empty_render_result_disables_generate_with_a_reason(scene, ctrl):
    scene.render.engine = "CYCLES"
    scene.cycles.samples = 1
    scene.render.resolution_x = scene.render.resolution_y = 32
    bpy.ops.object.camera_add()
    scene.camera = bpy.context.object
    bpy.ops.render.render()
    scene.trellis2.source = "RENDER"
    assert bpy.ops.trellis2.generate.poll()
    submodule("runtime")._on_load_post()  # as when a .blend is opened: no pixels behind it
    assert not bpy.ops.trellis2.generate.poll()
    with pytest.raises(RuntimeError, match="Render Result is empty"):
        bpy.ops.trellis2.generate(mode="ASYNC")
    bpy.ops.render.render()
    assert bpy.ops.trellis2.generate.poll()


def test_the_input_thumbnail_is_loaded_when_chosen_not_while_drawing(scene, ctrl):
    runtime = submodule("runtime")
    path = str(EXAMPLE.with_name("mug.png"))
    runtime.forget_icon(path)
    scene.trellis2.filepath = path
    assert path in runtime._previews  # the update callback loaded it
    assert os.path.isfile(path)
