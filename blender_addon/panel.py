"""The "TRELLIS.2" sidebar tab in the 3D viewport. Drawing reads memory only (the controller's
state, icons already loaded): no disk, no backend."""

from __future__ import annotations

import time

import bpy

from . import groups, runtime, selection
from .preferences import draw_doctor, draw_error, draw_status, get_prefs
from .wording import PREVIEW_IGNORES, format_bytes, one_line


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
        draw_status(layout, ctrl)

        props = context.scene.trellis2
        layout.prop(props, "source")
        icon = 0
        if props.source == "FILE":
            layout.prop(props, "filepath", text="")
            icon = runtime.icon_for(bpy.path.abspath(props.filepath)) if props.filepath else 0
        elif props.source == "IMAGE":
            layout.template_ID(props, "image", open="image.open")
            icon = props.image.preview.icon_id if props.image is not None else 0
        elif props.source == "CLIPBOARD":
            layout.operator("trellis2.paste_clipboard", icon="PASTEDOWN")
            image = props.clipboard_image
            icon = image.preview.icon_id if image is not None else 0
        elif props.source == "CAMERA":
            layout.prop(props, "camera_size")
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
        if ctrl is not None and ctrl.engine_ignores_settings():
            layout.label(text=f"Preview engine: {PREVIEW_IGNORES} do not affect it", icon="INFO")
        if props.last_seed >= 0:
            layout.label(text=f"Last seed: {props.last_seed}")

        row = layout.row(align=True)
        row.scale_y = 1.5
        row.operator("trellis2.generate", icon="MESH_MONKEY")
        if ctrl is not None and ctrl.config_changed:
            layout.label(text=f"Generate runs on {ctrl.running_engine()} until a Restart")

        for group in ctrl.active_groups() if ctrl is not None else ():
            draw_group(layout.box(), ctrl, group)
        job = ctrl.current_job() if ctrl is not None else None
        if job is not None and not job.group:  # a group's jobs are on its own line
            draw_job(layout.box(), job)
        failure = ctrl.last_failure() if ctrl is not None and job is None else None
        if failure is not None:
            box = layout.box()
            row = box.row()
            row.label(text=f"{failure.name}: failed", icon="ERROR")
            row.operator("trellis2.dismiss", text="", icon="X", emboss=False)
            draw_error(box, failure.message or "no reason given", failure.hint)


def draw_job(box, job) -> None:
    stage = job.label or job.stage or job.state
    text = f"{job.name}: {stage}"
    if job.level:
        text += f" (quality level {job.level})"
    if job.state == "running" and hasattr(box, "progress"):  # Blender 4.0+
        box.progress(factor=job.fraction, type="BAR", text=text)
    elif job.state == "running":
        box.label(text=f"{text} {job.fraction:.0%}")
    else:  # waiting, submitting, queued: no progress bar pretending to run
        where = f" (#{job.position})" if job.position else ""
        box.label(text=f"{text}{where}", icon="SORTTIME")
    if job.message:
        box.label(text=one_line(job.message, 120))
    box.operator("trellis2.cancel", icon="CANCEL").job_id = job.key


def draw_group(box, ctrl, group) -> None:
    """One line for a whole batch or variations row: how many are done, a bar, Cancel All."""
    running = [ctrl.find(i.key) for i in group.items if i.key and not i.ended]
    fraction = max((v.fraction for v in running if v is not None), default=0.0)
    text, factor = groups.summary(group, fraction)
    if hasattr(box, "progress"):  # Blender 4.0+
        box.progress(factor=factor, type="BAR", text=text)
    else:
        box.label(text=f"{text} ({factor:.0%})")
    box.operator("trellis2.cancel_group", icon="CANCEL").group = group.key


class TRELLIS2_PT_texture(_Base, bpy.types.Panel):
    bl_label = "Texture Mesh"
    bl_parent_id = "TRELLIS2_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        props = context.scene.trellis2
        obj = context.active_object
        col = layout.column(align=True)
        if obj is not None and obj.type == "MESH":
            mesh = selection.evaluated_mesh(context, obj)
            layer = selection.render_uv_layer(mesh)
            col.label(text=f"{obj.name}: {selection.triangle_count(mesh):,} triangles")
            col.label(
                text=f"UV map '{layer.name}' is kept"
                if layer is not None
                else "No UVs: the backend makes them",
                icon="UV",
            )
        else:
            col.label(text="Select a mesh object", icon="INFO")
        layout.prop(props, "texture_result", expand=True)
        layout.label(text="The image is the one chosen above")
        layout.operator("trellis2.texture_mesh", icon="TEXTURE")


class TRELLIS2_PT_variations(_Base, bpy.types.Panel):
    bl_label = "Variations"
    bl_parent_id = "TRELLIS2_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        props = context.scene.trellis2
        row = layout.row(align=True)
        row.prop(props, "variations_count")
        row.operator("trellis2.variations", text="Generate", icon="MOD_ARRAY")
        ctrl = runtime.get()
        if ctrl is not None and ctrl.engine_ignores_settings():
            layout.label(text="Preview engine: every seed gives the same model", icon="INFO")
        obj = context.active_object
        if obj is not None and str(obj.get("trellis2_group", "")).startswith("variations-"):
            layout.operator("trellis2.keep_variation", text=f"Keep {obj.name}", icon="CHECKMARK")
        else:
            layout.label(text="Select a variation to Keep it")


