"""The "TRELLIS.2" sidebar tab in the 3D viewport."""

from __future__ import annotations

import os
import time

import bpy

from . import runtime
from .preferences import draw_doctor, get_prefs

HISTORY_ROWS = 8


def _fmt_count(n) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K" if n >= 1e3 else str(int(n))


class _Base:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "TRELLIS.2"


class TRELLIS2_PT_main(_Base, bpy.types.Panel):
    bl_label = "TRELLIS.2"

    def draw(self, context):
        layout = self.layout
        ctrl = runtime.get()
        prefs = get_prefs(context)
        status = ctrl.status() if ctrl is not None else {"state": "stopped"}
        engine = prefs.engine if prefs is not None else "preview"
        row = layout.row()
        label = "Preview (no GPU)" if engine == "preview" else "TRELLIS.2"
        icon = runtime.state_icon(status["state"])
        row.label(text=f"Backend: {status['state']} - {label}", icon=icon)
        row.operator("trellis2.backend", text="", icon="FILE_REFRESH").action = "RESTART"
        if status.get("reason") and status["state"] in ("dead", "restarting", "starting"):
            layout.label(text=str(status["reason"])[:120], icon="INFO")
        if ctrl is not None and ctrl.last_error:
            layout.label(text=ctrl.last_error[:120], icon="ERROR")
        if ctrl is not None and ctrl.config_changed:
            layout.label(text="Settings changed: Restart to apply", icon="ERROR")

        props = context.scene.trellis2
        layout.prop(props, "source")
        if props.source == "FILE":
            layout.prop(props, "filepath", text="")
            preview = bpy.path.abspath(props.filepath) if props.filepath else ""
            icon = runtime.icon_for(preview) if os.path.isfile(preview) else 0
        elif props.source == "IMAGE":
            layout.template_ID(props, "image", open="image.open")
            icon = props.image.preview.icon_id if props.image is not None else 0
        elif props.source == "CLIPBOARD":
            layout.operator("trellis2.paste_clipboard", icon="PASTEDOWN")
            image = props.clipboard_image
            icon = image.preview.icon_id if image is not None else 0
        elif props.source == "CAMERA":
            layout.prop(props, "camera_size")
            icon = 0
        else:
            icon = 0
        if icon:
            layout.template_icon(icon_value=icon, scale=6.0)

        if prefs is not None:
            layout.prop(prefs, "engine")
        layout.prop(props, "preset")
        row = layout.row(align=True)
        row.prop(props, "random_seed", text="", icon="FILE_REFRESH")
        sub = row.row(align=True)
        sub.enabled = not props.random_seed
        sub.prop(props, "seed")
        if props.last_seed >= 0:
            layout.label(text=f"Last seed: {props.last_seed}")

        row = layout.row(align=True)
        row.scale_y = 1.5
        row.operator("trellis2.generate", icon="MESH_MONKEY")

        job = ctrl.current_job() if ctrl is not None else None
        if job is not None:
            box = layout.box()
            stage = job.label or job.stage or job.state
            text = f"{job.name}: {stage}"
            if job.level:
                text += f" (quality level {job.level})"
            if hasattr(box, "progress"):  # Blender 4.0+
                box.progress(factor=job.fraction, type="BAR", text=text)
            else:
                box.label(text=f"{text} {job.fraction:.0%}")
            if job.message:
                box.label(text=job.message[:120])
            box.operator("trellis2.cancel", icon="CANCEL").job_id = job.job_id


class TRELLIS2_PT_advanced(_Base, bpy.types.Panel):
    bl_label = "Advanced"
    bl_parent_id = "TRELLIS2_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        props = context.scene.trellis2
        layout = self.layout
        layout.prop(props, "use_advanced")
        col = layout.column()
        col.enabled = props.use_advanced
        for name in (
            "resolution",
            "texture_size",
            "decimation_target",
            "remesh",
            "steps_scale",
            "guidance",
            "image_size",
        ):
            col.prop(props, name)


class TRELLIS2_PT_import(_Base, bpy.types.Panel):
    bl_label = "Import"
    bl_parent_id = "TRELLIS2_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        props = context.scene.trellis2
        layout = self.layout
        layout.prop(props, "auto_import")
        layout.prop(props, "at_cursor")
        row = layout.row(align=True)
        row.prop(props, "use_scale")
        sub = row.row(align=True)
        sub.enabled = props.use_scale
        sub.prop(props, "scale_to")
        layout.prop(props, "fix_alpha")


