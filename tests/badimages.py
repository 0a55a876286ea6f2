"""Awkward and hostile input images, generated in memory, with what load_image must do."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from backend.checks.images import ImageLimits

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expect: str  # an ErrorCode value, or "ok:<MODE>" when load_image must succeed
    check: Callable[[Image.Image], None] | None = None  # extra assertions on the result
    limits: ImageLimits | None = None  # None: the defaults

    def __repr__(self) -> str:  # keeps pytest ids and failure messages short
        return f"Case({self.name!r}, {len(self.data)} bytes, expect={self.expect!r})"


# -- encoders ---------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    if crc is None:
        crc = zlib.crc32(kind + body)
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc & 0xFFFFFFFF)


def raw_png(
    width: int,
    height: int,
    bit_depth: int,
    color_type: int,
    pixels: np.ndarray | None = None,
    idat: bytes | None = None,
    ihdr_crc: int | None = None,
) -> bytes:
    """A PNG written by hand, for what Pillow will not write (16-bit RGB, lying headers).
    `pixels` is [H, W, C] (or [H, W]) of uint8/uint16; or give raw `idat` bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if idat is None:
        assert pixels is not None
        rows = pixels.astype(">u2" if bit_depth == 16 else "u1").reshape(height, -1)
        raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on each row
        idat = zlib.compress(raw)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr, ihdr_crc)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF header is patched to claim another size."""
    data = bytearray(encode(Image.new("RGB", (16, 16), RED), "JPEG"))
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def quadrant_image(size=(48, 32), mode="RGB") -> Image.Image:
    """Blue, with the top-left quadrant red: shows where rotations moved things."""
    w, h = size
    image = Image.new(mode, size, BLUE)
    image.paste(RED, (0, 0, w // 2, h // 2))
    return image


def rgba_with_alpha(peak: int, size=(32, 32)) -> Image.Image:
    """Red RGBA; transparent except a centre square with alpha = peak."""
    array = np.zeros((size[1], size[0], 4), np.uint8)
    array[..., 0] = 255
    array[8:24, 8:24, 3] = peak
    return Image.fromarray(array)


def animated(fmt: str, **options) -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in (RED, GREEN, BLUE)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **options)


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(quadrant_image(), "JPEG", quality=95, exif=exif.tobytes())


def ico_with_embedded_png(png: bytes) -> bytes:
    """An .ico whose single directory entry says 16x16 but embeds the given PNG."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


# -- checks ----------------------------------------------------------------------------------


def near(actual, expected, tolerance=12) -> bool:
    return all(abs(int(a) - int(e)) <= tolerance for a, e in zip(actual, expected, strict=True))


def expect_pixel(xy, colour, tolerance=12):
    def check(image: Image.Image) -> None:
        got = image.getpixel(xy)
        assert near(got, colour, tolerance), f"pixel {xy} is {got}, expected about {colour}"

    return check


def expect_all(*checks):
    def check(image: Image.Image) -> None:
        for each in checks:
            each(image)

    return check


def expect_size(size):
    def check(image: Image.Image) -> None:
        assert image.size == size, f"size {image.size}, expected {size}"

    return check


def expect_levels(expected: list[int]):
    """Grey levels of the first row's 4 blocks of 8 pixels, e.g. from a 16-bit image."""

    def check(image: Image.Image) -> None:
        got = [image.getpixel((8 * i + 4, 4)) for i in range(len(expected))]
        for px, level in zip(got, expected, strict=True):
            assert all(abs(c - level) <= 1 for c in px[:3]), f"levels {got}, expected {expected}"

    return check


def expect_alpha(inside: int, outside: int, at=(16, 16), corner=(0, 0)):
    def check(image: Image.Image) -> None:
        assert image.getpixel(at)[3] == inside, image.getpixel(at)
        assert image.getpixel(corner)[3] == outside, image.getpixel(corner)

    return check


# -- the corpus ------------------------------------------------------------------------------

