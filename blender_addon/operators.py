"""Operators: generate, cancel, import, re-export, new seed, history, backend control, doctor,
paste, and `wait` for scripts. None of them waits on the backend: each hands the controller a
request that a later tick resolves. The only waiting is for `blender -b` scripts, where no timer
runs: Generate and the backend actions block in background mode (mode AUTO), and `wait` ticks
until the queue is empty (docs/BLENDER.md)."""

from __future__ import annotations

import os
from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatVectorProperty, IntProperty, StringProperty

from . import runtime, sources
from .controller import random_seed
from .importer import import_glb
from .preferences import backend_config, get_prefs
from .properties import import_options, params_from
from .views import engine_label, format_bytes, one_line

MODES = (
    ("AUTO", "Auto", "Wait only in background mode (blender -b), where no timer runs"),
    ("ASYNC", "Async", "Return at once; the timer does the rest"),
    ("BLOCKING", "Blocking", "Wait until done (scripts)"),
)


def _ctrl():
    runtime.ensure_timer()
    return runtime.get()


def _refuse(cls, message: str) -> bool:
    cls.poll_message_set(message)
    return False


def _blocking(mode: str) -> bool:
    return mode == "BLOCKING" or (mode == "AUTO" and bpy.app.background)


def _report_error(op, prefix: str, exc: BaseException) -> None:
    """The error and its fix as two reports (never one run-on line)."""
    op.report({"ERROR"}, f"{prefix}: {one_line(getattr(exc, 'message', None) or exc, 300)}")
    hint = one_line(getattr(exc, "hint", ""), 300)
    if hint:
        op.report({"INFO"}, hint)


def _cursor(context) -> tuple[float, float, float]:
    return tuple(context.scene.cursor.location)


def _engine_notice(op, ctrl) -> None:
    """Say which engine runs the job when changed settings wait for a Restart."""
    if ctrl.config_changed:
        op.report(
            {"WARNING"},
            f"Runs on {ctrl.running_engine()}: the new settings "
            f"({engine_label(ctrl.config.engine)}) apply after a Restart",
        )


