"""Operators: generate, cancel, import, re-export, regenerate, backend control, doctor, paste."""

from __future__ import annotations

import os
from pathlib import Path

import bpy
from bpy.props import EnumProperty, StringProperty

from . import runtime, sources
from .controller import random_seed
from .importer import import_glb
from .preferences import backend_config, get_prefs
from .properties import import_options, params_from

QUEUE_LIMIT = 8  # the backend's default queue depth


def _ctrl():
    return runtime.get()


def _refuse(cls, message: str) -> bool:
    cls.poll_message_set(message)
    return False


class TRELLIS2_OT_generate(bpy.types.Operator):
    """Generate a textured 3D model from the chosen image"""

    bl_idname = "trellis2.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER", "UNDO"}

    mode: EnumProperty(
        name="Mode",
        items=(
            ("AUTO", "Auto", "Wait for the result only in background mode (blender -b)"),
            ("ASYNC", "Async", "Return at once; the timer imports the result"),
            ("BLOCKING", "Blocking", "Wait for the result (scripts)"),
        ),
        default="AUTO",
        options={"SKIP_SAVE"},
    )

    @classmethod
    def poll(cls, context):
        ctrl = _ctrl()
        if ctrl is None:
            return _refuse(cls, "The add-on is not running (re-enable it)")
        props = getattr(context.scene, "trellis2", None)
        if props is None:
            return _refuse(cls, "No scene")
        reason = sources.problem(context, props)
        if reason:
            return _refuse(cls, reason)
        if len(ctrl.active_jobs()) >= QUEUE_LIMIT:
            return _refuse(cls, f"The queue is full ({QUEUE_LIMIT} jobs): wait or cancel one")
        if ctrl.state == "dead":
            return _refuse(cls, "The backend stopped: Restart it in the preferences (see log)")
        return True

    def execute(self, context):
        ctrl = _ctrl()
        props = context.scene.trellis2
        try:
            image, name = sources.read(context, props)
        except (sources.SourceError, OSError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        seed = random_seed() if props.random_seed else props.seed
        props.last_seed = seed
        params = params_from(props, seed)
        suffix = Path(props.filepath).suffix if props.source == "FILE" else ".png"
        ctrl.configure(backend_config(get_prefs(context)))
        blocking = self.mode == "BLOCKING" or (self.mode == "AUTO" and bpy.app.background)
        try:
            if blocking:
                view = ctrl.generate_blocking(
                    image, params, name, f"{name}{suffix}", auto_import=props.auto_import
                )
            else:
                view = ctrl.submit(
                    image, params, name, f"{name}{suffix}", auto_import=props.auto_import
                )
        except Exception as exc:  # a backend that cannot start or refuses the job
            self.report({"ERROR"}, f"Generate failed: {getattr(exc, 'message', exc)}")
            return {"CANCELLED"}
        if blocking and view.state != "done":
            self.report({"ERROR"}, f"{name}: {view.state}: {view.message} {view.hint}".strip())
            return {"CANCELLED"}
        self.report({"INFO"}, f"{name}: job {view.job_id} ({view.state}), seed {seed}")
        return {"FINISHED"}


class TRELLIS2_OT_cancel(bpy.types.Operator):
    """Cancel a queued or running job (the current one when none is named)"""

    bl_idname = "trellis2.cancel"
    bl_label = "Cancel"

    job_id: StringProperty(options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        ctrl = _ctrl()
        if ctrl is None or not ctrl.active_jobs():
            return _refuse(cls, "Nothing is queued or running")
        return True

    def execute(self, context):
        ctrl = _ctrl()
        job = ctrl.jobs.get(self.job_id) if self.job_id else ctrl.current_job()
        if job is None:
            self.report({"WARNING"}, "No such job")
            return {"CANCELLED"}
        try:
            ctrl.cancel(job.job_id)
        except Exception as exc:
            self.report({"ERROR"}, f"Cancel failed: {getattr(exc, 'message', exc)}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Cancelling {job.name}")
        return {"FINISHED"}


def _job_glb(ctrl, job_id: str) -> tuple[str, str]:
    """(glb path, name) of a job from this session or the history."""
    view = ctrl.jobs.get(job_id)
    if view is not None and view.glb_path:
        return view.glb_path, view.name
    entry = ctrl.history_entry(job_id)
    if entry is None or not entry.get("glb_path"):
        return "", ""
    return entry["glb_path"], entry["name"]


class TRELLIS2_OT_import_result(bpy.types.Operator):
    """Import a finished job's model at the 3D cursor, in the TRELLIS.2 collection"""

    bl_idname = "trellis2.import_result"
    bl_label = "Import Result"
    bl_options = {"REGISTER", "UNDO"}

    job_id: StringProperty(options={"SKIP_SAVE"})
    filepath: StringProperty(subtype="FILE_PATH", options={"SKIP_SAVE"})
    name: StringProperty(options={"SKIP_SAVE"})

    def execute(self, context):
        path, name = self.filepath, self.name
        if not path and self.job_id and _ctrl() is not None:
            path, name = _job_glb(_ctrl(), self.job_id)
            name = self.name or name
        if not path or not os.path.isfile(path):
            self.report({"ERROR"}, f"No model file for job {self.job_id or '?'}")
            return {"CANCELLED"}
        name = name or Path(path).stem
        try:
            obj = import_glb(context, path, name, import_options(context.scene.trellis2))
        except (RuntimeError, OSError) as exc:
            self.report({"ERROR"}, f"Import failed: {exc}")
            return {"CANCELLED"}
        if self.job_id:
            obj["trellis2_job"] = self.job_id
        self.report({"INFO"}, f"Imported {obj.name}")
        return {"FINISHED"}


class TRELLIS2_OT_reexport(bpy.types.Operator):
    """Export this job's model again with the current texture size, face target and remesh"""

    bl_idname = "trellis2.reexport"
    bl_label = "Re-export"

    job_id: StringProperty(options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        ctrl = _ctrl()
        if ctrl is None or ctrl.state not in ("ready", "busy"):
            return _refuse(cls, "The backend is not running: Start it first")
        return True

    def execute(self, context):
        ctrl = _ctrl()
        props = context.scene.trellis2
        params = {
            "texture_size": int(props.texture_size),
            "decimation_target": int(props.decimation_target),
            "remesh": bool(props.remesh),
        }
        entry = ctrl.history_entry(self.job_id) or {}
        try:
            new_id = ctrl.supervisor.client.reexport(self.job_id, params)
        except Exception as exc:
            self.report({"ERROR"}, f"Re-export failed: {getattr(exc, 'message', exc)}")
            return {"CANCELLED"}
        ctrl.track(new_id, entry.get("name") or self.job_id, "reexport", props.auto_import)
        self.report({"INFO"}, f"Re-export queued as {new_id}")
        return {"FINISHED"}


class TRELLIS2_OT_regenerate(bpy.types.Operator):
    """Run this job's image again with a new random seed"""

    bl_idname = "trellis2.regenerate"
    bl_label = "Regenerate"

    job_id: StringProperty(options={"SKIP_SAVE"})

    def execute(self, context):
        ctrl = _ctrl()
        entry = ctrl.history_entry(self.job_id) if ctrl else None
        if not entry or not entry.get("input") or not os.path.isfile(entry["input"]):
            self.report({"ERROR"}, "The job's input image is gone")
            return {"CANCELLED"}
        props = context.scene.trellis2
        seed = random_seed()
        props.last_seed = seed
        params = {"preset": entry.get("preset") or props.preset, "seed": seed}
        image = Path(entry["input"]).read_bytes()
        ctrl.configure(backend_config(get_prefs(context)))
        try:
            view = ctrl.submit(
                image,
                params,
                entry["name"],
                entry.get("filename") or "image.png",
                auto_import=props.auto_import,
            )
        except Exception as exc:
            self.report({"ERROR"}, f"Regenerate failed: {getattr(exc, 'message', exc)}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"{entry['name']}: seed {seed}, job {view.job_id}")
        return {"FINISHED"}


class TRELLIS2_OT_open_folder(bpy.types.Operator):
    """Open the job's folder in the file browser"""

    bl_idname = "trellis2.open_folder"
    bl_label = "Open Folder"

    path: StringProperty(subtype="DIR_PATH", options={"SKIP_SAVE"})

    def execute(self, context):
        if not os.path.isdir(self.path):
            self.report({"ERROR"}, f"No folder {self.path}")
            return {"CANCELLED"}
        bpy.ops.wm.path_open(filepath=self.path)
        return {"FINISHED"}


class TRELLIS2_OT_backend(bpy.types.Operator):
    """Start, stop or restart the backend (Restart gives all its memory back)"""

    bl_idname = "trellis2.backend"
    bl_label = "Backend"

    action: EnumProperty(
        items=(
            ("START", "Start", "Start the backend"),
            ("STOP", "Stop", "Stop the backend (cancels running jobs)"),
            ("RESTART", "Restart", "A fresh backend process: VRAM back, new session"),
            ("STATUS", "Refresh Status", "Ask the backend for GPU and VRAM figures"),
        ),
        options={"SKIP_SAVE"},
    )

    @classmethod
    def description(cls, context, properties):
        return {
            "START": "Start the backend",
            "STOP": "Stop the backend (jobs in flight are recovered on the next start)",
            "RESTART": "Restart the backend for a clean process: VRAM back, new session",
            "STATUS": "Ask the backend for GPU and VRAM figures",
        }.get(properties.action, cls.__doc__)

    def execute(self, context):
        ctrl = _ctrl()
        if ctrl is None:
            return {"CANCELLED"}
        ctrl.configure(backend_config(get_prefs(context)))
        try:
            if self.action == "START":
                ctrl.start(wait=bpy.app.background)
            elif self.action == "STOP":
                ctrl.stop()
            elif self.action == "RESTART":
                ctrl.restart("user")
                if bpy.app.background and ctrl.supervisor is not None:
                    ctrl.supervisor.start_and_wait(ctrl.config.start_timeout)
            else:
                ctrl.tick()  # the supervisor polls `status` itself; just fold in what came
        except Exception as exc:
            self.report({"ERROR"}, f"{self.action.title()} failed: {getattr(exc, 'message', exc)}")
            return {"CANCELLED"}
        runtime.tag_redraw(force=True)
        return {"FINISHED"}


class TRELLIS2_OT_open_log(bpy.types.Operator):
    """Open the backend's log file"""

    bl_idname = "trellis2.open_log"
    bl_label = "Open Log"

    @classmethod
    def poll(cls, context):
        ctrl = _ctrl()
        path = ctrl.status().get("log_path") if ctrl else None
        if not path or not os.path.isfile(str(path)):
            return _refuse(cls, "No log yet: start the backend first")
        return True

    def execute(self, context):
        bpy.ops.wm.path_open(filepath=str(_ctrl().status()["log_path"]))
        return {"FINISHED"}


class TRELLIS2_OT_doctor(bpy.types.Operator):
    """Check the TRELLIS.2 environment (packages, GPU, weights) and say how to fix problems"""

    bl_idname = "trellis2.doctor"
    bl_label = "Run Doctor"

    def execute(self, context):
        ctrl = _ctrl()
        ctrl.configure(backend_config(get_prefs(context)))
        ctrl.run_doctor()
        if bpy.app.background:
            ctrl.wait_doctor()
        runtime.tag_redraw(force=True)
        return {"FINISHED"}


class TRELLIS2_OT_paste_clipboard(bpy.types.Operator):
    """Paste an image from the clipboard as the input"""

    bl_idname = "trellis2.paste_clipboard"
    bl_label = "Paste from Clipboard"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        if context.window is None or bpy.app.background:
            return _refuse(cls, "Pasting needs a Blender window (not in background mode)")
        return True

    def execute(self, context):
        try:
            image = sources.paste_clipboard(context)
        except sources.SourceError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        props = context.scene.trellis2
        props.clipboard_image = image
        props.source = "CLIPBOARD"
        return {"FINISHED"}


class TRELLIS2_OT_refresh_history(bpy.types.Operator):
    """Read the job history from the output folder again"""

    bl_idname = "trellis2.refresh_history"
    bl_label = "Refresh History"

    def execute(self, context):
        ctrl = _ctrl()
        if ctrl is None:
            return {"CANCELLED"}
        ctrl.configure(backend_config(get_prefs(context)))
        ctrl.refresh_history()
        return {"FINISHED"}


classes = (
    TRELLIS2_OT_generate,
    TRELLIS2_OT_cancel,
    TRELLIS2_OT_import_result,
    TRELLIS2_OT_reexport,
    TRELLIS2_OT_regenerate,
    TRELLIS2_OT_open_folder,
    TRELLIS2_OT_backend,
    TRELLIS2_OT_open_log,
    TRELLIS2_OT_doctor,
    TRELLIS2_OT_paste_clipboard,
    TRELLIS2_OT_refresh_history,
)


register, unregister = bpy.utils.register_classes_factory(classes)
