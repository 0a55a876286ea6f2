"""A built zip installs into Blender like a user's download and brings its own pyzmq."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytest.importorskip("bpy")

from .conftest import EXT_ID, ROOT  # noqa: E402

pytestmark = [pytest.mark.bpy, pytest.mark.slow]

INSTALL = """
import json, sys, glob, os
import bpy, addon_utils
zip_path = sys.argv[1]
result = bpy.ops.extensions.package_install_files(
    filepath=zip_path, repo="user_default", enable_on_install=True)
module = "bl_ext.user_default.{ext}"
enabled = module in bpy.context.preferences.addons
ctrl = sys.modules[module + ".blender_addon.runtime"].get()
site = glob.glob(os.path.join(os.environ["BLENDER_USER_RESOURCES"], "**", ".local", "lib",
                 "python*", "site-packages"), recursive=True)
print("RESULT" + json.dumps({{"result": sorted(result), "enabled": enabled,
    "controller": ctrl is not None, "site": site}}))
""".format(ext=EXT_ID)  # noqa: UP032 - the script has its own braces


def test_built_zip_installs_and_imports_zmq_from_its_bundled_wheels(tmp_path):
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("the test builds the linux-x64 zip")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    build = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "build_extension"),
            "--platform",
            "linux-x64",
            "--python",
            python,
            "--out-dir",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0 and "pip" in build.stderr and "download" in build.stderr.lower():
        pytest.skip(f"wheels could not be downloaded: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-2000:]
    (zip_path,) = (tmp_path / "dist").glob("*.zip")

    env = dict(
        os.environ,
        BLENDER_USER_RESOURCES=str(tmp_path / "user"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    out = subprocess.run(
        [sys.executable, "-c", INSTALL, str(zip_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    info = json.loads(line[len("RESULT") :])
    assert info["result"] == ["FINISHED"] and info["enabled"] and info["controller"]
    (site,) = info["site"]
    # No site-packages of this venv (-S): zmq and PIL must come from the zip's wheels.
    probe = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import zmq, PIL.Image; "
            "print(zmq.__file__); print(zmq.zmq_version())",
            site,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[0].startswith(site)
