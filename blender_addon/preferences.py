"""Add-on preferences: where the backend runs and how it is respawned, plus its live status."""

from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from ..backend.paths import expand
from .launch import BackendConfig, default_output_dir
from .wording import ENGINES, engine_label, one_line

WHERE = (
    ("LOCAL", "This Computer", "A backend on this computer, started and watched by the add-on"),
    ("REMOTE", "Remote Server", "A studio GPU server (its gateway), with a connection string"),
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


def path_setting(text: str) -> str:
    """A typed path made absolute: `~` is home, `//` is next to the .blend file, and any other
    relative path starts at home (never at Blender's working directory)."""
    blend = bpy.data.filepath
    return expand(text, blend_dir=Path(blend).parent if blend else None)


def backend_config(prefs) -> BackendConfig:
    """The controller's configuration from the preferences (defaults when there are none)."""
    if prefs is None:
        return BackendConfig()
    if prefs.backend == "REMOTE":
        return BackendConfig(where="REMOTE", connection=prefs.connection.strip())
    options = {}
    if prefs.weights_dir.strip():
        options["weights_dir"] = path_setting(prefs.weights_dir)
    if prefs.trellis_checkout.strip():
        options["trellis_checkout"] = path_setting(prefs.trellis_checkout)
    output = path_setting(prefs.output_dir)
    return BackendConfig(
        python=path_setting(prefs.python),
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


def _apply_output(self, context) -> None:
    """A new output folder is checked now, so the panel says at once when it cannot work."""
    from . import runtime

    _apply(self, context)
    ctrl = runtime.get()
    if ctrl is not None:
        ctrl.recheck_output()


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
        update=_apply_output,
    )
    respawn: EnumProperty(name="Respawn", items=RESPAWN, default="AFTER_FAILURE", update=_apply)
    every_n: IntProperty(name="N", default=10, min=1, max=1000, update=_apply)
    backend: EnumProperty(name="Backend", items=WHERE, default="LOCAL", update=_apply)
    # A credential (the artist's secret key): drawn as dots, never put in a label or a log.
    connection: StringProperty(
        name="Connection String",
        subtype="PASSWORD",
        description="The line `python -m backend gateway add-user NAME` printed for you "
        "(trellis2-remote-1:...); treat it as a password",
        update=_apply,
    )

    def draw(self, context):
        from . import runtime

        layout = self.layout
        layout.row().prop(self, "backend", expand=True)
        if self.backend == "REMOTE":
            draw_remote(layout, self, runtime.get())
            return
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
        draw_status(box, ctrl)
        status = ctrl.status() if ctrl is not None else {}
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


def draw_remote(layout, prefs, ctrl) -> None:
    """Remote Server: the connection string and what the gateway says; the processes are
    the server admin's, so there is no interpreter, engine or respawn to set here."""
    from .remotelink import describe

    col = layout.column()
    col.prop(prefs, "connection")
    where = describe(prefs.connection.strip())
    if prefs.connection.strip() and not where:
        draw_error(
            col,
            "This is not a TRELLIS.2 server connection string",
            "Paste the whole line the studio admin gave you (trellis2-remote-1:...).",
        )
    elif where:
        col.label(text=f"Server: {where}", icon="URL")
    box = layout.box()
    draw_status(box, ctrl)
    remote = (ctrl.status().get("remote") if ctrl is not None else None) or {}
    if remote.get("user"):
        box.label(text=f"{remote['workers']} GPU worker(s), {remote['queue']} job(s) waiting")
    row = box.row(align=True)
    row.operator("trellis2.backend", text="Connect", icon="PLAY").action = "START"
    row.operator("trellis2.backend", text="Disconnect", icon="SNAP_FACE").action = "STOP"
    row.operator("trellis2.backend", text="Reconnect", icon="FILE_REFRESH").action = "RESTART"
    box.label(text="Doctor, logs and restarts of the GPU backends are the server admin's")


def draw_status(layout, ctrl) -> None:
    """The backend's state and the engine it runs; why it stopped; settings waiting for a
    Restart; the output folder's problem. Memory only: this runs on every redraw."""
    if ctrl is None:
        layout.label(text="Backend: stopped", icon="RADIOBUT_OFF")
        return
    from . import runtime

    status = ctrl.status()
    state = status["state"]
    engine = status.get("engine") or ctrl.next_engine()
    row = layout.row()
    row.label(text=f"Backend: {state} - {engine}", icon=runtime.state_icon(state))
    row.operator("trellis2.backend", text="", icon="FILE_REFRESH").action = "RESTART"
    if status.get("reason") and state in ("dead", "restarting", "starting", "stopping"):
        layout.label(text=one_line(status["reason"], 120), icon="INFO")
    draw_error(layout, ctrl.last_error, ctrl.last_hint)
    if ctrl.config_changed:
        col = layout.column(align=True)
        col.label(text="Settings changed: they wait for a Restart", icon="ERROR")
        col.label(text=f"Running: {ctrl.running_engine()}; after Restart: {_next(ctrl)}")
    problem = ctrl.known_output_problem
    if problem:
        draw_error(layout, f"Output Directory: {problem}", "Choose a folder you can write to.")


def _next(ctrl) -> str:
    return "Studio server" if ctrl.config.remote else engine_label(ctrl.config.engine)


def draw_error(layout, message: str, hint: str = "") -> None:
    """An error and its fix on separate lines."""
    if not message:
        return
    col = layout.column(align=True)
    col.label(text=one_line(message, 140), icon="ERROR")
    if hint:
        col.label(text=one_line(hint, 140), icon="INFO")


def draw_doctor(layout, ctrl) -> None:
    if ctrl is None or not ctrl.doctor.text:
        return
    col = layout.column(align=True)
    col.label(text=f"Doctor: {one_line(ctrl.doctor.text, 120)}")
    report = ctrl.doctor.report or {}
    checks = [c for c in report.get("checks", []) if isinstance(c, dict)]
    optional = [c for c in checks if c.get("optional")]
    for check in [c for c in checks if not c.get("optional")][:30]:
        _draw_check(col, check)
    if optional:
        missing = sum(1 for c in optional if not c.get("ok"))
        col.label(text=f"TRELLIS.2 only (optional with the preview engine): {missing} missing")
        for check in optional[:20]:
            _draw_check(col, check, optional=True)


def _draw_check(col, check: dict, optional: bool = False) -> None:
    ok = check.get("ok")
    icon = "CHECKMARK" if ok else "INFO" if optional else "ERROR"
    detail = check.get("detail") or check.get("message") or ""
    col.label(text=one_line(f"{check.get('name', '?')}: {detail}", 140), icon=icon)
    if not ok and check.get("hint"):
        col.label(text=one_line(f"    {check['hint']}", 140))


classes = (TRELLIS2_AP_preferences,)


register, unregister = bpy.utils.register_classes_factory(classes)
