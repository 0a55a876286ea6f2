"""The backend's memory between jobs: RSS over N preview jobs run in-process by the real
runner, and what the per-job collection costs, in three modes measured in one run, each in a
fresh interpreter so that one cannot warm the heap of another:

  trim-only      what the runner did before: malloc_trim after each job, no collection
  collect        a full gc.collect() after each job, start-up objects still tracked
  collect+freeze what the backend does now: start-up objects frozen (heap.settle), then a
                 full collection after each job

Usage: python scripts/bench_memory.py [--jobs 200]      (prints a Markdown table)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("trim-only", "collect", "collect+freeze")


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def one_mode(mode: str, jobs: int) -> dict:
    from backend.engines.preview import PreviewEngine
    from backend.params import parse_params
    from backend.pipeline import heap
    from backend.pipeline.runner import Runner, RunnerConfig
    from backend.store.jobs import JobStore
    from backend.store.stats import StatsLog

    spent: list[float] = []
    release = heap.release_after_job

    def timed_release(collect: bool = True) -> None:
        began = time.perf_counter()
        if mode == "trim-only":
            heap.trim()
        else:
            release(collect)
        spent.append(time.perf_counter() - began)

    heap.release_after_job = timed_release
    images = sorted((ROOT / "examples").glob("*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        store = JobStore(Path(tmp) / "jobs")
        engine = PreviewEngine()
        engine.load()
        runner = Runner(engine, store, StatsLog(Path(tmp) / "stats.jsonl"), config=RunnerConfig())
        params = parse_params({"preset": "fast"}).to_dict()

        def run(i: int) -> None:
            image = images[i % len(images)]
            record = store.create(
                "generate", "preview", params, image=image.read_bytes(), filename=image.name
            )
            result = runner.run(record)
            assert result.outcome == "done", result.error

        for i in range(3):  # lazy imports and first-use caches are start-up, not growth
            run(i)
        if mode == "collect+freeze":
            heap.settle()
        spent.clear()
        start = rss_mb()
        peak = start
        began = time.perf_counter()
        for i in range(jobs):
            run(i)
            peak = max(peak, rss_mb())
        seconds = time.perf_counter() - began
    return {
        "mode": mode,
        "jobs": jobs,
        "rss_start_mb": round(start, 1),
        "rss_end_mb": round(rss_mb(), 1),
        "rss_peak_mb": round(peak, 1),
        "release_ms_median": round(statistics.median(spent) * 1000, 2),
        "seconds_per_job": round(seconds / jobs, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args.jobs)))
        return 0
    rows = []
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, __file__, "--jobs", str(args.jobs), "--mode", mode],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{args.jobs} preview jobs (fast preset) per mode, in-process runner\n")
    print("| mode | RSS start → end (peak), MB | growth MB | release per job, ms | s per job |")
    print("|---|---|---|---|---|")
    for r in rows:
        growth = r["rss_end_mb"] - r["rss_start_mb"]
        ratio = r["seconds_per_job"] / base["seconds_per_job"]
        print(
            f"| {r['mode']} | {r['rss_start_mb']} → {r['rss_end_mb']} ({r['rss_peak_mb']}) "
            f"| {growth:+.1f} | {r['release_ms_median']} "
            f"| {r['seconds_per_job']} ({ratio:.2f}×) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
