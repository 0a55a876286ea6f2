"""Time the preview engine's stages on 512, 1024 and 2048 px inputs (prints only; writes no file
outside a temporary folder)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.engines.base import StageContext  # noqa: E402
from backend.engines.preview import PreviewEngine  # noqa: E402
from backend.params import parse_params  # noqa: E402


def subject(size: int, rgb: bool) -> Image.Image:
    """A character-like silhouette (body, head, arms) with a colour gradient."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for y in range(size):
        draw.line([(0, y), (size, y)], fill=(60 + 150 * y // size, 90, 200 - 120 * y // size, 255))
    mask = Image.new("L", (size, size), 0)
    m = ImageDraw.Draw(mask)
    f = size / 512
    m.ellipse((146 * f, 190 * f, 366 * f, 470 * f), fill=255)
    m.ellipse((186 * f, 40 * f, 326 * f, 190 * f), fill=255)
    m.rounded_rectangle((80 * f, 220 * f, 432 * f, 260 * f), radius=20 * f, fill=255)
    image.putalpha(mask)
    if not rgb:
        return image
    background = Image.new("RGBA", image.size, (230, 230, 232, 255))
    background.alpha_composite(image)
    return background.convert("RGB")


def bench(size: int, rgb: bool, preset: str, repeats: int, folder: Path) -> None:
    params = parse_params({"preset": preset})
    image = subject(size, rgb)
    engine = PreviewEngine()
    times: dict[str, list[float]] = {s.name: [] for s in engine.stages}
    gaps: list[float] = []
    stats = {}
    for _ in range(repeats):
        state = {"image": image, "output_path": folder / "bench.glb"}
        for stage in engine.stages:
            last = [time.perf_counter()]

            def report(name, step, total, message, last=last):
                now = time.perf_counter()
                if name == "shape":
                    gaps.append(now - last[0])
                last[0] = now

            start = time.perf_counter()
            engine.run_stage(stage.name, state, params, StageContext(stage.name, report))
            times[stage.name].append(time.perf_counter() - start)
        stats = state["mesh_stats"]
    medians = {name: statistics.median(values) for name, values in times.items()}
    row = "  ".join(f"{name} {value * 1000:6.0f} ms" for name, value in medians.items())
    kind = "RGB " if rgb else "RGBA"
    print(
        f"{size:5d}px {kind} {preset:9s} {row}  total {sum(medians.values()):5.2f} s  "
        f"faces {stats['faces']:6d}  max shape checkpoint gap {max(gaps) * 1000:4.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["balanced"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for size in (512, 1024, 2048):
                for rgb in (False, True):
                    bench(size, rgb, preset, args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
