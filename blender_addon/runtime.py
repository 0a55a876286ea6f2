"""Glue between Blender and the controller: the one Controller of this session, the timer that
ticks it on the main thread, UI redraws and thumbnail icons."""

from __future__ import annotations

import atexit
import time

import bpy

from .controller import Controller, JobView

_controller: Controller | None = None
_previews = None  # bpy.utils.previews collection: history and input thumbnails
_last_redraw = 0.0
REDRAW_EVERY = 0.2  # seconds: progress bars need no more than 5 redraws a second

STATE_ICONS = {
    "stopped": "RADIOBUT_OFF",
    "starting": "SORTTIME",
    "loading": "SORTTIME",
    "ready": "CHECKMARK",
    "busy": "RENDER_ANIMATION",
    "restarting": "FILE_REFRESH",
    "dead": "ERROR",
}


def get() -> Controller | None:
    return _controller


def state_icon(state: str) -> str:
    return STATE_ICONS.get(state, "QUESTION")


def timer() -> float | None:
    """The bpy.app.timers callback. All logic is in Controller.tick (tests call that)."""
    if _controller is None:
        return None
    return _controller.tick()


def _import_finished(view: JobView) -> None:
    if view.glb_path:
        bpy.ops.trellis2.import_result(job_id=view.job_id, filepath=view.glb_path, name=view.name)
        view.imported = True


def tag_redraw(force: bool = False) -> None:
    global _last_redraw
    now = time.monotonic()
    if not force and now - _last_redraw < REDRAW_EVERY:
        return
    _last_redraw = now
    wm = getattr(bpy.context, "window_manager", None)
    for window in getattr(wm, "windows", ()):
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()


def icon_for(path: str) -> int:
    """An icon id for an image file (history thumbnails, the input preview); 0 if unreadable."""
    if _previews is None or not path:
        return 0
    item = _previews.get(path)
    if item is None:
        try:
            item = _previews.load(path, path, "IMAGE")
        except (KeyError, RuntimeError):
            return 0
    return item.icon_id


def forget_icon(path: str) -> None:
    if _previews is not None and path in _previews:
        del _previews[path]


def start() -> Controller:
    """Called from register(): a controller with the preferences' configuration and a timer."""
    global _controller, _previews
    import bpy.utils.previews

    from .preferences import backend_config, get_prefs

    _previews = bpy.utils.previews.new()
    _controller = Controller(backend_config(get_prefs()))
    _controller.on_job_done = _import_finished
    _controller.on_change = tag_redraw
    if not bpy.app.timers.is_registered(timer):
        bpy.app.timers.register(timer, first_interval=0.1, persistent=True)
    atexit.register(_at_exit)
    return _controller


def stop() -> None:
    """Called from unregister(): stop the backend (no orphans), drop the timer and icons."""
    global _controller, _previews
    if bpy.app.timers.is_registered(timer):
        bpy.app.timers.unregister(timer)
    atexit.unregister(_at_exit)
    ctrl, _controller = _controller, None
    if ctrl is not None:
        ctrl.shutdown()
    if _previews is not None:
        bpy.utils.previews.remove(_previews)
        _previews = None


def _at_exit() -> None:
    if _controller is not None:
        _controller.shutdown()
