"""Input images: size limits checked before decoding (decompression bombs), formats, modes,
orientation, 8-bit conversion and the transparency check."""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..errors import ErrorCode, InputError, describe


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 12_000
    min_side: int = 8


# Only formats a user plausibly feeds to image-to-3D. Pillow would otherwise also try EPS
# (which shells out to Ghostscript), PSD, FITS, DDS and others: more attack surface, no gain.
# (MPO, a JPEG variant from cameras, comes through the JPEG opener.)
_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "ICO", "TGA", "AVIF")


def _open_formats() -> list[str]:
    # Pillow raises KeyError for a format it has no plugin for (AVIF is new in Pillow 11.2).
    Image.init()
    return [name for name in _IMAGE_FORMATS if name in Image.OPEN]


# TRELLIS.2's preprocessing crops the bounding box of alpha > 0.8 * 255; with no such pixel
# the crop is empty and it crashes, so such an image is refused up front.
_ALPHA_CROP_THRESHOLD = int(0.8 * 255)  # 204: a pixel counts when alpha > 204

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _bad_image(message: str, hint: str | None = None) -> InputError:
    return InputError(ErrorCode.BAD_IMAGE, message, hint)


def _too_large(message: str) -> InputError:
    return InputError(
        ErrorCode.IMAGE_TOO_LARGE,
        message,
        "Scale the image down (for example to 2048 px on its longer side) and try again.",
    )


def _check_dimensions(width: int, height: int, limits: ImageLimits, what: str = "image") -> None:
    if width * height > limits.max_pixels:
        raise _too_large(
            f"The {what} is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {limits.max_pixels:,}."
        )
    if max(width, height) > limits.max_side:
        raise _too_large(
            f"The {what} is {width}x{height}; no side may exceed {limits.max_side} px."
        )
    if min(width, height) < limits.min_side:
        raise _bad_image(
            f"The {what} is {width}x{height}; each side needs at least {limits.min_side} px.",
            "Use a larger image (at least 256 px on each side works best).",
        )


def _check_ico_entries(data: bytes, limits: ImageLimits) -> None:
    """ICO files may embed PNGs whose real size differs from the directory entry, and Pillow
    decodes the embedded PNG before noticing: check those PNG headers ourselves first."""
    if len(data) < 6:
        return
    _reserved, _kind, count = struct.unpack_from("<HHH", data, 0)
    for i in range(min(count, 256)):
        entry = 6 + 16 * i
        if entry + 16 > len(data):
            return
        offset = struct.unpack_from("<I", data, entry + 12)[0]
        head = data[offset : offset + 24]
        if len(head) == 24 and head.startswith(b"\x89PNG\r\n\x1a\n"):
            width, height = struct.unpack(">II", head[16:24])
            _check_dimensions(width, height, limits, what="image inside the icon")


