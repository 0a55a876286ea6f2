"""Operators: generate, texture the selected mesh, variations (and Keep), batch a folder,
cancel, import, re-export, new seed, history, backend control, doctor, paste, and `wait` for
scripts. None of them waits on the backend: each hands the controller a
request that a later tick resolves. The only waiting is for `blender -b` scripts, where no timer
runs: Generate and the backend actions block in background mode (mode AUTO), and `wait` ticks
until the queue is empty (docs/BLENDER.md)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatVectorProperty, IntProperty, StringProperty
from mathutils import Vector

from ..backend.params import VARIATIONS_MAX, VARIATIONS_MIN
from . import groups, runtime, selection, sources
from .controller import REMOTE_ONLY_LOCAL, RESULT, file_name, random_seed
from .importer import (
    COLLECTION,
    _ensure_collection,
    apply_texture,
    import_glb,
    remove_objects,
)
from .preferences import backend_config, get_prefs
from .properties import TEXTURE_RESULTS, import_options, params_from
from .wording import engine_label, format_bytes, one_line

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


def _local_only(cls) -> bool:
    """False (with the reason) when the jobs go to a studio server: its admin does this."""
    ctrl = runtime.get()
    if ctrl is not None and ctrl.remote:
        return _refuse(cls, REMOTE_ONLY_LOCAL)
    return True


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


def _job_problem(context) -> str | None:
    """Why a new job cannot be made now (the parts every job button shares)."""
    ctrl = runtime.get()
    if ctrl is None:
        return "The add-on is not running (re-enable it)"
    props = getattr(context.scene, "trellis2", None)
    if props is None:
        return "No scene"
    if ctrl.queue_full():
        return "The queue is full: wait for a job to end or cancel one"
    if ctrl.state == "dead":
        return "The backend stopped: Restart it (the panel says why)"
    problem = ctrl.known_output_problem
    if problem:
        return f"Output Directory: {problem}"
    return None


def _group_spacing(props) -> float:
    """Room for each result in a row or grid: results are about the size they import at."""
    return groups.SPACING * (props.scale_to if props.use_scale else 1.0)


def _seeds(props, count: int, distinct: bool = True) -> list[int]:
    """Random seeds (distinct), or the panel's seed: counting up from it for variations of
    one image, the same one for every image of a batch."""
    if props.random_seed:
        return random.sample(range(2**31 - 1), count)
    step = 1 if distinct else 0
    return [min(props.seed + i * step, 2**31 - 2) for i in range(count)]


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
        reason = sources.problem(context, props) or _job_problem(context)
        return _refuse(cls, reason) if reason else True

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


class TRELLIS2_OT_texture_mesh(bpy.types.Operator):
    """Texture the active mesh object from the chosen image: modifiers applied, in place; the
    result comes onto the object (its UVs kept when it has them) or as a copy beside it"""

    bl_idname = "trellis2.texture_mesh"
    bl_label = "Texture Selected Mesh"
    bl_options = {"REGISTER", "UNDO"}

    mode: EnumProperty(name="Mode", items=MODES, default="AUTO", options={"SKIP_SAVE"})
    result: EnumProperty(
        name="Result",
        items=(("PANEL", "As in the Panel", "The panel's choice"), *TEXTURE_RESULTS),
        default="PANEL",
        options={"SKIP_SAVE"},
    )

    @classmethod
    def poll(cls, context):
        reason = _job_problem(context)
        reason = reason or selection.problem(context)
        reason = reason or sources.problem(context, context.scene.trellis2)
        return _refuse(cls, reason) if reason else True

    def execute(self, context):
        ctrl = _ctrl()
        props = context.scene.trellis2
        obj = context.active_object
        if context.mode != "OBJECT":
            bpy.ops.object.mode_set(mode="OBJECT")  # edit-mode changes reach the mesh
        try:
            image, image_name = sources.read(context, props)
        except (sources.SourceError, OSError) as exc:
            self.report({"ERROR"}, one_line(exc, 300))
            return {"CANCELLED"}
        sent = selection.export(context, obj)
        seed = random_seed() if props.random_seed else props.seed
        props.last_seed = seed
        result = props.texture_result if self.result == "PANEL" else self.result
        suffix = Path(props.filepath).suffix if props.source == "FILE" else ".png"
        ctrl.configure(backend_config(get_prefs(context)))
        ctrl.dismiss_outcome()
        kwargs = dict(
            image=image,
            mesh=sent.data,
            params=params_from(props, seed),
            name=obj.name,
            target=obj.name,
            filename=f"{image_name}{suffix}",
            result=result,
            uv_map=sent.uv_map,
            modifiers_applied=sent.modifiers_applied,
            auto_import=props.auto_import,
        )
        try:
            if _blocking(self.mode):
                ctrl.start(wait=True)
                view = ctrl.wait(ctrl.texture(**kwargs).key)
            else:
                view = ctrl.texture(**kwargs)
        except Exception as exc:
            _report_error(self, "Texture failed", exc)
            return {"CANCELLED"}
        if view.state == "failed" or (_blocking(self.mode) and view.state != "done"):
            _report_error(self, f"{obj.name}: {view.state}", view)
            return {"CANCELLED"}
        _engine_notice(self, ctrl)
        uvs = f"its UVs '{sent.uv_map}'" if sent.uv_map else "no UVs (the backend makes them)"
        self.report(
            {"INFO"}, f"{obj.name}: {sent.triangles} triangles, {uvs}, seed {seed}: {view.state}"
        )
        return {"FINISHED"}


class TRELLIS2_OT_apply_texture(bpy.types.Operator):
    """Put a finished texture job's result onto its object, or beside it"""

    bl_idname = "trellis2.apply_texture"
    bl_label = "Apply Texture Result"
    bl_options = {"REGISTER", "UNDO"}

    job_id: StringProperty(options={"SKIP_SAVE"})
    filepath: StringProperty(subtype="FILE_PATH", options={"SKIP_SAVE"})
    target: StringProperty(options={"SKIP_SAVE"})
    result: EnumProperty(items=TEXTURE_RESULTS, default="APPLY", options={"SKIP_SAVE"})
    uv_map: StringProperty(options={"SKIP_SAVE"})
    modifiers_applied: BoolProperty(options={"SKIP_SAVE"})

    def execute(self, context):
        ctrl = runtime.get()
        view = ctrl.find(self.job_id) if ctrl is not None and self.job_id else None
        path, target_name, result = self.filepath, self.target, self.result
        uv_map, modifiers = self.uv_map, self.modifiers_applied
        if view is not None:
            path, target_name, result = view.glb_path or "", view.target, view.texture_result
            uv_map, modifiers = view.uv_map, view.modifiers_applied
        if not path or not os.path.isfile(path):
            self.report({"ERROR"}, f"No textured model for job {self.job_id or '?'}")
            return {"CANCELLED"}
        target = bpy.data.objects.get(target_name)
        if target is not None and target.type != "MESH":
            target = None
        if target is None and result == "APPLY":
            self.report({"WARNING"}, f"'{target_name}' is gone: the result comes as a new object")
        name = target_name or Path(path).stem
        try:
            obj = apply_texture(
                context,
                path,
                target,
                name,
                result,
                uv_map,
                modifiers,
                import_options(context.scene.trellis2),
            )
        except (RuntimeError, OSError) as exc:
            self.report({"ERROR"}, f"Texture result not applied: {one_line(exc, 300)}")
            return {"CANCELLED"}
        obj["trellis2_texture_job"] = self.job_id or (view.job_id if view else "")
        self.report({"INFO"}, f"Textured {obj.name}")
        return {"FINISHED"}


