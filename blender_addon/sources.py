"""Image sources for a generation: a file, an Image datablock, the clipboard, the Render Result,
or a render of the active camera's view. Each returns PNG/JPEG bytes and a name for the result."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import bpy

SOURCES = (
    ("FILE", "File", "An image file on disk", "FILEBROWSER", 0),
    ("IMAGE", "Image", "An image already loaded in Blender", "IMAGE_DATA", 1),
    ("CLIPBOARD", "Clipboard", "An image pasted from the clipboard", "PASTEDOWN", 2),
    ("RENDER", "Render Result", "The last render (F12)", "RENDER_RESULT", 3),
    ("CAMERA", "Camera View", "Render the active camera's view now", "CAMERA_DATA", 4),
)


class SourceError(Exception):
    """The chosen source cannot give an image; the message says why (shown to the user)."""


def problem(context: bpy.types.Context, props) -> str | None:
    """Why Generate cannot read the current source (cheap: used in poll)."""
    kind = props.source
    if kind == "FILE":
        path = bpy.path.abspath(props.filepath) if props.filepath else ""
        if not path:
            return "Choose an image file first"
        if not os.path.isfile(path):
            return f"No file at {path}"
    elif kind == "IMAGE":
        if props.image is None:
            return "Choose an Image datablock first"
        if not _image_has_pixels(props.image):
            return f"Image '{props.image.name}' has no pixels (missing file?)"
    elif kind == "CLIPBOARD":
        if props.clipboard_image is None:
            return "Nothing pasted yet: click Paste from Clipboard"
    elif kind == "RENDER":
        from . import runtime

        if render_result() is None:
            return "No Render Result yet: render an image first (F12)"
        if not runtime.render_available():
            return "The Render Result is empty (no render since this file was opened): press F12"
    elif kind == "CAMERA" and context.scene.camera is None:
        return "The scene has no active camera"
    return None


def render_result() -> bpy.types.Image | None:
    """The Render Result image (by type: an ordinary image may carry that name too)."""
    return next((i for i in bpy.data.images if i.type == "RENDER_RESULT"), None)


def _image_has_pixels(image: bpy.types.Image) -> bool:
    if image.type == "RENDER_RESULT":
        return True
    if image.packed_file is not None or image.source == "GENERATED":
        return True
    path = bpy.path.abspath(image.filepath_raw or image.filepath)
    return image.has_data or (bool(path) and os.path.isfile(path))


def read(context: bpy.types.Context, props) -> tuple[bytes, str]:
    """(image bytes, name) for the current source; raises SourceError with the reason."""
    reason = problem(context, props)
    if reason:
        raise SourceError(reason)
    kind = props.source
    if kind == "FILE":
        path = Path(bpy.path.abspath(props.filepath))
        return path.read_bytes(), path.stem
    if kind == "IMAGE":
        return image_bytes(props.image), _stem(props.image)
    if kind == "CLIPBOARD":
        return image_bytes(props.clipboard_image), "clipboard"
    if kind == "RENDER":
        return render_result_bytes(context.scene), "render"
    return camera_view_bytes(context.scene, props.camera_size), context.scene.camera.name


def _stem(image: bpy.types.Image) -> str:
    if image.filepath:
        stem = Path(bpy.path.abspath(image.filepath)).stem
        if stem:
            return stem
    return Path(image.name).stem or image.name


def image_bytes(image: bpy.types.Image) -> bytes:
    """The image's own file when it is unchanged on disk or packed, else its pixels as PNG."""
    if image.packed_file is not None and not image.is_dirty:
        return bytes(image.packed_file.data)
    path = bpy.path.abspath(image.filepath_raw or image.filepath) if image.filepath else ""
    if path and os.path.isfile(path) and not image.is_dirty and image.source == "FILE":
        return Path(path).read_bytes()
    return pixels_png(image)


