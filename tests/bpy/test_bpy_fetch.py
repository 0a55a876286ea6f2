"""The add-on speaks only the protocol, also to a backend on this machine: results,
thumbnails and inputs come through `fetch` into the add-on's download cache; no path the
backend names (`glb_path`, `thumbnail`, `input`, the job folder) is ever opened or looked at
by the Blender process. Every way Python touches a file is trapped for the job store while
the add-on generates, lists the history, imports from it and runs New Seed."""

from __future__ import annotations

import builtins
import io
import os

import pytest

bpy = pytest.importorskip("bpy")

from .conftest import EXAMPLE  # noqa: E402

pytestmark = [pytest.mark.bpy]


def trap_store(mp, jobs_dir, touched: list[str]) -> None:
    """Any open/stat/listing of a path inside the job store fails and is recorded (the
    backend runs in its own process, so only the add-on is trapped)."""
    roots = {os.path.realpath(jobs_dir) + os.sep, os.path.abspath(jobs_dir) + os.sep}

    def inside(path) -> bool:
        try:
            text = os.fsdecode(os.fspath(path))
        except TypeError:  # a file descriptor
            return False
        text = os.path.normpath(os.path.abspath(text)) + os.sep  # no lstat: it is trapped
        return any(text.startswith(root) for root in roots)

    def wrap(name, fn):
        def trapped(path, *args, **kwargs):
            if inside(path):
                touched.append(f"{name}({path})")
                raise PermissionError(f"the add-on opened the backend's {path}")
            return fn(path, *args, **kwargs)

        return trapped

    for owner, name in (
        (builtins, "open"),
        (io, "open"),
        (os, "open"),
        (os, "stat"),
        (os, "lstat"),
        (os, "listdir"),
        (os, "scandir"),
    ):
        mp.setattr(owner, name, wrap(f"{owner.__name__}.{name}", getattr(owner, name)))


def test_the_addon_never_opens_a_path_the_backend_names(scene, ctrl, monkeypatch):
    props = scene.trellis2
    props.filepath, props.preset = str(EXAMPLE), "fast"
    assert bpy.ops.trellis2.backend(action="START") == {"FINISHED"}
    jobs_dir = ctrl.config.output_dir / "jobs"
    touched: list[str] = []
    with monkeypatch.context() as mp:
        trap_store(mp, jobs_dir, touched)
        assert bpy.ops.trellis2.generate() == {"FINISHED"}  # waits in background mode
        first = bpy.context.view_layer.objects.active
        view = ctrl.find(first["trellis2_job"])
        backend_path = view.result["glb_path"]
        with pytest.raises(PermissionError):  # the trap works: the backend's path is closed
            open(backend_path, "rb")  # noqa: SIM115
        assert touched.pop().startswith("builtins.open")
        assert view.glb_path.startswith(str(ctrl.files.folder))

        entries = ctrl.history_blocking()
        newest = entries[0]
        assert newest["job_id"] == view.job_id and newest["thumbnail"].startswith(str(jobs_dir))
        for _ in range(200):  # the thumbnail comes within a few ticks
            if newest.get("thumbnail_file"):
                break
            ctrl.tick()
        assert newest["thumbnail_file"].startswith(str(ctrl.files.folder))

        before = set(bpy.data.objects)
        assert bpy.ops.trellis2.import_result(job_id=view.job_id) == {"FINISHED"}
        assert bpy.ops.trellis2.regenerate(job_id=view.job_id) == {"FINISHED"}
        assert bpy.ops.trellis2.wait() == {"FINISHED"}
        made = [o for o in bpy.data.objects if o not in before and o.type == "MESH"]
    assert touched == []
    jobs = [o["trellis2_job"] for o in made]
    assert view.job_id in jobs and len(jobs) == 2  # the re-import and the New Seed result
    assert all(ctrl.find(j) is None or ctrl.find(j).state == "done" for j in jobs)
    assert ctrl.tick_errors == []
