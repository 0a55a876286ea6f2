"""Glue between Blender and the controller: the one Controller of this session, the timer that
ticks it on the main thread (it cannot die: whatever goes wrong inside is reported, and it keeps
its schedule), UI redraws, thumbnail icons and whether a render exists."""

from __future__ import annotations

import atexit
import logging
import os
import time

import bpy
from bpy.app.handlers import persistent

from .controller import IDLE_INTERVAL, Controller
from .views import JobView

log = logging.getLogger("trellis2_blender")

_controller: Controller | None = None
_previews = None  # bpy.utils.previews collection: history and input thumbnails
_last_redraw = 0.0
_input_preview = ""  # the input file whose thumbnail was last asked for
_render = {"done": False}  # a render finished in this session (the Render Result has pixels)
REDRAW_EVERY = 0.2  # seconds: progress bars need no more than 5 redraws a second

STATE_ICONS = {
    "stopped": "RADIOBUT_OFF",
    "starting": "SORTTIME",
    "loading": "SORTTIME",
    "ready": "CHECKMARK",
    "busy": "RENDER_ANIMATION",
    "restarting": "FILE_REFRESH",
    "stopping": "SORTTIME",
    "dead": "ERROR",
}


def get() -> Controller | None:
    return _controller


def state_icon(state: str) -> str:
    return STATE_ICONS.get(state, "QUESTION")


def timer() -> float | None:
    """The bpy.app.timers callback. Blender drops a timer whose callback raises, so nothing
    may escape: the controller guards each part of its tick, and this guards the rest."""
    ctrl = _controller
    if ctrl is None:
        return None
    try:
        interval = ctrl.tick()
    except Exception as exc:
        ctrl.report_error("ticking", exc)
        interval = IDLE_INTERVAL
    try:
        _refresh_input_preview()
    except Exception as exc:
        ctrl.report_error("loading the input thumbnail", exc)
    return interval


def ensure_timer() -> None:
    """Register the timer again if anything removed it (operators call this; cheap)."""
    if _controller is not None and not bpy.app.timers.is_registered(timer):
        bpy.app.timers.register(timer, first_interval=0.1, persistent=True)


def _import_finished(view: JobView) -> None:
    """A finished job's result into the scene, each import one operator (one undo step)."""
    if not view.glb_path:
        return
    if view.kind == "texture":
        result = bpy.ops.trellis2.apply_texture(job_id=view.job_id)
    elif view.group:
        group, item = _controller.item_of(view)
        if group is None or item is None or group.cancelled:
            return  # a Keep or Cancel All came first: nobody wants this one any more
        result = bpy.ops.trellis2.import_group_item(group=group.key, index=item.index)
    else:
        options = {"job_id": view.job_id, "filepath": view.glb_path, "name": view.name}
        if view.cursor is not None:  # where the cursor was when Generate was pressed
            options.update(location=view.cursor, use_location=True)
        result = bpy.ops.trellis2.import_result(**options)
    if "FINISHED" not in result:
        raise RuntimeError("the model could not be imported (see the Info report)")
    view.imported = True
    active = bpy.context.view_layer.objects.active
    view.object_name = active.name if active is not None else ""


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


# -- icons: loaded in the tick or when a setting changes, only looked up while drawing ----------


def icon_for(path: str) -> int:
    """The icon id of an image already loaded by load_icon (0 if none): drawing reads memory."""
    if _previews is None or not path:
        return 0
    item = _previews.get(path)
    return item.icon_id if item is not None else 0


def load_icon(path: str) -> None:
    """Load an image file as an icon (history thumbnails, the input preview)."""
    if _previews is None or not path or path in _previews or not os.path.isfile(path):
        return
    try:
        _previews.load(path, path, "IMAGE")
    except (KeyError, RuntimeError) as exc:
        log.debug("no icon for %s: %s", path, exc)


def forget_icon(path: str) -> None:
    if _previews is not None and path in _previews:
        del _previews[path]


def _load_history_icons(entries: list[dict]) -> None:
    """Thumbnails already downloaded (the others come through `_thumbnail_arrived`)."""
    for entry in entries:
        load_icon(entry.get("thumbnail_file") or "")


def _thumbnail_arrived(path: str) -> None:
    load_icon(path)
    tag_redraw()


def _cache_root():
    """Downloads go to the extension's own user folder (kept across Blender versions'
    updates of the extension), else a private temporary folder."""
    from .preferences import addon_package

    try:
        return bpy.utils.extension_path_user(addon_package(), path="downloads", create=True)
    except (AttributeError, ValueError, OSError) as exc:  # not installed as an extension
        log.debug("no extension user folder: %s", exc)
        return None


def _refresh_input_preview() -> None:
    global _input_preview
    scene = getattr(bpy.context, "scene", None)
    props = getattr(scene, "trellis2", None)
    if props is None or props.source != "FILE" or not props.filepath:
        return
    path = bpy.path.abspath(props.filepath)
    if path != _input_preview:
        _input_preview = path
        load_icon(path)


# -- renders: whether the Render Result holds an image (polls read this flag) ------------------


def render_available() -> bool:
    return _render["done"]


@persistent
def _on_render_complete(*_args) -> None:
    _render["done"] = True


@persistent
def _on_load_post(*_args) -> None:
    _render["done"] = False  # a loaded file's Render Result holds no pixels
    ensure_timer()


_HANDLERS = (
    (bpy.app.handlers.render_complete, _on_render_complete),
    (bpy.app.handlers.load_post, _on_load_post),
)


def start() -> Controller:
    """Called from register(): a controller with the preferences' configuration and a timer."""
    global _controller, _previews
    import bpy.utils.previews

    from .preferences import backend_config, get_prefs

    _previews = bpy.utils.previews.new()
    _controller = Controller(backend_config(get_prefs()), cache_root=_cache_root())
    _controller.on_job_done = _import_finished
    _controller.on_change = tag_redraw
    _controller.on_history = _load_history_icons
    _controller.on_file = _thumbnail_arrived
    ensure_timer()
    for handlers, handler in _HANDLERS:
        if handler not in handlers:
            handlers.append(handler)
    atexit.register(_at_exit)
    return _controller


def stop() -> None:
    """Called from unregister(): stop the backend (no orphans), drop the timer and icons."""
    global _controller, _previews, _input_preview
    if bpy.app.timers.is_registered(timer):
        bpy.app.timers.unregister(timer)
    for handlers, handler in _HANDLERS:
        if handler in handlers:
            handlers.remove(handler)
    atexit.unregister(_at_exit)
    ctrl, _controller = _controller, None
    if ctrl is not None:
        ctrl.shutdown()
    if _previews is not None:
        bpy.utils.previews.remove(_previews)
        _previews = None
    _input_preview = ""


def _at_exit() -> None:
    if _controller is not None:
        _controller.shutdown()
