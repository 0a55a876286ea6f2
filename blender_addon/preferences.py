"""Add-on preferences: where the backend runs and how it is respawned, plus its live status."""

from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from .controller import BackendConfig, default_output_dir

ENGINES = (
    ("preview", "Preview (no GPU)", "A quick CPU proxy with no weights: not TRELLIS.2"),
    ("trellis2", "TRELLIS.2", "The real model: needs an NVIDIA GPU and a TRELLIS.2 environment"),
)
RESPAWN = (
    ("AFTER_FAILURE", "After Failures", "Restart the backend when a job fails or it crashes"),
    ("EVERY_N", "Every N Jobs", "Also restart after every N jobs (VRAM back regularly)"),
    ("FRESH", "Fresh per Job", "A new backend process for every job (slow start each time)"),
    ("STANDBY", "Warm Standby", "Fresh per job, with the next backend loading while one works"),
)


def addon_package() -> str:
    return __package__.rpartition(".")[0]  # the extension's module (bl_ext.<repo>.<id>)


def get_prefs(context=None):
    context = context or bpy.context
    addon = context.preferences.addons.get(addon_package())
    return addon.preferences if addon is not None else None


def backend_config(prefs) -> BackendConfig:
    """The controller's configuration from the preferences (defaults when there are none)."""
    if prefs is None:
        return BackendConfig()
    options = {}
    if prefs.weights_dir:
        options["weights_dir"] = bpy.path.abspath(prefs.weights_dir)
    if prefs.trellis_checkout:
        options["trellis_checkout"] = bpy.path.abspath(prefs.trellis_checkout)
    output = bpy.path.abspath(prefs.output_dir) if prefs.output_dir else ""
    return BackendConfig(
        python=bpy.path.abspath(prefs.python) if prefs.python else "",
        engine=prefs.engine,
        engine_options=options,
        output_dir=Path(output) if output else default_output_dir(),
        respawn=prefs.respawn,
        every_n=prefs.every_n,
    )


def _apply(self, context) -> None:
    from . import runtime

    ctrl = runtime.get()
    if ctrl is not None:
        ctrl.configure(backend_config(self))


def _size(n) -> str:
    return f"{n / 2**30:.1f} GiB" if isinstance(n, (int, float)) and n else "?"


class TRELLIS2_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = addon_package()

    python: StringProperty(
        name="Backend Python",
        subtype="FILE_PATH",
        description="Interpreter of a TRELLIS.2 environment; empty runs Blender's own Python "
        "(preview engine, no setup)",
        update=_apply,
    )
    engine: EnumProperty(name="Engine", items=ENGINES, default="preview", update=_apply)
    trellis_checkout: StringProperty(name="TRELLIS.2 Checkout", subtype="DIR_PATH", update=_apply)
    weights_dir: StringProperty(name="Weights Directory", subtype="DIR_PATH", update=_apply)
    output_dir: StringProperty(
        name="Output Directory",
        subtype="DIR_PATH",
        description=f"Job folders (history); empty uses {default_output_dir()}",
        update=_apply,
    )
    respawn: EnumProperty(name="Respawn", items=RESPAWN, default="AFTER_FAILURE", update=_apply)
    every_n: IntProperty(name="N", default=10, min=1, max=1000, update=_apply)

    def draw(self, context):
        from . import runtime

        layout = self.layout
        col = layout.column()
        col.prop(self, "python")
        if not self.python:
            col.label(text="Blender's own Python: runs the preview engine, no setup", icon="INFO")
        col.prop(self, "engine")
        col.prop(self, "trellis_checkout")
        col.prop(self, "weights_dir")
        col.prop(self, "output_dir")
        row = col.row(align=True)
        row.prop(self, "respawn")
        if self.respawn == "EVERY_N":
            row.prop(self, "every_n")

        box = layout.box()
        ctrl = runtime.get()
        status = ctrl.status() if ctrl is not None else {"state": "stopped"}
        row = box.row()
        row.label(text=f"Backend: {status['state']}", icon=runtime.state_icon(status["state"]))
        if status.get("reason"):
            box.label(text=str(status["reason"]))
        if ctrl is not None and ctrl.config_changed:
            box.label(text="Settings changed: Restart to apply", icon="ERROR")
        if status.get("gpu") or status.get("vram_total"):
            box.label(
                text=f"GPU: {status.get('gpu') or 'none'}   VRAM {_size(status.get('vram_used'))}"
                f" / {_size(status.get('vram_total'))}"
            )
        row = box.row(align=True)
        row.operator("trellis2.backend", text="Start", icon="PLAY").action = "START"
        row.operator("trellis2.backend", text="Stop", icon="SNAP_FACE").action = "STOP"
        row.operator("trellis2.backend", text="Restart", icon="FILE_REFRESH").action = "RESTART"
        row = box.row(align=True)
        row.operator("trellis2.backend", text="Refresh Status", icon="INFO").action = "STATUS"
        row.operator("trellis2.open_log", icon="TEXT")
        row.operator("trellis2.doctor", icon="CHECKMARK")
        draw_doctor(box, ctrl)


def draw_doctor(layout, ctrl) -> None:
    if ctrl is None or not ctrl.doctor_text:
        return
    col = layout.column(align=True)
    col.label(text=f"Doctor: {ctrl.doctor_text.splitlines()[0][:120]}")
    report = ctrl.doctor_report or {}
    for check in report.get("checks", [])[:30]:
        if not isinstance(check, dict):
            continue
        ok = check.get("ok")
        col.label(
            text=f"{check.get('name', '?')}: {check.get('detail') or check.get('message') or ''}"[
                :140
            ],
            icon="CHECKMARK" if ok else "ERROR",
        )
        if not ok and check.get("hint"):
            col.label(text=f"    {check['hint']}"[:140])


classes = (TRELLIS2_AP_preferences,)


register, unregister = bpy.utils.register_classes_factory(classes)
