"""Tables and a plot of the measured memory model (CPU; reads what the GPU runs wrote).

usage: python scripts/memory_report.py [--runs docs/gpu_runs/run7] [--plot docs/memory_model.png]

Prints the Markdown tables docs/GPU.md shows ("Memory model"): per case, each stage's peak
(the card's used memory above the idle process, and torch's allocated and reserved peaks),
each `to_glb` step, and the knob comparisons; draws stage peaks against tokens with the fit
backend/pipeline/memmodel.py uses. Needs matplotlib (a test dependency) for the plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 1 << 30
STAGES = ("conditioning", "sparse_structure", "shape", "texture", "decode", "export")
EXPORT_STEPS = (
    "export.fill_holes",
    "export.bvh_build",
    "export.remesh",
    "export.simplify",
    "export.uv_unwrap",
    "export.bvh_query",
    "export.rasterize",
    "export.grid_sample",
)


def peak(span: dict | None) -> float | None:
    """A stage's peak: the higher of the card's sampled use and torch's allocated peak (the
    20 ms sampling can miss a short spike that torch's counter saw; torch's reserve is not
    used, as it carries blocks cached by earlier stages)."""
    if not span:
        return None
    values = [span["peak_allocated"] / GIB]
    if span.get("device_peak_mib") is not None:
        values.append(span["device_peak_mib"] / 1024)
    return max(values)


def tokens(case: dict) -> int | None:
    structure = case.get("structure") or {}
    return structure.get("shape_tokens")


def load(runs: Path) -> dict[str, dict]:
    cases: dict[str, dict] = {}
    for path in sorted(runs.glob("memory_model_*.json")):
        data = json.loads(path.read_text())
        for name, case in data["cases"].items():
            case["source"] = path.name
            cases[f"{name} ({path.stem.rsplit('_', 1)[-1]})"] = case
    return cases


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def stage_table(cases: dict[str, dict]) -> str:
    lines = [
        "| case | tokens | " + " | ".join(STAGES) + " | seconds |",
        "|---" * (len(STAGES) + 3) + "|",
    ]
    for name, case in cases.items():
        if case.get("variant_of"):
            continue
        cells = [fmt(peak(case["spans"].get(stage))) for stage in STAGES]
        lines.append(
            f"| {name} | {tokens(case) or ''} | " + " | ".join(cells) + f" | {case['seconds']} |"
        )
    return "\n".join(lines)


def export_table(cases: dict[str, dict]) -> str:
    short = [s.split(".", 1)[1] for s in EXPORT_STEPS]
    lines = [
        "| case | " + " | ".join(short) + " | export |",
        "|---" * (len(EXPORT_STEPS) + 2) + "|",
    ]
    for name, case in cases.items():
        spans = case["spans"]
        cells = []
        for step in EXPORT_STEPS:
            span = spans.get(step)
            cells.append(
                "" if not span else f"{span['peak_allocated'] / GIB:.1f} / {fmt(peak(span))}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(peak(spans.get('export')))} |")
    return "\n".join(lines)


def fit(cases: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """Least-squares (intercept GiB, slope GiB per 1,000 tokens) per stage, from the cases
    that ran every stage (the export only from cases with the cache released before CuMesh,
    i.e. not run 7's first call): what backend/pipeline/memmodel.py's STAGE_FIT holds."""
    out = {}
    for stage in ("shape", "texture", "decode", "export"):
        points = [
            (tokens(c) / 1000, peak(c["spans"].get(stage)))
            for c in cases.values()
            if not c.get("variant_of")
            and tokens(c)
            and peak(c["spans"].get(stage)) is not None
            and not (stage == "export" and c["source"].endswith("call2.json"))
        ]
        if len({x for x, _ in points}) < 2:
            out[stage] = (round(points[0][1], 2), 0.0) if points else (0.0, 0.0)
            continue
        n = len(points)
        mx = sum(x for x, _ in points) / n
        my = sum(y for _, y in points) / n
        slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
        out[stage] = (round(my - slope * mx, 2), round(slope, 3))
    return out


def plot(cases: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from backend.params import parse_params
    from backend.pipeline import memmodel

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colours = {"shape": "tab:blue", "decode": "tab:orange", "export": "tab:red"}
    for stage, colour in colours.items():
        xs, ys = [], []
        for case in cases.values():
            if case.get("variant_of") or tokens(case) is None:
                continue
            if stage == "export" and case["source"].endswith("call2.json"):
                continue
            value = peak(case["spans"].get(stage))
            if value is not None:
                xs.append(tokens(case) / 1000)
                ys.append(value)
        ax.scatter(xs, ys, color=colour, label=f"{stage} (measured)")
        if stage == "export":  # run 7's first call exported before the cache release
            before = [
                (tokens(c) / 1000, peak(c["spans"]["export"]))
                for c in cases.values()
                if not c.get("variant_of") and tokens(c) and c["source"].endswith("call2.json")
            ]
            ax.scatter(
                [x for x, _ in before],
                [y for _, y in before],
                facecolors="none",
                edgecolors=colour,
                s=90,
                label="export before the cache release",
            )
        grid = [t / 2 for t in range(0, 100)]
        params = parse_params({"preset": "balanced"})
        fit = [memmodel.stage_peaks(params, t * 1000)[stage] / GIB for t in grid]
        ax.plot(grid, fit, color=colour, linestyle="--", linewidth=1)
    ax.set_xlabel("high-resolution tokens (thousands)")
    ax.set_ylabel("peak above the idle process (GiB)")
    ax.set_title("TRELLIS.2 on an H200: stage peaks and the fit the runner predicts from")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default=str(ROOT / "docs" / "gpu_runs" / "run7"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "memory_model.png"))
    args = parser.parse_args()
    cases = load(Path(args.runs))
    print("### Stage peaks (GiB)\n")
    print(stage_table(cases))
    print("\n### Steps of to_glb (GiB: torch allocated / card peak)\n")
    print(export_table(cases))
    print("\n### Fit (intercept GiB, GiB per 1,000 tokens)\n")
    for stage, (intercept, slope) in fit(cases).items():
        print(f"- {stage}: {intercept}, {slope}")
    if args.plot:
        plot(cases, Path(args.plot))
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
