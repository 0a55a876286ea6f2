"""Backend overhead benchmark (issue #2). Prints a markdown section for docs/PERFORMANCE.md.

1. End-to-end time through the server (client -> ZeroMQ -> queue -> runner -> events) vs
   calling the engine's stages in-process, same image, interleaved runs: ratio and overhead.
2. `status` round trip p50/p99 while a job runs.
3. Preview engine on a 1024x1024 input, per stage.

    .venv/bin/python scripts/bench_backend.py [--runs 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from backend.checks.images import load_image  # noqa: E402
from backend.engines.base import StageContext  # noqa: E402
from backend.engines.preview import PreviewEngine  # noqa: E402
from backend.params import parse_params  # noqa: E402
from backend.supervision import commands  # noqa: E402
from backend.wire.client import Client  # noqa: E402


def example_1024() -> bytes:
    image = Image.open(ROOT / "examples" / "robot.png").resize((1024, 1024), Image.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def in_process(engine: PreviewEngine, data: bytes, params, out: Path) -> tuple[float, dict]:
    began = time.perf_counter()
    state = {"image": load_image(data), "output_path": out}
    timings = {}
    for stage in engine.stages:
        t = time.perf_counter()
        engine.run_stage(stage.name, state, params, StageContext(stage.name))
        timings[stage.name] = time.perf_counter() - t
    return time.perf_counter() - began, timings


def in_process_runner(runner, store, data: bytes) -> float:
    """`python -m backend generate` does this: same validation and job files, no server."""
    from backend.checks.images import load_image as validate_image

    began = time.perf_counter()
    image = validate_image(data)
    record = store.create(
        "generate",
        "preview",
        parse_params({"preset": "balanced"}).to_dict(),
        image=data,
        filename="robot.png",
    )
    result = runner.run(record, image=image)
    assert result.outcome == "done", result.error
    return time.perf_counter() - began


def through_server(client: Client, data: bytes) -> float:
    began = time.perf_counter()
    job_id = client.generate(data, {"preset": "balanced"}, filename="robot.png")
    final = client.wait_for_job(job_id, timeout=120)
    assert final["event"] == "job_done", final
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--status-samples", type=int, default=400)
    args = parser.parse_args()
    data = example_1024()
    params = parse_params({"preset": "balanced"})
    tmp = Path(tempfile.mkdtemp(prefix="bench-backend-"))
    engine = PreviewEngine()
    # The server runs as its own process, as it does for users (one GIL each).
    command = commands.serve_command(
        sys.executable,
        connection_file=tmp / "conn.json",
        output_dir=tmp / "out",
        min_free_disk_mb=1,
        queue_depth=64,
    )
    server = subprocess.Popen(
        command,
        cwd=ROOT,
        env=commands.backend_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (tmp / "conn.json").exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the backend did not start")
        time.sleep(0.05)
    client = Client(tmp / "conn.json")
    client.hello(timeout=10)
    through_server(client, data)  # warm-up both paths
    in_process(engine, data, params, tmp / "warm.glb")

    from backend.pipeline import heap
    from backend.pipeline.runner import Runner, RunnerConfig
    from backend.store.jobs import JobStore
    from backend.store.stats import StatsLog

    store = JobStore(tmp / "inproc")
    runner = Runner(
        engine,
        store,
        StatsLog(tmp / "inproc" / "stats.jsonl"),
        config=RunnerConfig(min_free_disk=1 << 20),
    )
    in_process_runner(runner, store, data)
    heap.settle()  # as the backend process does once its engine is loaded
    direct, hardened, served, stage_times = [], [], [], []
    for i in range(args.runs):
        seconds, timings = in_process(engine, data, params, tmp / f"direct{i}.glb")
        direct.append(seconds)
        stage_times.append(timings)
        hardened.append(in_process_runner(runner, store, data))
        served.append(through_server(client, data))

    # status round trips while jobs run back to back
    for _ in range(3):
        client.generate(data, {"preset": "game-asset"}, filename="busy.png")
    while not client.status()["running"]:
        time.sleep(0.01)
    rtts = []
    busy_samples = 0
    for _ in range(args.status_samples):
        t = time.perf_counter()
        status = client.status(timeout=5)
        rtts.append((time.perf_counter() - t) * 1000)
        busy_samples += bool(status["running"])
    rtts.sort()
    p50 = statistics.median(rtts)
    p99 = rtts[int(len(rtts) * 0.99) - 1]
    client.shutdown("benchmark done")
    server.wait(timeout=60)
    client.close()

    d, h, s = statistics.median(direct), statistics.median(hardened), statistics.median(served)
    stages = {k: statistics.median(t[k] for t in stage_times) for k in stage_times[0]}
    print("## Backend: server overhead, control latency, preview engine (issue #2)\n")
    print(
        f"Measured by `scripts/bench_backend.py --runs {args.runs}` on this 2-core CPU "
        "machine, median of interleaved runs, 1024x1024 RGBA input (examples/robot.png "
        "upscaled), preset balanced, preview engine.\n"
    )
    print("| path | median | ratio | overhead |")
    print("|---|---|---|---|")
    print(f"| engine stages in-process (baseline) | {d * 1000:.0f} ms | 1.00x | |")
    print(
        f"| hardened runner in-process (input and output validation, job files, stats) "
        f"| {h * 1000:.0f} ms | {h / d:.3f}x | {(h - d) * 1000:+.0f} ms |"
    )
    print(
        f"| through the server (client, ZeroMQ, queue, job files, validation, events) "
        f"| {s * 1000:.0f} ms | {s / d:.3f}x | {(s - d) * 1000:+.0f} ms |"
    )
    print(
        f"\nServer vs the same hardened runner in-process (the protocol and queue alone): "
        f"{s / h:.3f}x, {(s - h) * 1000:+.0f} ms."
    )
    print(
        f"\n`status` round trip while a job runs ({len(rtts)} samples, {busy_samples} taken "
        f"while a job was running): p50 {p50:.2f} ms, p99 {p99:.2f} ms.\n"
    )
    print(
        "Preview engine stages (1024x1024, balanced): "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in stages.items())
        + f"; total {d:.2f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
