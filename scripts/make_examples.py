"""Draw the example input images in examples/ (Pillow only; run from the repository root)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 512
SS = 2  # supersampling factor: draw at 2x, downscale for clean anti-aliased edges
W = SIZE * SS
OUTLINE = (38, 32, 40, 255)
LIGHT = (-0.55, -0.6, 0.58)  # from the upper left, towards the viewer


def mix(a, b, t: float):
    t = max(0.0, min(1.0, t))
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b, strict=True))


def s(*values: float):
    """Design coordinates (on a 512 canvas) to drawing coordinates."""
    return [round(v * SS) for v in values]


def shape_mask(draw_shape) -> Image.Image:
    mask = Image.new("L", (W, W), 0)
    draw_shape(ImageDraw.Draw(mask), 255)
    return mask


def cylinder(box, dark, light, shine=(255, 255, 255)) -> Image.Image:
    """Vertical cylinder shading across box: Lambert plus a soft specular streak."""
    layer = Image.new("RGB", (W, W), dark)
    draw = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = box
    for x in range(x0, x1 + 1):
        nx = 2 * (x - x0) / max(1, x1 - x0) - 1
        nz = math.sqrt(max(0.0, 1 - nx * nx))
        lambert = max(0.0, LIGHT[0] * nx + LIGHT[2] * nz) / math.hypot(LIGHT[0], LIGHT[2])
        colour = mix(dark, light, lambert**1.2)
        colour = mix(colour, shine, max(0.0, 1 - abs(nx + 0.45) / 0.12) * 0.55)
        draw.line([(x, y0), (x, y1)], fill=colour)
    return layer


def sphere(box, dark, light, shine=(255, 255, 255)) -> Image.Image:
    """Radial shading with the highlight offset towards the light."""
    layer = Image.new("RGB", (W, W), dark)
    draw = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    steps = 90
    for k in range(steps, 0, -1):
        f = k / steps  # 1 at the rim, 0 at the highlight
        ox, oy = cx + LIGHT[0] * rx * 0.45 * (1 - f), cy + LIGHT[1] * ry * 0.45 * (1 - f)
        colour = mix(light, dark, f**1.6)
        if f < 0.18:
            colour = mix(colour, shine, (0.18 - f) / 0.18 * 0.7)
        draw.ellipse((ox - rx * f, oy - ry * f, ox + rx * f, oy + ry * f), fill=colour)
    return layer.filter(ImageFilter.GaussianBlur(2 * SS))


def put(canvas: Image.Image, layer: Image.Image, mask: Image.Image) -> None:
    rgba = layer.convert("RGBA")
    rgba.putalpha(mask)
    canvas.alpha_composite(rgba)


def outline(canvas: Image.Image, mask: Image.Image, width: int = 3) -> None:
    """A dark contour around a shape: the mask grown by `width`, behind the shape."""
    grown = mask.filter(ImageFilter.MaxFilter(2 * width * SS + 1))
    put(canvas, Image.new("RGB", (W, W), OUTLINE[:3]), grown)


def drop_shadow_free(canvas: Image.Image) -> Image.Image:
    return canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def mug() -> Image.Image:
    canvas = Image.new("RGBA", (W, W), (0, 0, 0, 0))
    body = s(130, 150, 360, 440)
    handle_outer, handle_inner = s(300, 210, 430, 380), s(334, 248, 398, 342)

    def handle(d, v):
        d.ellipse(handle_outer, fill=v)
        d.ellipse(handle_inner, fill=0)

    def body_shape(d, v):
        d.rounded_rectangle(body, radius=36 * SS, fill=v)
        d.ellipse(s(130, 122, 360, 178), fill=v)

    everything = shape_mask(lambda d, v: (handle(d, v), body_shape(d, v)))
    outline(canvas, everything)
    put(canvas, cylinder(handle_outer, (120, 30, 36), (236, 92, 88)), shape_mask(handle))
    put(canvas, cylinder(body, (122, 28, 36), (240, 96, 90)), shape_mask(body_shape))
    # a white band with a heart, then the coffee inside the rim
    band = shape_mask(lambda d, v: d.rectangle(s(130, 250, 360, 300), fill=v))
    put(canvas, cylinder(body, (170, 160, 160), (252, 248, 244)), band)
    draw = ImageDraw.Draw(canvas)
    hx, hy = 232 * SS, 276 * SS
    draw.ellipse((hx - 16 * SS, hy - 12 * SS, hx, hy + 4 * SS), fill=(214, 48, 62))
    draw.ellipse((hx - 2 * SS, hy - 12 * SS, hx + 14 * SS, hy + 4 * SS), fill=(214, 48, 62))
    draw.polygon(
        [(hx - 15 * SS, hy - 1 * SS), (hx + 13 * SS, hy - 1 * SS), (hx - 1, hy + 18 * SS)],
        fill=(214, 48, 62),
    )
    draw.ellipse(s(142, 130, 348, 170), fill=(214, 200, 196))
    coffee = shape_mask(lambda d, v: d.ellipse(s(152, 136, 338, 166), fill=v))
    put(canvas, sphere(s(152, 136, 338, 166), (70, 40, 24), (150, 96, 60)), coffee)
    return drop_shadow_free(canvas)


def plant() -> Image.Image:
    canvas = Image.new("RGBA", (W, W), (0, 0, 0, 0))
    leaves = [  # centre, length, width, angle (degrees, 0 = up)
        (256, 200, 170, 54, 0),
        (210, 215, 150, 48, -38),
        (302, 215, 150, 48, 38),
        (180, 250, 120, 40, -70),
        (332, 250, 120, 40, 70),
        (236, 160, 110, 36, -14),
    ]
    leaf_layers = []
    for cx, cy, length, width, angle in leaves:
        tile = Image.new("L", (W, W), 0)
        ImageDraw.Draw(tile).ellipse(
            s(cx - width / 2, cy - length / 2, cx + width / 2, cy + length / 2), fill=255
        )
        pivot = (cx * SS, (cy + length / 2) * SS)
        rotated = tile.rotate(-angle, resample=Image.Resampling.BICUBIC, center=pivot)
        shift = (0, round((310 - cy - length / 2) * SS))
        moved = Image.new("L", (W, W), 0)
        moved.paste(rotated, shift)
        leaf_layers.append(moved)
    pot = s(160, 300, 352, 460)

    def pot_shape(d, v):
        d.polygon(s(172, 318, 340, 318, 318, 460, 194, 460), fill=v)
        d.rounded_rectangle(s(156, 296, 356, 330), radius=8 * SS, fill=v)

    everything = shape_mask(pot_shape)
    for leaf in leaf_layers:
        everything.paste(255, (0, 0), leaf)
    outline(canvas, everything)
    for k, leaf in enumerate(leaf_layers):
        shade = mix((26, 92, 40), (40, 120, 52), k / len(leaf_layers))
        outline(canvas, leaf, 1)
        put(canvas, sphere((0, 40 * SS, W, 330 * SS), shade, (120, 210, 96)), leaf)
    draw = ImageDraw.Draw(canvas)
    for cx, _cy, length, _width, angle in leaves:  # leaf veins
        base = (cx * SS, 310 * SS)
        a = math.radians(angle)
        tip = (base[0] + math.sin(a) * length * 0.8 * SS, base[1] - math.cos(a) * length * 0.8 * SS)
        draw.line([base, tip], fill=(30, 84, 36), width=3 * SS)
    put(canvas, cylinder(pot, (120, 52, 30), (226, 124, 76)), shape_mask(pot_shape))
    rim = shape_mask(lambda d, v: d.rounded_rectangle(s(156, 296, 356, 330), radius=8 * SS, fill=v))
    put(canvas, cylinder(pot, (136, 60, 34), (238, 146, 98)), rim)
    draw.line(s(160, 331, 352, 331), fill=OUTLINE, width=3 * SS)
    return drop_shadow_free(canvas)


def robot() -> Image.Image:
    canvas = Image.new("RGBA", (W, W), (0, 0, 0, 0))
    steel_dark, steel_light = (62, 78, 104), (184, 204, 228)
    parts = {
        "antenna": lambda d, v: (
            d.rectangle(s(251, 52, 261, 96), fill=v),
            d.ellipse(s(240, 36, 272, 68), fill=v),
        ),
        "head": lambda d, v: d.rounded_rectangle(s(186, 90, 326, 196), radius=26 * SS, fill=v),
        "neck": lambda d, v: d.rectangle(s(236, 192, 276, 214), fill=v),
        "arm_l": lambda d, v: d.rounded_rectangle(s(124, 222, 164, 360), radius=20 * SS, fill=v),
        "arm_r": lambda d, v: d.rounded_rectangle(s(348, 222, 388, 360), radius=20 * SS, fill=v),
        "body": lambda d, v: d.rounded_rectangle(s(164, 210, 348, 380), radius=30 * SS, fill=v),
        "leg_l": lambda d, v: d.rounded_rectangle(s(196, 372, 240, 462), radius=12 * SS, fill=v),
        "leg_r": lambda d, v: d.rounded_rectangle(s(272, 372, 316, 462), radius=12 * SS, fill=v),
        "foot_l": lambda d, v: d.rounded_rectangle(s(184, 448, 248, 476), radius=12 * SS, fill=v),
        "foot_r": lambda d, v: d.rounded_rectangle(s(264, 448, 328, 476), radius=12 * SS, fill=v),
    }
    masks = {name: shape_mask(fn) for name, fn in parts.items()}
    everything = Image.new("L", (W, W), 0)
    for m in masks.values():
        everything.paste(255, (0, 0), m)
    outline(canvas, everything)
    boxes = {
        "antenna": s(240, 36, 272, 96),
        "head": s(186, 90, 326, 196),
        "neck": s(236, 192, 276, 214),
        "arm_l": s(124, 222, 164, 360),
        "arm_r": s(348, 222, 388, 360),
        "body": s(164, 210, 348, 380),
        "leg_l": s(196, 372, 240, 462),
        "leg_r": s(272, 372, 316, 462),
        "foot_l": s(184, 448, 248, 476),
        "foot_r": s(264, 448, 328, 476),
    }
    order = [
        "leg_l",
        "leg_r",
        "foot_l",
        "foot_r",
        "arm_l",
        "arm_r",
        "neck",
        "body",
        "antenna",
        "head",
    ]
    for name in order:
        dark, light = (steel_dark, steel_light)
        if name.startswith("foot"):
            dark, light = (40, 44, 56), (110, 118, 140)
        outline(canvas, masks[name], 1)
        put(canvas, cylinder(boxes[name], dark, light), masks[name])
    ball = s(240, 36, 272, 68)
    put(
        canvas,
        sphere(ball, (150, 20, 24), (255, 120, 110)),
        shape_mask(lambda d, v: d.ellipse(ball, fill=v)),
    )
    draw = ImageDraw.Draw(canvas)
    # face: visor, glowing eyes, mouth grille
    draw.rounded_rectangle(s(204, 116, 308, 164), radius=18 * SS, fill=(24, 30, 44))
    for ex in (232, 280):
        glow = s(ex - 14, 126, ex + 14, 154)
        put(
            canvas,
            sphere(glow, (0, 120, 160), (160, 250, 255)),
            shape_mask(lambda d, v, g=glow: d.ellipse(g, fill=v)),
        )
    for k in range(5):
        x = 230 + k * 13
        draw.line(s(x, 174, x, 186), fill=(40, 48, 64), width=3 * SS)
    # chest panel with buttons and a dial
    draw.rounded_rectangle(s(196, 240, 316, 340), radius=14 * SS, fill=(44, 56, 78))
    for k, colour in enumerate([(255, 92, 80), (255, 206, 70), (96, 220, 120)]):
        draw.ellipse(
            s(212 + k * 30, 256, 232 + k * 30, 276), fill=colour, outline=OUTLINE, width=2 * SS
        )
    dial = s(222, 290, 290, 330)
    draw.rounded_rectangle(dial, radius=8 * SS, fill=(20, 24, 34))
    for k in range(6):
        h = (8, 22, 14, 28, 18, 10)[k]
        draw.rectangle(s(230 + k * 10, 324 - h, 236 + k * 10, 324), fill=(90, 230, 255))
    return drop_shadow_free(canvas)


def star() -> Image.Image:
    canvas = Image.new("RGBA", (W, W), (0, 0, 0, 0))
    cx, cy, outer, inner = 256, 270, 220, 96
    points = []
    for k in range(10):
        r = outer if k % 2 == 0 else inner
        a = math.radians(-90 + 36 * k)
        points += s(cx + r * math.cos(a), cy + r * math.sin(a))
    star_mask = shape_mask(lambda d, v: d.polygon(points, fill=v))
    # round the tips a little, like a plush toy
    star_mask = star_mask.filter(ImageFilter.GaussianBlur(7 * SS)).point(
        lambda v: 255 if v > 110 else 0
    )
    outline(canvas, star_mask, 4)
    put(
        canvas,
        sphere(s(cx - outer, cy - outer, cx + outer, cy + outer), (214, 120, 10), (255, 236, 120)),
        star_mask,
    )
    draw = ImageDraw.Draw(canvas)
    for ex in (220, 292):  # eyes with a catch light
        draw.ellipse(s(ex - 16, 232, ex + 16, 276), fill=OUTLINE)
        draw.ellipse(s(ex - 8, 238, ex + 2, 250), fill=(255, 255, 255))
    draw.arc(s(232, 262, 280, 306), 20, 160, fill=OUTLINE, width=5 * SS)
    for bx in (182, 330):  # cheeks
        draw.ellipse(s(bx - 18, 282, bx + 18, 300), fill=(250, 130, 110))
    return drop_shadow_free(canvas)


def duck_on_grey() -> Image.Image:
    """The RGB example: no alpha, a flat light-grey background to cut away."""
    canvas = Image.new("RGBA", (W, W), (0, 0, 0, 0))
    body, head = s(108, 250, 404, 440), s(196, 110, 356, 266)
    beak = s(336, 178, 432, 206, 432, 226, 340, 236)
    tail = s(96, 280, 150, 230, 170, 320)
    shape = shape_mask(
        lambda d, v: (d.ellipse(body, fill=v), d.ellipse(head, fill=v), d.polygon(tail, fill=v))
    )
    beak_mask = shape_mask(lambda d, v: d.polygon(beak, fill=v))
    everything = Image.new("L", (W, W), 0)
    everything.paste(255, (0, 0), shape)
    everything.paste(255, (0, 0), beak_mask)
    outline(canvas, everything)
    put(canvas, sphere(s(96, 110, 404, 440), (212, 146, 10), (255, 240, 120)), shape)
    put(canvas, sphere(s(330, 176, 432, 236), (200, 80, 10), (255, 170, 70)), beak_mask)
    draw = ImageDraw.Draw(canvas)
    draw.ellipse(s(296, 160, 318, 186), fill=OUTLINE)
    draw.ellipse(s(302, 164, 310, 172), fill=(255, 255, 255))
    draw.arc(s(170, 250, 330, 380), 30, 150, fill=(196, 130, 10), width=5 * SS)  # wing
    small = drop_shadow_free(canvas)
    background = Image.new("RGBA", small.size, (226, 226, 228, 255))
    background.alpha_composite(small)
    return background.convert("RGB")


EXAMPLES = {
    "mug.png": mug,
    "potted_plant.png": plant,
    "robot.png": robot,
    "star_toy.png": star,
    "duck_on_grey.png": duck_on_grey,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("examples"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, draw in EXAMPLES.items():
        path = args.out / name
        draw().save(path, format="PNG", optimize=True)
        print(f"{path}  {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