class TRELLIS2_OT_variations(bpy.types.Operator):
    """Generate several seeds of the chosen image, side by side in the Variations collection
    (Keep the one you like)"""

    bl_idname = "trellis2.variations"
    bl_label = "Generate Variations"
    bl_options = {"REGISTER", "UNDO"}

    count: IntProperty(
        name="Seeds",
        default=0,
        min=0,
        max=VARIATIONS_MAX,
        description="0: the panel's number",
        options={"SKIP_SAVE"},
    )
    mode: EnumProperty(name="Mode", items=MODES, default="AUTO", options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        reason = _job_problem(context) or sources.problem(context, context.scene.trellis2)
        return _refuse(cls, reason) if reason else True

    def execute(self, context):
        ctrl = _ctrl()
        props = context.scene.trellis2
        count = self.count or props.variations_count
        if not VARIATIONS_MIN <= count <= VARIATIONS_MAX:
            self.report({"ERROR"}, f"Seeds: {VARIATIONS_MIN} to {VARIATIONS_MAX}, not {count}")
            return {"CANCELLED"}
        try:
            image, name = sources.read(context, props)
        except (sources.SourceError, OSError) as exc:
            self.report({"ERROR"}, one_line(exc, 300))
            return {"CANCELLED"}
        seeds = _seeds(props, count)
        params = params_from(props, seeds[0])
        params.pop("seed")
        suffix = Path(props.filepath).suffix if props.source == "FILE" else ".png"
        group = groups.variations(
            name, image, f"{name}{suffix}", seeds, params, _cursor(context), _group_spacing(props)
        )
        ctrl.configure(backend_config(get_prefs(context)))
        ctrl.dismiss_outcome()
        try:
            ctrl.start_group(group)
            if _blocking(self.mode):
                ctrl.wait_group(group.key)
        except Exception as exc:
            _report_error(self, "Variations failed", exc)
            return {"CANCELLED"}
        _engine_notice(self, ctrl)
        text, _ = groups.summary(group)
        self.report({"INFO"}, f"{text} (seeds {', '.join(map(str, seeds))})")
        return {"FINISHED"}


def _variation_of(obj) -> str:
    key = obj.get("trellis2_group", "") if obj is not None else ""
    return key if isinstance(key, str) and key.startswith("variations-") else ""


class TRELLIS2_OT_keep_variation(bpy.types.Operator):
    """Keep the active variation: the others of its row go (and their jobs still running are
    cancelled), and it is placed like a normal result"""

    bl_idname = "trellis2.keep_variation"
    bl_label = "Keep"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        if not _variation_of(context.active_object):
            return _refuse(cls, "Select one of the variations (in the Variations collection)")
        return True

    def execute(self, context):
        obj = context.active_object
        key = _variation_of(obj)
        ctrl = runtime.get()
        if ctrl is not None:
            ctrl.cancel_group(key)  # seeds still running or waiting are not needed any more
        if context.mode != "OBJECT":
            bpy.ops.object.mode_set(mode="OBJECT")
        others = [o for o in bpy.data.objects if o.get("trellis2_group") == key and o != obj]
        removed = len(others)
        remove_objects(others)
        row = obj.users_collection[0] if obj.users_collection else None
        home = _ensure_collection(context.scene, context.view_layer, COLLECTION)
        for coll in list(obj.users_collection):
            coll.objects.unlink(obj)
        home.objects.link(obj)
        if row is not None and row is not home and not row.all_objects:
            bpy.data.collections.remove(row)
        obj.location += Vector(obj.get("trellis2_home", (0, 0, 0))) - Vector(
            obj.get("trellis2_slot", (0, 0, 0))
        )
        obj.show_name = False
        obj.name = obj.get("trellis2_name", obj.name)
        for prop in ("trellis2_group", "trellis2_home", "trellis2_slot", "trellis2_name"):
            if prop in obj:
                del obj[prop]
        for other in context.view_layer.objects:
            other.select_set(other == obj)
        context.view_layer.objects.active = obj
        self.report(
            {"INFO"}, f"Kept {obj.name} (seed {obj.get('trellis2_seed')}); {removed} removed"
        )
        return {"FINISHED"}


class TRELLIS2_OT_batch(bpy.types.Operator):
    """Queue every image of a folder; the results land in a grid in a collection named after
    the folder, and a batch log (JSON) lists each image's job, state and error"""

    bl_idname = "trellis2.batch"
    bl_label = "Batch Folder"
    bl_options = {"REGISTER", "UNDO"}

    directory: StringProperty(subtype="DIR_PATH", options={"SKIP_SAVE"})
    mode: EnumProperty(name="Mode", items=MODES, default="AUTO", options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        reason = _job_problem(context)
        if reason:
            return _refuse(cls, reason)
        if not context.scene.trellis2.batch_folder.strip():
            return _refuse(cls, "Choose a folder of images first")
        return True

    def execute(self, context):
        from .preferences import path_setting

        ctrl = _ctrl()
        props = context.scene.trellis2
        folder = path_setting(self.directory or bpy.path.abspath(props.batch_folder))
        try:
            names = os.listdir(folder)
        except OSError as exc:
            self.report({"ERROR"}, f"Cannot list {folder}: {exc.strerror or exc}")
            return {"CANCELLED"}
        images, others = groups.split_folder(
            [n for n in names if os.path.isfile(os.path.join(folder, n))]
        )
        if not images:
            self.report({"ERROR"}, f"No images in {folder} (PNG, JPEG, WebP, BMP, TGA, TIFF)")
            return {"CANCELLED"}
        params = params_from(props, 0)
        params.pop("seed")
        group = groups.batch(
            folder, images, others, params, _cursor(context), _group_spacing(props)
        )
        group.auto_import = props.auto_import
        for item, seed in zip(group.items, _seeds(props, len(images), False), strict=True):
            item.seed = seed
        ctrl.configure(backend_config(get_prefs(context)))
        ctrl.dismiss_outcome()
        try:
            ctrl.start_group(group)
            if _blocking(self.mode):
                ctrl.wait_group(group.key, timeout=max(600.0, 300.0 * len(images)))
        except Exception as exc:
            _report_error(self, "Batch failed", exc)
            return {"CANCELLED"}
        _engine_notice(self, ctrl)
        text, _ = groups.summary(group)
        self.report({"INFO"}, f"{text}; log: {group.log_path or '-'}")
        return {"FINISHED"}


class TRELLIS2_OT_cancel_group(bpy.types.Operator):
    """Cancel every job of this batch or variations row that has not ended"""

    bl_idname = "trellis2.cancel_group"
    bl_label = "Cancel All"

    group: StringProperty(options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        ctrl = runtime.get()
        if ctrl is None or not ctrl.active_groups():
            return _refuse(cls, "No batch or variations are running")
        return True

    def execute(self, context):
        ctrl = _ctrl()
        group = ctrl.cancel_group(self.group) if self.group else None
        if group is None and not self.group:
            for active in ctrl.active_groups():
                group = ctrl.cancel_group(active.key)
        if group is None:
            self.report({"WARNING"}, "No such batch or variations")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Cancelling {group.name}")
        return {"FINISHED"}


class TRELLIS2_OT_import_group_item(bpy.types.Operator):
    """Import one finished job of a batch or variations row at its place in the grid or row"""

    bl_idname = "trellis2.import_group_item"
    bl_label = "Import Group Result"
    bl_options = {"REGISTER", "UNDO"}

    group: StringProperty(options={"SKIP_SAVE"})
    index: IntProperty(min=0, options={"SKIP_SAVE"})

    def execute(self, context):
        ctrl = runtime.get()
        group = ctrl.groups.get(self.group) if ctrl is not None else None
        if group is None or self.index >= len(group.items):
            self.report({"ERROR"}, "No such batch or variations result")
            return {"CANCELLED"}
        item = group.items[self.index]
        view = ctrl.find(item.key) if item.key else None
        if view is None or not view.glb_path or not os.path.isfile(view.glb_path):
            self.report({"ERROR"}, f"No model file for {item.label}")
            return {"CANCELLED"}
        options = import_options(context.scene.trellis2)
        options.collection, options.at_cursor = group.collection, True
        options.location = group.location(self.index)
        try:
            obj = import_glb(context, view.glb_path, view.name, options)
        except (RuntimeError, OSError) as exc:
            self.report({"ERROR"}, f"Import failed: {one_line(exc, 300)}")
            return {"CANCELLED"}
        obj["trellis2_job"] = view.job_id
        obj["trellis2_group"] = group.key
        if item.seed is not None:
            obj["trellis2_seed"] = item.seed
        if group.kind == "variations":
            obj.show_name = True  # the seed is in the name, shown in the viewport
            obj["trellis2_name"] = group.name
            obj["trellis2_home"] = list(group.origin)
            obj["trellis2_slot"] = list(options.location)
        self.report({"INFO"}, f"Imported {obj.name}")
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


def _job_name(ctrl, job_id: str) -> str:
    """A job's name from this session or the history page (memory)."""
    view = ctrl.find(job_id)
    if view is not None and view.name:
        return view.name
    return (ctrl.history_entry(job_id) or {}).get("name", "")


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
            return self._fetch_then_import(context, ctrl)
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

    def _fetch_then_import(self, context, ctrl):
        """The job's model comes through the protocol (`fetch`) into the download cache and
        is imported from there: at once when it is here, else from the tick when it comes
        (scripts follow it with `wait()`, which waits for downloads too)."""
        job_id, name = self.job_id, self.name or _job_name(ctrl, self.job_id)
        download = ctrl.fetch_file(job_id, RESULT)
        location = (
            tuple(self.location) if self.use_location else tuple(context.scene.cursor.location)
        )
        options = {"job_id": job_id, "name": name, "location": location, "use_location": True}
        if download.done:
            if download.error is not None:
                self.report({"ERROR"}, f"No model for job {job_id}: {download.error.message}")
                return {"CANCELLED"}
            return bpy.ops.trellis2.import_result(filepath=download.path, **options)

        def arrived(download) -> None:
            if download.error is not None:
                ctrl.last_error = f"Import of {name or job_id} failed: {download.error.message}"
                return
            bpy.ops.trellis2.import_result(filepath=download.path, **options)

        ctrl.fetch_file(job_id, RESULT, arrived)
        self.report({"INFO"}, f"Downloading {name or job_id}: it is imported when it is here")
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
            "remesh_band": float(props.remesh_band),
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
        name = file_name((entry or {}).get("input"))
        if not name:
            self.report({"ERROR"}, "The job's input image is gone")
            return {"CANCELLED"}
        props = context.scene.trellis2
        seed = random_seed()
        props.last_seed = seed
        params = {"preset": entry.get("preset") or props.preset, "seed": seed}
        ctrl.configure(backend_config(get_prefs(context)))
        filename = entry.get("filename") or "image.png"
        cursor, auto_import = _cursor(context), props.auto_import

        def submit(download):
            """The input came (through `fetch`): the same image with the new seed."""
            if download.error is not None:
                raise RuntimeError(f"the job's input image is gone: {download.error.message}")
            image = Path(download.path).read_bytes()
            return ctrl.submit(image, params, entry["name"], filename, auto_import, cursor)

        download = ctrl.fetch_file(self.job_id, name)
        if not download.done:  # sent from the tick once the image is here

            def later(download) -> None:
                try:
                    submit(download)
                except Exception as exc:  # shown in the panel; a tick never raises
                    ctrl.last_error = f"New Seed failed: {one_line(exc)}"

            ctrl.fetch_file(self.job_id, name, later)
            self.report({"INFO"}, f"{entry['name']}: seed {seed}, fetching its image")
            return {"FINISHED"}
        try:
            view = submit(download)
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

    @classmethod
    def poll(cls, context):
        return _local_only(cls)  # a studio server's folders are on the server

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
        if not _local_only(cls):
            return False
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

    @classmethod
    def poll(cls, context):
        return _local_only(cls)

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
        if not _local_only(cls):
            return False
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
        if not _local_only(cls):
            return False
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
    TRELLIS2_OT_texture_mesh,
    TRELLIS2_OT_apply_texture,
    TRELLIS2_OT_variations,
    TRELLIS2_OT_keep_variation,
    TRELLIS2_OT_batch,
    TRELLIS2_OT_cancel_group,
    TRELLIS2_OT_import_group_item,
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