class TRELLIS2_OT_generate(bpy.types.Operator):
    """Generate a textured 3D model from the chosen image"""

    bl_idname = "trellis2.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER", "UNDO"}

    mode: EnumProperty(name="Mode", items=MODES, default="AUTO", options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        ctrl = runtime.get()
        if ctrl is None:
            return _refuse(cls, "The add-on is not running (re-enable it)")
        props = getattr(context.scene, "trellis2", None)
        if props is None:
            return _refuse(cls, "No scene")
        reason = sources.problem(context, props)
        if reason:
            return _refuse(cls, reason)
        if ctrl.queue_full():
            return _refuse(cls, "The queue is full: wait for a job to end or cancel one")
        if ctrl.state == "dead":
            return _refuse(cls, "The backend stopped: Restart it (the panel says why)")
        problem = ctrl.known_output_problem
        if problem:
            return _refuse(cls, f"Output Directory: {problem}")
        return True

    def execute(self, context):
        ctrl = _ctrl()
        props = context.scene.trellis2
        try:
            image, name = sources.read(context, props)
        except (sources.SourceError, OSError) as exc:
            self.report({"ERROR"}, one_line(exc, 300))
            return {"CANCELLED"}
        seed = random_seed() if props.random_seed else props.seed
        props.last_seed = seed
        params = params_from(props, seed)
        suffix = Path(props.filepath).suffix if props.source == "FILE" else ".png"
        ctrl.configure(backend_config(get_prefs(context)))
        ctrl.dismiss_outcome()
        args = (image, params, name, f"{name}{suffix}", props.auto_import)
        try:
            if _blocking(self.mode):
                view = ctrl.generate_blocking(*args, cursor=_cursor(context))
            else:
                view = ctrl.submit(*args, cursor=_cursor(context))
        except Exception as exc:  # a backend that cannot start, an unusable output folder
            _report_error(self, "Generate failed", exc)
            return {"CANCELLED"}
        if view.state == "failed":
            _report_error(self, f"{name}: failed", view)
            return {"CANCELLED"}
        if _blocking(self.mode) and view.state != "done":
            self.report({"ERROR"}, f"{name}: {view.state}")
            return {"CANCELLED"}
        _engine_notice(self, ctrl)
        self.report({"INFO"}, f"{name}: {view.state} on {view.engine}, seed {seed}")
        return {"FINISHED"}


class TRELLIS2_OT_cancel(bpy.types.Operator):
    """Cancel a job that waits, is queued or runs (the current one when none is named)"""

    bl_idname = "trellis2.cancel"
    bl_label = "Cancel"

    job_id: StringProperty(options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        ctrl = runtime.get()
        if ctrl is None or not ctrl.active_jobs():
            return _refuse(cls, "Nothing is waiting, queued or running")
        return True

    def execute(self, context):
        ctrl = _ctrl()
        job = ctrl.find(self.job_id) if self.job_id else ctrl.current_job()
        if job is None:
            self.report({"WARNING"}, "No such job")
            return {"CANCELLED"}
        ctrl.cancel(job.key)
        self.report({"INFO"}, f"Cancelling {job.name}")
        return {"FINISHED"}


def _job_glb(ctrl, job_id: str) -> tuple[str, str]:
    """(glb path, name) of a job from this session or the history page (memory)."""
    view = ctrl.find(job_id)
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
    location: FloatVectorProperty(size=3, subtype="TRANSLATION", options={"SKIP_SAVE"})
    use_location: BoolProperty(
        description="Place at `location` (the cursor when Generate was pressed), not the cursor",
        options={"SKIP_SAVE"},
    )

    def execute(self, context):
        path, name = self.filepath, self.name
        ctrl = runtime.get()
        if not path and self.job_id and ctrl is not None:
            path, name = _job_glb(ctrl, self.job_id)
            name = self.name or name
        if not path or not os.path.isfile(path):
            self.report({"ERROR"}, f"No model file for job {self.job_id or '?'}")
            return {"CANCELLED"}
        name = name or Path(path).stem
        options = import_options(context.scene.trellis2)
        if self.use_location:
            options.location = tuple(self.location)
        try:
            obj = import_glb(context, path, name, options)
        except (RuntimeError, OSError) as exc:
            self.report({"ERROR"}, f"Import failed: {one_line(exc, 300)}")
            return {"CANCELLED"}
        if self.job_id:
            obj["trellis2_job"] = self.job_id
        self.report({"INFO"}, f"Imported {obj.name}")
        return {"FINISHED"}


class TRELLIS2_OT_reexport(bpy.types.Operator):
    """Export this job's model again with the current texture size, face target and remesh
    (starts the backend when needed)"""

    bl_idname = "trellis2.reexport"
    bl_label = "Re-export"

    job_id: StringProperty(options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        if runtime.get() is None:
            return _refuse(cls, "The add-on is not running (re-enable it)")
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
        view = ctrl.find(self.job_id)
        name = entry.get("name") or (view.name if view else self.job_id)
        ctrl.configure(backend_config(get_prefs(context)))
        try:
            job = ctrl.reexport(self.job_id, params, name, props.auto_import, _cursor(context))
        except Exception as exc:
            _report_error(self, "Re-export failed", exc)
            return {"CANCELLED"}
        self.report({"INFO"}, f"Re-export of {name}: {job.state}")
        return {"FINISHED"}


class TRELLIS2_OT_regenerate(bpy.types.Operator):
    """Run this job's image again with a new random seed"""

    bl_idname = "trellis2.regenerate"
    bl_label = "New Seed"

    job_id: StringProperty(options={"SKIP_SAVE"})

    def execute(self, context):
        ctrl = _ctrl()
        entry = ctrl.history_entry(self.job_id) if ctrl else None
        if entry is None and ctrl is not None and bpy.app.background:
            entry = ctrl.job_entry_blocking(self.job_id)  # a script: not on the history page
        if not entry or not entry.get("input") or not os.path.isfile(entry["input"]):
            self.report({"ERROR"}, "The job's input image is gone")
            return {"CANCELLED"}
        props = context.scene.trellis2
        seed = random_seed()
        props.last_seed = seed
        params = {"preset": entry.get("preset") or props.preset, "seed": seed}
        image = Path(entry["input"]).read_bytes()
        ctrl.configure(backend_config(get_prefs(context)))
        filename = entry.get("filename") or "image.png"
        try:
            view = ctrl.submit(
                image, params, entry["name"], filename, props.auto_import, _cursor(context)
            )
        except Exception as exc:
            _report_error(self, "New Seed failed", exc)
            return {"CANCELLED"}
        self.report({"INFO"}, f"{entry['name']}: seed {seed}, {view.state}")
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
            ("STOP", "Stop", "Stop the backend (jobs wait for the next one)"),
            ("RESTART", "Restart", "A fresh backend process: VRAM back, new session"),
            ("STATUS", "Refresh Status", "Fold in the backend's latest figures"),
        ),
        options={"SKIP_SAVE"},
    )
    mode: EnumProperty(name="Mode", items=MODES, default="AUTO", options={"SKIP_SAVE"})

    @classmethod
    def description(cls, context, properties):
        return {
            "START": "Start the backend",
            "STOP": "Stop the backend (jobs in flight run on the next start)",
            "RESTART": "Restart the backend for a clean process: VRAM back, new session",
            "STATUS": "Fold in the backend's latest state, GPU and VRAM figures",
        }.get(properties.action, cls.__doc__)

    def execute(self, context):
        ctrl = _ctrl()
        if ctrl is None:
            return {"CANCELLED"}
        ctrl.configure(backend_config(get_prefs(context)))
        blocking = _blocking(self.mode)
        try:
            if self.action == "START":
                ctrl.start(wait=blocking)
            elif self.action == "STOP":
                ctrl.stop()
                if blocking:
                    ctrl.wait_stopped()
            elif self.action == "RESTART":
                ctrl.restart("user")
                if blocking:
                    ctrl.wait_ready()
            else:
                ctrl.tick()  # the supervisor polls `status` itself; fold in what came
        except Exception as exc:
            _report_error(self, f"{self.action.title()} failed", exc)
            return {"CANCELLED"}
        runtime.tag_redraw(force=True)
        return {"FINISHED"}


class TRELLIS2_OT_open_log(bpy.types.Operator):
    """Open the backend's log file"""

    bl_idname = "trellis2.open_log"
    bl_label = "Open Log"

    @classmethod
    def poll(cls, context):
        ctrl = runtime.get()
        if not (ctrl.status().get("log_path") if ctrl else None):
            return _refuse(cls, "No log yet: start the backend first")
        return True

    def execute(self, context):
        path = str(_ctrl().status()["log_path"])
        if not os.path.isfile(path):
            self.report({"ERROR"}, f"The log {path} is gone")
            return {"CANCELLED"}
        bpy.ops.wm.path_open(filepath=path)
        return {"FINISHED"}


class TRELLIS2_OT_doctor(bpy.types.Operator):
    """Check the backend's Python (packages, GPU, weights, output folder) and say how to fix
    problems"""

    bl_idname = "trellis2.doctor"
    bl_label = "Run Doctor"

    mode: EnumProperty(name="Mode", items=MODES, default="AUTO", options={"SKIP_SAVE"})

    def execute(self, context):
        ctrl = _ctrl()
        ctrl.configure(backend_config(get_prefs(context)))
        ctrl.run_doctor()
        if _blocking(self.mode):
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
    """Ask the backend for the job history again"""

    bl_idname = "trellis2.refresh_history"
    bl_label = "Refresh History"

    def execute(self, context):
        ctrl = _ctrl()
        if ctrl is None:
            return {"CANCELLED"}
        ctrl.refresh_history()
        return {"FINISHED"}


class TRELLIS2_OT_history_page(bpy.types.Operator):
    """Show another page of the history"""

    bl_idname = "trellis2.history_page"
    bl_label = "History Page"

    page: IntProperty(min=0, options={"SKIP_SAVE"})

    def execute(self, context):
        _ctrl().history_page(self.page)
        return {"FINISHED"}


class TRELLIS2_OT_delete_job(bpy.types.Operator):
    """Delete this job's folder (model, input, thumbnail, log) for good"""

    bl_idname = "trellis2.delete_job"
    bl_label = "Delete Job"

    job_id: StringProperty(options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        ctrl = runtime.get()
        if ctrl is None or ctrl.state not in ("loading", "ready", "busy"):
            return _refuse(cls, "The backend keeps the history: start it first")
        return True

    def invoke(self, context, event):
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context):
        try:
            _ctrl().delete_jobs(job_id=self.job_id)
        except Exception as exc:
            _report_error(self, "Delete failed", exc)
            return {"CANCELLED"}
        return {"FINISHED"}


class TRELLIS2_OT_clear_history(bpy.types.Operator):
    """Delete every finished job that ended more than the chosen number of days ago"""

    bl_idname = "trellis2.clear_history"
    bl_label = "Clear Old Jobs"

    days: IntProperty(min=0, default=30, options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        ctrl = runtime.get()
        if ctrl is None or ctrl.state not in ("loading", "ready", "busy"):
            return _refuse(cls, "The backend keeps the history: start it first")
        prune = ctrl.history.prune
        if prune is not None and not prune.get("count"):
            return _refuse(cls, "No finished job is that old")
        return True

    @classmethod
    def description(cls, context, properties):
        ctrl = runtime.get()
        prune = ctrl.history.prune if ctrl else None
        if prune:
            size = format_bytes(prune.get("bytes"))
            return f"Delete {prune.get('count', 0)} finished job(s), {size}, for good"
        return cls.__doc__

    def invoke(self, context, event):
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context):
        try:
            _ctrl().delete_jobs(older_than_days=self.days)
        except Exception as exc:
            _report_error(self, "Clear failed", exc)
            return {"CANCELLED"}
        return {"FINISHED"}


class TRELLIS2_OT_dismiss(bpy.types.Operator):
    """Hide the last job's outcome"""

    bl_idname = "trellis2.dismiss"
    bl_label = "Dismiss"

    def execute(self, context):
        _ctrl().dismiss_outcome()
        return {"FINISHED"}


class TRELLIS2_OT_wait(bpy.types.Operator):
    """Scripts (blender -b): tick until no job waits, is queued or runs, or the named job ends"""

    bl_idname = "trellis2.wait"
    bl_label = "Wait for Jobs"

    job_id: StringProperty(options={"SKIP_SAVE"})
    timeout: IntProperty(default=600, min=1, options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        if not bpy.app.background:  # a window's timer does this; waiting would freeze Blender
            return _refuse(cls, "Only for background scripts (blender -b)")
        return runtime.get() is not None

    def execute(self, context):
        ctrl = _ctrl()
        try:
            if self.job_id:
                ctrl.wait(self.job_id, self.timeout)
            else:
                ctrl.wait_idle(self.timeout)
        except Exception as exc:
            _report_error(self, "Wait failed", exc)
            return {"CANCELLED"}
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
    TRELLIS2_OT_history_page,
    TRELLIS2_OT_delete_job,
    TRELLIS2_OT_clear_history,
    TRELLIS2_OT_dismiss,
    TRELLIS2_OT_wait,
)

register, unregister = bpy.utils.register_classes_factory(classes)
