"""Blender-as-a-module fixtures: the repository loaded as a real extension (a local extensions
repository pointing at it), isolated user resources and caches. Skips without `bpy`."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXT_ID = "trellis2_blender"
REPO = "trellis2_dev"
MODULE = f"bl_ext.{REPO}.{EXT_ID}"
EXAMPLE = ROOT / "examples" / "duck_on_grey.png"

HAVE_BPY = importlib.util.find_spec("bpy") is not None
if HAVE_BPY and "bpy" not in sys.modules:
    # Before `import bpy`: Blender reads these once. Nothing touches the user's real config.
    _TMP = Path(tempfile.mkdtemp(prefix="trellis2-bpy-"))
    os.environ["BLENDER_USER_RESOURCES"] = str(_TMP / "user")
    os.environ["XDG_CACHE_HOME"] = str(_TMP / "cache")
    out = os.environ.get("TRELLIS2_TEST_OUTPUT_DIR")  # a second process reading the same jobs
    os.environ["TRELLIS2_OUTPUT_DIR"] = out or str(_TMP / "out")
    (_TMP / "repo").mkdir()
    # The repository folder may have any name; Blender needs the extension id as folder name.
    os.symlink(ROOT, _TMP / "repo" / EXT_ID)
    EXT_REPO_DIR = _TMP / "repo"


def pytest_ignore_collect(collection_path, config):
    if not HAVE_BPY and collection_path.name.startswith("test_"):
        return True  # the normal venv has no bpy: these tests do not apply there
    return None


@pytest.fixture(scope="session")
def addon():
    """The extension, enabled through a local extensions repository (as users get it)."""
    import bpy

    prefs = bpy.context.preferences
    if prefs.extensions.repos.get(REPO) is None:
        prefs.extensions.repos.new(
            name=REPO, module=REPO, custom_directory=str(EXT_REPO_DIR), source="USER"
        )
    bpy.ops.preferences.addon_enable(module=MODULE)
    module = sys.modules[MODULE]
    yield module
    bpy.ops.preferences.addon_disable(module=MODULE)


PREF_FIELDS = (
    "python",
    "engine",
    "trellis_checkout",
    "weights_dir",
    "output_dir",
    "respawn",
    "backend",
    "connection",
)


@pytest.fixture
def prefs(addon):
    """The add-on's preferences; whatever a test changes is put back afterwards."""
    import bpy

    prefs = bpy.context.preferences.addons[MODULE].preferences
    saved = {name: getattr(prefs, name) for name in PREF_FIELDS}
    yield prefs
    for name, value in saved.items():
        if getattr(prefs, name) != value:
            setattr(prefs, name, value)


@pytest.fixture
def ctrl(addon, prefs):
    """The add-on's controller; its backend is stopped (waiting for it) after each test and
    the session's jobs, history and errors are forgotten."""
    from importlib import import_module

    runtime = import_module(f"{MODULE}.blender_addon.runtime")
    preferences = import_module(f"{MODULE}.blender_addon.preferences")
    history = import_module(f"{MODULE}.blender_addon.history")
    controller = runtime.get()
    # tests/conftest.py points TRELLIS2_OUTPUT_DIR at a fresh folder per test: follow it.
    controller.configure(preferences.backend_config(preferences.get_prefs()))
    yield controller
    controller.shutdown(timeout=15)
    controller.jobs.clear()
    controller.groups.clear()
    controller._keys.clear()
    controller._outbox.clear()
    controller._requests.clear()
    controller._abandoned.clear()
    controller._downloading.clear()
    controller.supervisor_factory = import_module(f"{MODULE}.blender_addon.launch").make_supervisor
    controller.files.active.clear()
    controller.history = history.HistoryView()
    controller.last_error = controller.last_hint = ""
    controller.last_outcome = None
    controller.tick_errors.clear()
    controller._reported.clear()
    controller.doctor.forget()


@pytest.fixture
def scene(addon):
    """An empty scene (read_factory_settings would also drop the extension repository)."""
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)
    return bpy.context.scene


def submodule(name: str):
    return sys.modules[f"{MODULE}.blender_addon.{name}"]


@pytest.fixture(scope="session")
def rgba_glb(tmp_path_factory):
    """A textured GLB whose texture has alpha but whose material says OPAQUE (like TRELLIS.2)."""
    import numpy as np
    import trimesh
    from PIL import Image
    from trimesh.visual.material import PBRMaterial
    from trimesh.visual.texture import TextureVisuals

    mesh = trimesh.creation.box(extents=(0.5, 1.0, 0.25))
    uv = np.random.default_rng(0).random((len(mesh.vertices), 2))
    texture = Image.new("RGBA", (16, 16), (200, 50, 50, 128))
    material = PBRMaterial(baseColorTexture=texture, alphaMode="OPAQUE")
    mesh.visual = TextureVisuals(uv=uv, material=material)
    path = tmp_path_factory.mktemp("glb") / "box.glb"
    mesh.export(path)
    return path