def load_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode untrusted image bytes into a loaded 8-bit "RGB" or "RGBA" image (RGBA only when
    the alpha channel is actually used), or raise InputError. Sizes are checked before decoding."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _bad_image(f"Expected image bytes, got {type(data).__name__}.")
    data = bytes(data)
    if len(data) == 0:
        raise _bad_image("The image is empty (0 bytes).")
    if len(data) > limits.max_bytes:
        raise _too_large(
            f"The image file is {len(data):,} bytes; the limit is {limits.max_bytes:,}."
        )

    if data[:4] == b"\x00\x00\x01\x00":
        _check_ico_entries(data, limits)  # Pillow decodes icons inside Image.open already

    # Silence Pillow's warnings while decoding: DecompressionBombWarning because our own,
    # stricter limits decide; "corrupt EXIF" and the like because they only flood the log.
    # (catch_warnings is process-wide; a racing thread can at worst lose or show a warning.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data), formats=_open_formats())
        except Image.DecompressionBombError:
            raise _too_large(_BOMB_MESSAGE) from None
        except Image.UnidentifiedImageError:
            kind = _sniff(data)
            if kind:
                raise _bad_image(
                    f"The {kind} file is corrupt: its header cannot be read."
                ) from None
            raise _bad_image(
                "The data is not an image in a supported format "
                "(PNG, JPEG, WebP, GIF, BMP, TIFF, ICO, TGA)."
            ) from None
        except Exception as exc:  # Pillow raises many types on malformed headers
            raise _bad_image(f"The image header is corrupt: {describe(exc)}.") from None

        try:
            width, height = image.size
            _check_dimensions(width, height, limits)
            if getattr(image, "is_animated", False):
                image.seek(0)  # animations: the first frame is the picture
            image.load()
            if image.size != (width, height):  # some decoders only learn the size when loading
                _check_dimensions(*image.size, limits)
        except InputError:
            raise
        except Image.DecompressionBombError:
            raise _too_large(_BOMB_MESSAGE) from None
        except MemoryError:
            raise _too_large("Not enough memory to decode the image.") from None
        except Exception as exc:  # truncated data, bad CRC, zlib errors, broken frames...
            raise _bad_image(f"The image is truncated or corrupt: {describe(exc)}.") from None

        image = _apply_orientation(image)
        try:
            out = _to_8bit(image)
        except Exception as exc:
            raise _bad_image(f"The image's pixel format cannot be used: {describe(exc)}.") from None

    if out.mode == "RGBA":
        alpha = np.asarray(out.getchannel("A"))
        if int(alpha.min()) == 255:
            return out.convert("RGB")  # an alpha channel that hides nothing is no alpha
        peak = int(alpha.max())
        if peak == 0:
            raise InputError(ErrorCode.EMPTY_ALPHA, "The image is fully transparent.")
        if peak <= _ALPHA_CROP_THRESHOLD:
            raise InputError(
                ErrorCode.EMPTY_ALPHA,
                f"The image is almost fully transparent (highest alpha {peak} of 255; "
                f"the subject needs alpha above {_ALPHA_CROP_THRESHOLD}).",
                "Make the subject opaque, or remove the alpha channel to let the "
                "background be removed automatically.",
            )
    return out


_BOMB_MESSAGE = "The image declares an enormous number of pixels (a decompression bomb?)."

_SIGNATURES = (
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        rotated = ImageOps.exif_transpose(image)
    except Exception:
        return image  # corrupt EXIF: show the pixels as stored rather than refuse the image
    return rotated if rotated is not None else image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to a new 8-bit RGB or RGBA image, scaling wide modes."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            values = _stretch(values.astype(np.float64))
        else:
            # 16-bit levels to 8-bit, rounding (Pillow's own convert("L") clips at 255)
            values = (values * 255 + 32767) // 65535
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            levels = np.round(values * 255.0)
        else:
            levels = _stretch(values)
        return Image.fromarray(levels.astype(np.uint8)).convert("RGB")
    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        return image.convert("RGBA" if has_alpha else "RGB")
    if mode in _ALPHA_MODES:
        return image.convert("RGBA")
    if mode in ("L", "1") and "transparency" in image.info:
        return image.convert("RGBA")
    return image.convert("RGB")  # RGB (a copy), L, 1, CMYK, YCbCr, LAB, HSV, RGBX...


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return np.round((values - low) * (255.0 / (high - low)))


def has_usable_alpha(image: Image.Image) -> bool:
    """True when the image carries an alpha channel that both hides something and keeps
    something (some pixel below 255, some above TRELLIS.2's crop threshold)."""
    if image.mode == "P":
        if "transparency" not in image.info:
            return False
        image = image.convert("RGBA")
    elif image.mode not in _ALPHA_MODES:
        return False
    alpha = np.asarray(image.getchannel(image.getbands()[-1]))
    if alpha.size == 0:
        return False
    return int(alpha.min()) < 255 and int(alpha.max()) > _ALPHA_CROP_THRESHOLD


def image_ext(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "png").lower()
    except Exception:
        return "img"
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


def thumbnail(image, side: int = 256) -> bytes:
    """A small PNG for the history list; speed over size (it is made while the client waits)."""
    width, height = image.size
    scale = side / max(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
