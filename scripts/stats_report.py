"""Draw a PNG dashboard from the backend's stats JSON lines and print the summary numbers.

    python scripts/stats_report.py STATE_DIR/stats.jsonl -o dashboard.png [--json]

Panels: job outcomes, success rate over time, final ladder level per job (how far OOMs pushed
quality down), retries per job, time per generation (p50/p95), VRAM peak per ladder level,
time to ready, mean seconds per stage, failures by error code. Malformed lines are skipped and
counted. Needs matplotlib (a test dependency, not a backend one).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend.store.stats import aggregate, percentile, read_lines  # noqa: E402

GIB = 2**30
OUTCOME_COLORS = {
    "done": "#3a923a",
    "failed": "#c03d3d",
    "cancelled": "#9a9a9a",
    "ok": "#3a923a",
    "oom": "#e08a1e",
    "error": "#c03d3d",
    "poisoned": "#7b3fa0",
    "poison": "#7b3fa0",
}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def summarize(records: list[dict[str, Any]], malformed: int) -> dict[str, Any]:
    """The numbers the dashboard shows, built on backend.store.stats.aggregate."""
    agg = aggregate(records)
    jobs = [r for r in records if r.get("kind") == "job"]
    outcomes = Counter(str(j.get("outcome")) for j in jobs)
    return {
        "records": len(records),
        "malformed": malformed,
        "jobs": len(jobs),
        "done": outcomes.get("done", 0),
        "failed": outcomes.get("failed", 0),
        "cancelled": outcomes.get("cancelled", 0),
        "success_rate": agg["success_rate"],
        "mean_retries": agg["mean_retries"],
        "seconds_p50": agg["seconds_p50"],
        "seconds_p95": agg["seconds_p95"],
        "attempts": agg["attempts"],
        "oom_attempts": agg["oom_attempts"],
        "level_distribution": agg["level_distribution"],
        "vram_peak_max_gib": agg["vram_peak_max"] / GIB if agg["vram_peak_max"] else None,
        "time_to_ready_mean": agg["time_to_ready_mean"],
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return " ".join(f"{k}:{v}" for k, v in value.items()) or "none"
    return str(value)


def _empty(ax, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#888888")
    ax.set_xticks([])
    ax.set_yticks([])


def draw(records: list[dict[str, Any]], summary: dict[str, Any], output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    jobs = [r for r in records if r.get("kind") == "job"]
    attempts = [r for r in records if r.get("kind") == "attempt"]
    ready = [r for r in records if r.get("kind") == "ready"]
    finished = [j for j in jobs if j.get("outcome") in ("done", "failed")]

    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    ax = iter(axes.flat)

    # 1. outcomes per job
    a = next(ax)
    if jobs:
        counts = Counter(str(j.get("outcome")) for j in jobs)
        names = sorted(counts)
        a.bar(
            names,
            [counts[n] for n in names],
            color=[OUTCOME_COLORS.get(n, "#4c72b0") for n in names],
        )
        a.set_title(f"Job outcomes ({len(jobs)} jobs)")
        a.set_ylabel("jobs")
    else:
        _empty(a, "Job outcomes")

    # 2. success rate over time (rolling over finished jobs)
    a = next(ax)
    if finished:
        window = max(1, min(10, len(finished)))
        ok = [1.0 if j.get("outcome") == "done" else 0.0 for j in finished]
        rolling = [
            sum(ok[max(0, i - window + 1) : i + 1]) / len(ok[max(0, i - window + 1) : i + 1])
            for i in range(len(ok))
        ]
        a.plot(range(1, len(ok) + 1), [100 * r for r in rolling], marker=".", color="#3a923a")
        a.set_ylim(-5, 105)
        a.set_xlabel("finished job #")
        a.set_ylabel(f"% done (last {window})")
        rate = summary["success_rate"]
        a.set_title(f"Success rate {100 * rate:.1f}%" if rate is not None else "Success rate")
    else:
        _empty(a, "Success rate")

    # 3. final ladder level of jobs
    a = next(ax)
    levels = [
        int(j["level"])
        for j in jobs
        if _num(j.get("level")) is not None and j.get("outcome") == "done"
    ]
    if levels:
        top = max(max(levels), 12)
        a.hist(levels, bins=[x - 0.5 for x in range(top + 2)], color="#4c72b0", rwidth=0.85)
        a.set_xlabel("ladder level reached (0 = as requested)")
        a.set_ylabel("jobs")
        a.set_title("Quality level of finished jobs")
    else:
        _empty(a, "Quality level of finished jobs")

    # 4. retries per job
    a = next(ax)
    retries = [max(0, int(_num(j.get("attempts")) or 1) - 1) for j in finished]
    if retries:
        a.hist(
            retries, bins=[x - 0.5 for x in range(max(retries) + 2)], color="#dd8452", rwidth=0.85
        )
        a.set_xlabel("retries (attempts - 1)")
        a.set_ylabel("jobs")
        mean = summary["mean_retries"]
        a.set_title(f"Retries per job (mean {mean:.2f})" if mean is not None else "Retries")
    else:
        _empty(a, "Retries per job")

    # 5. time per generation
    a = next(ax)
    seconds = [
        s
        for j in jobs
        if j.get("outcome") == "done"
        for s in [_num(j.get("seconds"))]
        if s is not None
    ]
    if seconds:
        a.hist(seconds, bins=min(30, max(5, len(seconds) // 2)), color="#55a868")
        p50, p95 = percentile(seconds, 50), percentile(seconds, 95)
        a.axvline(p50, color="k", linestyle="--", label=f"p50 {p50:.2f} s")
        a.axvline(p95, color="#c03d3d", linestyle=":", label=f"p95 {p95:.2f} s")
        a.legend()
        a.set_xlabel("seconds per finished job")
        a.set_title("Time per generation")
    else:
        _empty(a, "Time per generation")

    # 6. VRAM peak per ladder level (each attempt)
    a = next(ax)
    points = [
        (int(r["level"]), _num(r.get("vram_peak")) / GIB, str(r.get("outcome")))
        for r in attempts
        if _num(r.get("level")) is not None and _num(r.get("vram_peak")) is not None
    ]
    if points:
        for outcome in sorted({p[2] for p in points}):
            xs = [p[0] for p in points if p[2] == outcome]
            ys = [p[1] for p in points if p[2] == outcome]
            a.scatter(
                xs, ys, label=outcome, alpha=0.7, color=OUTCOME_COLORS.get(outcome, "#4c72b0")
            )
        a.set_xlabel("ladder level")
        a.set_ylabel("VRAM peak (GiB)")
        a.legend()
        a.set_title("VRAM peak per attempt")
    else:
        _empty(a, "VRAM peak per attempt")

    # 7. time to ready
    a = next(ax)
    ready_s = [s for r in ready for s in [_num(r.get("seconds"))] if s is not None]
    if ready_s:
        a.plot(range(1, len(ready_s) + 1), ready_s, marker="o", color="#8172b3")
        a.set_xlabel("backend start #")
        a.set_ylabel("seconds")
        a.set_title(f"Time to ready (mean {sum(ready_s) / len(ready_s):.2f} s)")
    else:
        _empty(a, "Time to ready")

    # 8. mean seconds per stage (finished jobs)
    a = next(ax)
    per_stage: dict[str, list[float]] = defaultdict(list)
    for j in jobs:
        if j.get("outcome") == "done" and isinstance(j.get("stage_seconds"), dict):
            for name, secs in j["stage_seconds"].items():
                if _num(secs) is not None:
                    per_stage[str(name)].append(float(secs))
    if per_stage:
        names = list(per_stage)
        a.barh(names, [sum(v) / len(v) for v in per_stage.values()], color="#64b5cd")
        a.invert_yaxis()
        a.set_xlabel("mean seconds")
        a.set_title("Time per stage")
    else:
        _empty(a, "Time per stage")

    # 9. failures by error code
    a = next(ax)
    codes = Counter(str(j.get("error_code")) for j in jobs if j.get("outcome") == "failed")
    if codes:
        names = sorted(codes, key=lambda c: -codes[c])
        a.barh(names, [codes[n] for n in names], color="#c03d3d")
        a.invert_yaxis()
        a.set_xlabel("jobs")
        a.set_title("Failures by error code")
    else:
        _empty(a, "Failures by error code")

    fig.suptitle(
        f"{title} - {summary['records']} records, {summary['malformed']} malformed lines skipped",
        fontsize=14,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stats", type=Path, help="the stats JSON-lines file")
    parser.add_argument("-o", "--output", type=Path, default=Path("dashboard.png"))
    parser.add_argument("--title", default="TRELLIS.2 backend")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if not args.stats.is_file():
        print(f"error: no stats file at {args.stats}", file=sys.stderr)
        return 2
    records, malformed = read_lines(args.stats)
    summary = summarize(records, malformed)
    draw(records, summary, args.output, args.title)
    if args.json:
        print(json.dumps({**summary, "output": str(args.output)}))
    else:
        for key, value in summary.items():
            print(f"{key}: {_fmt(value)}")
        print(f"dashboard: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
