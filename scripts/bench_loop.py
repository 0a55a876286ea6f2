"""Control-loop latency benchmark (issue #15): does the loop only route?

`ping` round trips (p50/p99/max) from one client against `python -m backend serve` with
5,000 finished jobs in its folder, in one run:
  1. idle;
  2. listing: a second client lists all 5,000 jobs over and over (`jobs(limit=5000)`, paged
     by `next`);
  3. jobs: `--workers` preview jobs running at once (default 4), dozens more queued;
  4. both.
Goal: p99 < 5 ms under load. Prints a markdown section for docs/PERFORMANCE.md.

    .venv/bin/python scripts/bench_loop.py [--jobs 5000] [--pings 2000] [--workers 4]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from backend.store.jobs import JobStore  # noqa: E402
from backend.supervision import commands  # noqa: E402
from backend.wire.client import Client  # noqa: E402


def image_bytes(side: int) -> bytes:
    image = Image.open(ROOT / "examples" / "robot.png").resize((side, side), Image.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def fill_store(folder: Path, count: int) -> None:
    """`count` finished jobs, written by the store itself (job.json, request, input, thumb)."""
    store = JobStore(folder)
    small = image_bytes(64)
    for i in range(count):
        record = store.create("generate", "preview", {"preset": "fast", "seed": i}, image=small)
        store.transition(record.id, "start")
        store.transition(record.id, "finish", result={"glb_path": None, "mesh_stats": {}})


def pings(client: Client, count: int) -> list[float]:
    times = []
    for _ in range(count):
        began = time.perf_counter()
        client.ping(timeout=10)
        times.append((time.perf_counter() - began) * 1000)
        time.sleep(0.002)  # a steady probe, not a flood
    return times


def figures(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * len(ordered)))]
    return f"{statistics.median(ordered):.2f} | {p99:.2f} | {ordered[-1]:.2f}"


class Lister:
    """A second client, in its own process (so its decoding does not hold the pinging
    process's GIL), listing every job page by page until stopped."""

    def __init__(self, conn: Path):
        self.stop = multiprocessing.Event()
        self.counts = multiprocessing.Array("i", 2)  # full listings, pages
        self.process = multiprocessing.Process(
            target=_list_forever, args=(conn, self.stop, self.counts)
        )
        self.process.start()

    @property
    def full_listings(self) -> int:
        return self.counts[0]

    @property
    def pages(self) -> int:
        return self.counts[1]

    def join(self) -> None:
        self.stop.set()
        self.process.join()


def _list_forever(conn: Path, stop, counts) -> None:
    with Client(conn, subscribe=False) as client:
        before = None
        while not stop.is_set():
            content = {"limit": 5000} if before is None else {"limit": 5000, "before": before}
            before = client.request("jobs", content, timeout=60)["next"]
            counts[1] += 1
            counts[0] += before is None


def start_backend(root: Path, conn: Path, output_dir: Path, **options) -> subprocess.Popen:
    """`python -m backend serve` of the checkout at `root` (this one, or another to compare
    against), its output quiet; `options` go to `commands.serve_command`."""
    command = commands.serve_command(
        sys.executable, connection_file=conn, output_dir=output_dir, min_free_disk_mb=1, **options
    )
    env = commands.backend_environment()
    env["PYTHONPATH"] = os.pathsep.join([str(root), env["PYTHONPATH"]])
    return subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def ready_client(server: subprocess.Popen, conn: Path, timeout: float = 60) -> Client:
    """A client of the backend, once it has written its connection file and is ready."""
    deadline = time.monotonic() + timeout
    while not conn.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the backend did not start")
        time.sleep(0.05)
    client = Client(conn, subscribe=False)
    client.hello(timeout=10)
    while client.status(timeout=10)["state"] != "ready":
        time.sleep(0.05)
    return client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4, help="jobs running at once")
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="run the backend of another checkout (to compare)"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    began = time.perf_counter()
    fill_store(tmp / "out", args.jobs)
    fill_seconds = time.perf_counter() - began
    conn = tmp / "conn.json"
    server = start_backend(
        args.root,
        conn,
        tmp / "out",
        queue_depth=1000,
        extra=["--max-concurrent", str(args.workers)],
    )
    rows: list[tuple[str, list[float]]] = []
    notes: list[str] = []
    try:
        with ready_client(server, conn) as client:
            pings(client, 200)  # warm-up
            rows.append(("idle", pings(client, args.pings)))

            lister = Lister(conn)
            rows.append((f"listing all {args.jobs} jobs", pings(client, args.pings)))
            lister.join()
            notes.append(
                f"listing alone: {lister.full_listings} full listings ({lister.pages} pages)"
            )

            # Enough queued jobs to keep the workers busy through both phases below.
            data = image_bytes(1024)
            for _ in range(max(60, 75 * args.workers)):
                client.generate(data, {"preset": "balanced"}, timeout=30)
            while len(client.status(timeout=10)["running"]) < args.workers:
                time.sleep(0.05)
            rows.append((f"{args.workers} jobs running", pings(client, args.pings)))
            lister = Lister(conn)
            rows.append(
                (
                    f"{args.workers} jobs running + listing all {args.jobs}",
                    pings(client, args.pings),
                )
            )
            lister.join()
            status = client.status(timeout=10)
            notes.append(
                f"with jobs: {lister.full_listings} full listings ({lister.pages} pages); at the "
                f"end {len(status['running'])} jobs running and {len(status['queue'])} queued"
            )
            client.shutdown("benchmark done", timeout=10)
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)  # 5,000 job folders: ~340 MB
    cpu = platform.processor() or platform.machine()
    print("## Control loop under load (scripts/bench_loop.py)\n")
    print(
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}; "
        f"{args.jobs} finished jobs in the folder (written in {fill_seconds:.0f} s), preview "
        f"engine with --max-concurrent {args.workers}, 1024x1024 PNG inputs. {args.pings} "
        f"pings per phase, 2 ms apart, one backend process, one run. Backend: {args.root}.\n"
    )
    print("| phase | ping p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    for name, samples in rows:
        print(f"| {name} | {figures(samples)} |")
    print("\n" + "; ".join(notes) + ".")


if __name__ == "__main__":
    main()
