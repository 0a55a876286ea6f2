"""The Doctor button runs the command `backend.supervision.commands` builds, with this copy of
the backend first on the child's path, and refuses a studio server with a reason (no process
started)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

bpy = pytest.importorskip("bpy")

from .conftest import MODULE, ROOT, submodule  # noqa: E402

pytestmark = pytest.mark.bpy


def test_the_doctor_command_is_the_one_backend_commands_builds(addon):
    commands = sys.modules[f"{MODULE}.backend.supervision.commands"]
    config = submodule("launch").BackendConfig(
        python="/opt/py",
        engine="trellis2",
        engine_options={"weights_dir": "/w", "trellis_checkout": "/c"},
        output_dir=Path("/o"),
    )
    args, env = submodule("doctor").doctor_command(config)
    assert args == commands.doctor_command(
        "/opt/py",
        output_dir=Path("/o"),
        engine="trellis2",
        engine_options={"weights_dir": "/w", "trellis_checkout": "/c"},
        for_blender=True,
    )
    assert args[:4] == ["/opt/py", "-m", "backend", "doctor"] and "--for-blender" in args
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)  # this copy's backend


def test_blenders_own_python_gets_the_bundled_wheels_on_its_path(addon):
    launch = submodule("launch")
    _, env = submodule("doctor").doctor_command(launch.BackendConfig())
    path = env["PYTHONPATH"].split(os.pathsep)
    assert path[0] == str(ROOT) and set(launch.bundled_site_dirs()) <= set(path)


def test_doctor_refuses_a_studio_server_without_starting_anything(addon):
    doctor = submodule("doctor").Doctor()
    doctor.start(submodule("launch").BackendConfig(where="REMOTE", connection="x"))
    assert not doctor.running and doctor.text == submodule("doctor").REMOTE
    assert doctor.report is None and not doctor.poll()