class TRELLIS2_PT_queue(_Base, bpy.types.Panel):
    bl_label = "Queue"
    bl_parent_id = "TRELLIS2_PT_main"

    @classmethod
    def poll(cls, context):
        ctrl = runtime.get()
        return ctrl is not None and bool(ctrl.active_jobs())

    def draw(self, context):
        for job in runtime.get().active_jobs():
            row = self.layout.row(align=True)
            where = f"#{job.position}" if job.position is not None else job.state
            row.label(text=f"{job.name} ({job.kind}) - {where} {job.fraction:.0%}")
            row.operator("trellis2.cancel", text="", icon="X").job_id = job.job_id


class TRELLIS2_PT_history(_Base, bpy.types.Panel):
    bl_label = "History"
    bl_parent_id = "TRELLIS2_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw_header_preset(self, context):
        self.layout.operator("trellis2.refresh_history", text="", icon="FILE_REFRESH", emboss=False)

    def draw(self, context):
        ctrl = runtime.get()
        layout = self.layout
        if ctrl is None:
            return
        if ctrl.history_dirty:  # cheap: read only after a job ended or settings changed
            ctrl.refresh_history()
        if not ctrl.history:
            layout.label(text="No jobs yet")
        for entry in ctrl.history[:HISTORY_ROWS]:
            draw_history_entry(layout.box(), entry)
        for warning in ctrl.history_warnings[:3]:
            layout.label(text=warning[:120], icon="ERROR")


def draw_history_entry(box, entry: dict) -> None:
    row = box.row()
    icon = runtime.icon_for(entry["thumbnail"]) if os.path.isfile(entry["thumbnail"]) else 0
    if icon:
        row.template_icon(icon_value=icon, scale=3.0)
    col = row.column(align=True)
    when = time.strftime("%m-%d %H:%M", time.localtime(entry["created"] or 0))
    col.label(text=f"{entry['name']}  ({entry['state']}, {when})")
    stats = entry.get("mesh_stats") or {}
    if entry["state"] == "done":
        level = entry.get("level") or 0
        quality = "full quality" if level == 0 else f"quality level {level}"
        col.label(
            text=f"{_fmt_count(stats.get('faces'))} faces, {stats.get('texture_size', '?')} px, "
            f"{quality}"
        )
        seconds = entry.get("seconds")
        col.label(
            text=f"seed {entry.get('seed')}, {entry.get('preset') or '-'}, {entry['engine']}"
            + (f", {seconds:.1f} s" if seconds else "")
        )
    elif entry.get("error"):
        col.label(text=str(entry["error"].get("message", ""))[:100], icon="ERROR")
    ops = box.row(align=True)
    sub = ops.row(align=True)
    sub.enabled = bool(entry.get("glb_path"))
    sub.operator("trellis2.import_result", text="Import", icon="IMPORT").job_id = entry["job_id"]
    sub.operator("trellis2.reexport", text="Re-export", icon="EXPORT").job_id = entry["job_id"]
    ops.operator("trellis2.regenerate", text="New Seed", icon="FILE_REFRESH").job_id = entry[
        "job_id"
    ]
    ops.operator("trellis2.open_folder", text="", icon="FILE_FOLDER").path = entry["folder"]


class TRELLIS2_PT_backend(_Base, bpy.types.Panel):
    bl_label = "Backend"
    bl_parent_id = "TRELLIS2_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        ctrl = runtime.get()
        layout = self.layout
        row = layout.row(align=True)
        row.operator("trellis2.backend", text="Start", icon="PLAY").action = "START"
        row.operator("trellis2.backend", text="Stop", icon="SNAP_FACE").action = "STOP"
        row.operator("trellis2.backend", text="Restart", icon="FILE_REFRESH").action = "RESTART"
        row = layout.row(align=True)
        row.operator("trellis2.open_log", icon="TEXT")
        row.operator("trellis2.doctor", icon="CHECKMARK")
        draw_doctor(layout, ctrl)


classes = (
    TRELLIS2_PT_main,
    TRELLIS2_PT_advanced,
    TRELLIS2_PT_import,
    TRELLIS2_PT_queue,
    TRELLIS2_PT_history,
    TRELLIS2_PT_backend,
)


register, unregister = bpy.utils.register_classes_factory(classes)