_LEVELS16 = [0, 257 * 100, 32768, 65535]  # 16-bit values, exactly 0, 100, 128, 255 in 8-bit
_LEVELS8 = [0, 100, 128, 255]


def _blocks16(channels: int, alpha: int | None = None) -> np.ndarray:
    """[16, 32, channels] uint16: four 8-pixel-wide grey blocks with the _LEVELS16 values."""
    grey = np.repeat(np.array(_LEVELS16, np.uint16), 8)[None, :].repeat(16, axis=0)
    planes = [grey] * channels
    if alpha is not None:
        planes[-1] = np.full_like(grey, alpha)
    return np.stack(planes, axis=-1)


def bad_image_cases() -> list[Case]:
    rng = np.random.default_rng(7)
    photo = Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8))
    png = encode(photo, "PNG")
    jpeg = encode(photo, "JPEG", quality=90)
    small_png = encode(Image.new("RGB", (32, 32), GREEN), "PNG")

    def corrupt_idat(data: bytes) -> bytes:
        start = data.index(b"IDAT") + 4
        mangled = bytes(b ^ 0x5A for b in data[start + 2 : start + 40])
        body = data[start : start + 2] + mangled + data[start + 40 :]
        length = struct.unpack(">I", data[start - 8 : start - 4])[0]
        crc = zlib.crc32(b"IDAT" + body[:length])
        return data[:start] + body[:length] + struct.pack(">I", crc) + body[length + 4 :]

    palette = Image.new("P", (32, 32), 0)
    palette.putpalette(list(RED) + list(GREEN) + [0] * (256 * 3 - 6))
    palette.paste(1, (8, 8, 24, 24))

    la = np.zeros((32, 32, 2), np.uint8)
    la[..., 0] = 200
    la[8:24, 8:24, 1] = 255

    one_bit = Image.new("1", (32, 32), 0)
    one_bit.paste(1, (0, 0, 16, 32))

    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK

    gif_transparent = palette.copy()
    gif_transparent.info["transparency"] = 0

    ico_image = rgba_with_alpha(255, size=(32, 32))
    float_tiff = Image.fromarray(
        np.repeat(np.array([0.0, 0.5, 1.0, 0.25], np.float32), 8)[None].repeat(16, axis=0), mode="F"
    )

    cases = [
        # -- not images at all --
        Case("empty", b"", "bad_image"),
        Case("one_byte", b"\x89", "bad_image"),
        Case("random_bytes", rng.integers(0, 256, 4096, np.uint8).tobytes(), "bad_image"),
        Case("png_signature_only", b"\x89PNG\r\n\x1a\n", "bad_image"),
        Case("text_posing_as_png", b"\x89PNG\r\n\x1a\nthis is not a png at all" * 4, "bad_image"),
        Case("html", b"<!doctype html><html><body><img src=x.png></body></html>", "bad_image"),
        Case(
            "svg",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
            b'<rect width="64" height="64" fill="red"/></svg>',
            "bad_image",
        ),
        Case("psd_header", b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03" + b"\x00" * 64, "bad_image"),
        Case(
            "eps_needs_ghostscript",
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n",
            "bad_image",
        ),
        Case("pdf", b"%PDF-1.7\n1 0 obj << >> endobj\n%%EOF\n", "bad_image"),
        Case("zip", b"PK\x03\x04" + rng.bytes(60), "bad_image"),
        # -- broken images --
        Case("truncated_png", png[: len(png) // 2], "bad_image"),
        Case("truncated_jpeg", jpeg[: len(jpeg) // 2], "bad_image"),
        Case(
            "png_bad_ihdr_crc",
            raw_png(16, 16, 8, 2, np.zeros((16, 16, 3)), ihdr_crc=1),
            "bad_image",
        ),
        Case("png_corrupt_idat", corrupt_idat(png), "bad_image"),
        Case("truncated_gif", animated("GIF")[:60], "bad_image"),
        Case("truncated_webp", encode(photo, "WEBP")[:40], "bad_image"),
        # -- size limits, all checked before any pixel is decoded: a decode of these lying
        #    headers would fail (their IDAT holds nothing), giving bad_image instead --
        Case(
            "bomb_png_30000x30000",
            raw_png(30000, 30000, 8, 2, idat=zlib.compress(b"")),
            "image_too_large",
        ),
        Case(
            "bomb_png_10000x9000",
            raw_png(10000, 9000, 8, 2, idat=zlib.compress(b"")),
            "image_too_large",
        ),  # between Pillow's warning and error thresholds
        Case(
            "png_7000x7000_over_pixel_limit", raw_png(7000, 7000, 8, 0, idat=b""), "image_too_large"
        ),
        Case("png_too_wide", raw_png(12_001, 8, 8, 0, idat=b""), "image_too_large"),
        Case("png_too_tall", raw_png(8, 12_001, 8, 0, idat=b""), "image_too_large"),
        Case("jpeg_claims_65000x65000", jpeg_with_size(65000, 65000), "image_too_large"),
        Case(
            "ico_embedding_png_bomb",
            ico_with_embedded_png(raw_png(9000, 9000, 8, 6, idat=zlib.compress(b""))),
            "image_too_large",
        ),
        Case("over_max_bytes", png, "image_too_large", limits=ImageLimits(max_bytes=len(png) - 1)),
        Case("over_max_pixels", small_png, "image_too_large", limits=ImageLimits(max_pixels=1000)),
        Case("too_small_4x4", encode(Image.new("RGB", (4, 4), RED), "PNG"), "bad_image"),
        Case("too_thin_7x64", encode(Image.new("RGB", (7, 64), RED), "PNG"), "bad_image"),
        # -- alpha --
        Case("rgba_fully_transparent", encode(rgba_with_alpha(0), "PNG"), "empty_alpha"),
        Case("rgba_max_alpha_100", encode(rgba_with_alpha(100), "PNG"), "empty_alpha"),
        Case("rgba_max_alpha_204", encode(rgba_with_alpha(204), "PNG"), "empty_alpha"),
        Case(
            "rgba_max_alpha_205",
            encode(rgba_with_alpha(205), "PNG"),
            "ok:RGBA",
            expect_alpha(205, 0),
        ),
        Case(
            "rgba_fully_opaque",
            encode(Image.new("RGBA", (32, 32), (*RED, 255)), "PNG"),
            "ok:RGB",
            expect_pixel((5, 5), RED, 0),
        ),
        Case("rgba_cutout", encode(rgba_with_alpha(255), "PNG"), "ok:RGBA", expect_alpha(255, 0)),
        Case(
            "webp_with_alpha",
            encode(rgba_with_alpha(255), "WEBP", lossless=True),
            "ok:RGBA",
            expect_alpha(255, 0),
        ),
        Case(
            "la",
            encode(Image.fromarray(la, "LA"), "PNG"),
            "ok:RGBA",
            expect_all(expect_alpha(255, 0), expect_pixel((16, 16), (200, 200, 200, 255), 0)),
        ),
        Case(
            "palette_with_trns",
            encode(gif_transparent, "PNG"),
            "ok:RGBA",
            expect_all(expect_alpha(255, 0), expect_pixel((16, 16), (*GREEN, 255), 0)),
        ),
        Case(
            "gif_with_transparency", encode(gif_transparent, "GIF"), "ok:RGBA", expect_alpha(255, 0)
        ),
        Case(
            "ico_with_alpha",
            encode(ico_image, "ICO", sizes=[(32, 32)]),
            "ok:RGBA",
            expect_alpha(255, 0),
        ),
        # -- modes and formats that must convert correctly --
        Case("png_rgb", png, "ok:RGB", expect_pixel((3, 3), photo.getpixel((3, 3)), 0)),
        Case("tiny_valid_16x16", encode(Image.new("RGB", (16, 16), GREEN), "PNG"), "ok:RGB"),
        Case("min_side_8x8", encode(Image.new("RGB", (8, 8), GREEN), "PNG"), "ok:RGB"),
        Case(
            "max_side_12000x8",
            encode(Image.new("L", (12_000, 8), 9), "PNG"),
            "ok:RGB",
            expect_size((12_000, 8)),
        ),
        Case(
            "cmyk_jpeg", encode(cmyk, "JPEG", quality=95), "ok:RGB", expect_pixel((16, 16), RED, 8)
        ),
        Case("cmyk_tiff", encode(cmyk, "TIFF"), "ok:RGB", expect_pixel((16, 16), RED, 0)),
        Case("png_gray16", raw_png(32, 16, 16, 0, _blocks16(1)), "ok:RGB", expect_levels(_LEVELS8)),
        Case("png_rgb16", raw_png(32, 16, 16, 2, _blocks16(3)), "ok:RGB", expect_levels(_LEVELS8)),
        Case(
            "png_rgba16",
            raw_png(32, 16, 16, 6, _blocks16(4, alpha=257 * 210)),
            "ok:RGBA",
            expect_all(expect_levels(_LEVELS8), expect_pixel((1, 1), (0, 0, 0, 210), 1)),
        ),
        Case(
            "png_gray_alpha16",
            raw_png(32, 16, 16, 4, _blocks16(2, alpha=65535)),
            "ok:RGB",
            expect_levels(_LEVELS8),
        ),
        Case(
            "tiff_gray16",
            encode(Image.fromarray(_blocks16(1)[..., 0]), "TIFF"),
            "ok:RGB",
            expect_levels(_LEVELS8),
        ),
        Case("tiff_float", encode(float_tiff, "TIFF"), "ok:RGB", expect_levels([0, 128, 255, 64])),
        Case("palette_opaque", encode(palette, "PNG"), "ok:RGB", expect_pixel((16, 16), GREEN, 0)),
        Case(
            "grayscale_l",
            encode(Image.new("L", (32, 32), 77), "PNG"),
            "ok:RGB",
            expect_pixel((3, 3), (77, 77, 77), 0),
        ),
        Case(
            "one_bit",
            encode(one_bit, "PNG"),
            "ok:RGB",
            expect_all(
                expect_pixel((2, 2), (255, 255, 255), 0), expect_pixel((30, 2), (0, 0, 0), 0)
            ),
        ),
        Case("animated_gif", animated("GIF"), "ok:RGB", expect_pixel((5, 5), RED, 0)),
        Case(
            "animated_webp", animated("WEBP", lossless=True), "ok:RGB", expect_pixel((5, 5), RED, 0)
        ),
        Case("apng", animated("PNG"), "ok:RGB", expect_pixel((5, 5), RED, 0)),
        Case(
            "exif_orientation_6",
            exif_jpeg(6),
            "ok:RGB",
            expect_all(
                expect_size((32, 48)),
                expect_pixel((28, 3), RED, 40),
                expect_pixel((3, 3), BLUE, 40),
            ),
        ),
        Case(
            "exif_orientation_3",
            exif_jpeg(3),
            "ok:RGB",
            expect_all(
                expect_size((48, 32)),
                expect_pixel((44, 28), RED, 40),
                expect_pixel((3, 3), BLUE, 40),
            ),
        ),
        Case("exif_orientation_invalid", exif_jpeg(9), "ok:RGB", expect_size((48, 32))),
        Case("bmp", encode(quadrant_image(), "BMP"), "ok:RGB", expect_pixel((3, 3), RED, 0)),
        Case("tiff", encode(quadrant_image(), "TIFF"), "ok:RGB", expect_pixel((3, 3), RED, 0)),
        Case("tga", encode(quadrant_image(), "TGA"), "ok:RGB", expect_pixel((3, 3), RED, 0)),
        Case(
            "webp_lossy",
            encode(quadrant_image(), "WEBP", quality=90),
            "ok:RGB",
            expect_pixel((3, 3), RED, 40),
        ),
        Case("jpeg_with_garbage_appended", jpeg + b"\x00garbage after EOI" * 20, "ok:RGB"),
    ]
    return cases