class TRELLIS2_PT_batch(_Base, bpy.types.Panel):
    bl_label = "Batch"
    bl_parent_id = "TRELLIS2_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        layout.prop(context.scene.trellis2, "batch_folder", text="")
        layout.operator("trellis2.batch", text="Queue Every Image", icon="FILE_FOLDER")
        ctrl = runtime.get()
        batches = [g for g in ctrl.groups.values() if g.kind == "batch"] if ctrl else []
        if not batches:
            return
        last = batches[-1]
        if last.ended:
            text, _ = groups.summary(last)
            layout.label(text=text, icon="CHECKMARK" if not last.counts()["failed"] else "ERROR")
        for item in [i for i in last.items if i.state == "failed"][:5]:
            layout.label(text=one_line(f"{item.label}: {item.error}", 120), icon="ERROR")
        if last.log_path:
            layout.label(text=f"Log: {last.log_path}")
        if last.log_error:
            layout.label(text=one_line(f"Log: {last.log_error}", 120), icon="ERROR")


class TRELLIS2_PT_advanced(_Base, bpy.types.Panel):
    bl_label = "Advanced"
    bl_parent_id = "TRELLIS2_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        props = context.scene.trellis2
        layout = self.layout
        layout.prop(props, "use_advanced")
        ctrl = runtime.get()
        if ctrl is not None and ctrl.engine_ignores_settings():
            layout.label(text=f"Preview engine: {PREVIEW_IGNORES} do not affect it", icon="INFO")
        col = layout.column()
        col.enabled = props.use_advanced
        for name in (
            "resolution",
            "texture_size",
            "decimation_target",
            "remesh",
            "remesh_band",
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
        sub = layout.row()
        sub.enabled = props.at_cursor
        sub.prop(props, "rest_on_cursor")
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
            where = f"#{job.position}" if job.position is not None else job.label or job.state
            row.label(text=f"{job.name} ({job.kind}) - {where} {job.fraction:.0%}")
            row.operator("trellis2.cancel", text="", icon="X").job_id = job.key


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
        history = ctrl.history
        props = context.scene.trellis2
        layout.prop(props, "history_query", text="", icon="VIEWZOOM")
        if ctrl.state not in ("loading", "ready", "busy"):
            col = layout.column(align=True)
            col.label(text="The backend keeps the history: start it to list jobs", icon="INFO")
            col.operator("trellis2.backend", text="Start", icon="PLAY").action = "START"
        if history.error:
            layout.label(text=one_line(history.error, 120), icon="ERROR")
        if history.loaded and not history.entries:
            layout.label(text="No jobs match" if history.query else "No jobs yet")
        for entry in history.entries[: history.page_size]:
            draw_history_entry(layout.box(), entry)
        if history.pages > 1:
            row = layout.row(align=True)
            back = row.row(align=True)
            back.enabled = history.page > 0
            back.operator("trellis2.history_page", text="", icon="TRIA_LEFT").page = (
                history.page - 1
            )
            row.label(text=f"Page {history.page + 1} of {history.pages} ({history.total} jobs)")
            ahead = row.row(align=True)
            ahead.enabled = history.page + 1 < history.pages
            ahead.operator("trellis2.history_page", text="", icon="TRIA_RIGHT").page = (
                history.page + 1
            )
        for warning in history.warnings[:3]:
            layout.label(text=one_line(warning, 120), icon="ERROR")
        box = layout.box()
        row = box.row(align=True)
        row.prop(props, "history_days")
        prune = history.prune or {}
        label = (
            f"Clear {prune.get('count', 0)} ({format_bytes(prune.get('bytes', 0))})"
            if history.prune is not None
            else "Clear Old Jobs"
        )
        row.operator("trellis2.clear_history", text=label, icon="TRASH").days = props.history_days
        if history.notice:
            box.label(text=one_line(history.notice, 120))


def draw_history_entry(box, entry: dict) -> None:
    row = box.row()
    icon = runtime.icon_for(entry.get("thumbnail_file") or "")  # downloaded, never the backend's
    if icon:
        row.template_icon(icon_value=icon, scale=3.0)
    col = row.column(align=True)
    when = time.strftime("%m-%d %H:%M", time.localtime(entry.get("created") or 0))
    kind = "re-export, " if entry.get("kind") == "reexport" else ""
    col.label(text=f"{entry['label']}  ({kind}{entry['state']}, {when})")
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
            text=f"seed {entry.get('seed')}, {entry.get('preset') or '-'}, {entry.get('engine')}"
            + (f", {seconds:.1f} s" if seconds else "")
        )
    elif entry.get("error"):
        error = entry["error"] or {}
        col.label(text=one_line(error.get("message", ""), 100), icon="ERROR")
        if error.get("hint"):
            col.label(text=one_line(error["hint"], 100), icon="INFO")
    col.label(text=f"{format_bytes(entry.get('bytes'))} on disk")
    ops = box.row(align=True)
    sub = ops.row(align=True)
    sub.enabled = bool(entry.get("glb_path"))
    sub.operator("trellis2.import_result", text="Import", icon="IMPORT").job_id = entry["job_id"]
    sub.operator("trellis2.reexport", text="Re-export", icon="EXPORT").job_id = entry["job_id"]
    seed = ops.row(align=True)
    seed.enabled = bool(entry.get("input"))
    seed.operator("trellis2.regenerate", text="New Seed", icon="FILE_REFRESH").job_id = entry[
        "job_id"
    ]
    ops.operator("trellis2.open_folder", text="", icon="FILE_FOLDER").path = entry.get("folder", "")
    ops.operator("trellis2.delete_job", text="", icon="TRASH").job_id = entry["job_id"]


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
    TRELLIS2_PT_texture,
    TRELLIS2_PT_variations,
    TRELLIS2_PT_batch,
    TRELLIS2_PT_advanced,
    TRELLIS2_PT_import,
    TRELLIS2_PT_queue,
    TRELLIS2_PT_history,
    TRELLIS2_PT_backend,
)


register, unregister = bpy.utils.register_classes_factory(classes)