def pixels_png(image: bpy.types.Image) -> bytes:
    """Encode an image's pixels as an 8-bit RGBA PNG (float buffers go linear -> sRGB)."""
    import numpy as np
    from PIL import Image

    width, height = image.size
    if width == 0 or height == 0:
        raise SourceError(f"Image '{image.name}' is empty")
    buf = np.empty(width * height * 4, dtype=np.float32)
    image.pixels.foreach_get(buf)
    rgba = buf.reshape(height, width, 4)[::-1]
    if image.is_float and image.colorspace_settings.name not in ("sRGB", "Non-Color"):
        rgb = np.clip(rgba[..., :3], 0.0, None)
        rgba = rgba.copy()
        rgba[..., :3] = np.where(
            rgb <= 0.0031308, rgb * 12.92, 1.055 * np.power(rgb, 1 / 2.4) - 0.055
        )
    data = (np.clip(rgba, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(data, "RGBA").save(out, format="PNG")
    return out.getvalue()


class _RenderSettings:
    """Temporarily change render output settings; restore them on exit."""

    def __init__(self, scene: bpy.types.Scene, **changes):
        self.scene = scene
        self.changes = changes
        self.saved: list[tuple[object, str, object]] = []

    def __enter__(self):
        render = self.scene.render
        targets = {
            "file_format": render.image_settings,
            "color_mode": render.image_settings,
            "color_depth": render.image_settings,
        }
        for key, value in self.changes.items():
            owner = targets.get(key, render)
            self.saved.append((owner, key, getattr(owner, key)))
            setattr(owner, key, value)
        return self

    def __exit__(self, *exc):
        for owner, key, value in reversed(self.saved):
            setattr(owner, key, value)


def render_result_bytes(scene: bpy.types.Scene) -> bytes:
    image = render_result()
    if image is None:
        raise SourceError("No Render Result yet: render an image first (F12)")
    with tempfile.TemporaryDirectory(prefix="trellis2-") as tmp:
        path = os.path.join(tmp, "render.png")
        try:
            with _RenderSettings(scene, file_format="PNG", color_mode="RGBA", color_depth="8"):
                image.save_render(path, scene=scene)
        except RuntimeError as exc:  # e.g. the result was freed
            raise SourceError(f"The Render Result cannot be saved: {exc}") from None
        if not os.path.isfile(path):
            raise SourceError("The Render Result is empty: render an image first (F12)")
        return Path(path).read_bytes()


def camera_view_bytes(scene: bpy.types.Scene, size: int = 512) -> bytes:
    """Render the active camera's view small, on a transparent background, with the scene's
    current engine; all render settings are restored afterwards."""
    if scene.camera is None:
        raise SourceError("The scene has no active camera")
    render = scene.render
    aspect = (render.resolution_x * render.pixel_aspect_x) / max(
        1.0, render.resolution_y * render.pixel_aspect_y
    )
    width, height = (
        (size, max(1, round(size / aspect)))
        if aspect >= 1
        else (
            max(1, round(size * aspect)),
            size,
        )
    )
    with tempfile.TemporaryDirectory(prefix="trellis2-") as tmp:
        path = os.path.join(tmp, "camera.png")
        with _RenderSettings(
            scene,
            resolution_x=width,
            resolution_y=height,
            resolution_percentage=100,
            film_transparent=True,
            filepath=path,
            file_format="PNG",
            color_mode="RGBA",
            color_depth="8",
            use_file_extension=True,
        ):
            bpy.ops.render.render(write_still=True, scene=scene.name)
        if not os.path.isfile(path):
            raise SourceError("The camera render wrote no image")
        return Path(path).read_bytes()


def paste_clipboard(context: bpy.types.Context) -> bpy.types.Image:
    """Paste the clipboard's image as a datablock. The operator only runs in an Image Editor,
    so borrow an area of the current window for the call and give it back."""
    window = context.window
    screen = window.screen if window else None
    if screen is None or not screen.areas:
        raise SourceError("Pasting needs a Blender window (not available in background mode)")
    if not hasattr(bpy.ops.image, "clipboard_paste"):
        raise SourceError("This Blender has no clipboard image paste (4.2 or newer needed)")
    area = next((a for a in screen.areas if a.type == "IMAGE_EDITOR"), None)
    borrowed = None
    if area is None:
        area = screen.areas[0]
        borrowed = area.type
        area.type = "IMAGE_EDITOR"
    before = set(bpy.data.images)
    try:
        region = next((r for r in area.regions if r.type == "WINDOW"), None)
        with context.temp_override(window=window, screen=screen, area=area, region=region):
            if not bpy.ops.image.clipboard_paste.poll():
                raise SourceError("The clipboard holds no image")
            result = bpy.ops.image.clipboard_paste()
    except RuntimeError as exc:
        raise SourceError(f"Paste failed: {exc}") from None
    finally:
        if borrowed is not None:
            area.type = borrowed
    new = [img for img in bpy.data.images if img not in before]
    if "FINISHED" not in result or not new:
        raise SourceError("The clipboard holds no image")
    return new[0]
