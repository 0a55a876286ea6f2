"""Unsigned large messages against the control loop: how much do they cost other clients?

Any local user can reach the backend's loopback port; without the key a message is refused,
but only after its bytes were received and hashed (docs/protocol.md). `ping` round trips
(p50/p99/max) from one client against `python -m backend serve`, in one run:
  1. idle;
  2. while a second process sends `--messages` unsigned `generate` messages of `--buffers`
     buffers of `--mib` MiB each, one after another, as fast as the backend takes them.
Run it for this checkout and another (`--root`, e.g. `git archive` of an older commit) and
compare the ratios. Prints a markdown section for docs/PERFORMANCE.md.

    .venv/bin/python scripts/bench_flood.py [--messages 8] [--buffers 4] [--mib 64] [--root DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402
from bench_loop import ready_client, start_backend  # noqa: E402

from backend.wire import protocol  # noqa: E402
from backend.wire.client import Client  # noqa: E402


def flood(shell_url: str, messages: int, buffers: int, mib: int, done) -> None:
    """A peer without the key: signed with a key of its own, so every message is refused."""
    session = protocol.Session(protocol.new_key())
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.connect(shell_url)
    payload = os.urandom(1 << 20) * mib
    frames = [payload] * buffers
    for _ in range(messages):
        sock.send_multipart(session.serialize(session.msg("generate", {}, buffers=frames)))
    refused = 0
    for _ in range(messages):
        try:
            sock.recv_multipart()
            refused += 1
        except zmq.Again:
            break
    done.put(refused)
    sock.close()


def pings(client: Client, stop: threading.Event | None, count: int) -> list[float]:
    times = []
    while len(times) < count if stop is None else not stop.is_set():
        began = time.perf_counter()
        client.ping(timeout=30)
        times.append((time.perf_counter() - began) * 1000)
        time.sleep(0.002)
    return times


def figures(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{ordered[len(ordered) // 2]:.2f} | {p99:.2f} | {ordered[-1]:.2f} | {len(ordered)}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=8)
    parser.add_argument("--buffers", type=int, default=4)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--pings", type=int, default=500, help="idle pings")
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="run the backend of another checkout (to compare)"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    conn = tmp / "conn.json"
    server = start_backend(args.root, conn, tmp / "out")
    try:
        with ready_client(server, conn) as client:
            pings(client, None, 100)  # warm-up
            idle = pings(client, None, args.pings)
            done = multiprocessing.Queue()
            sender = multiprocessing.Process(
                target=flood,
                args=(client.info.shell_url, args.messages, args.buffers, args.mib, done),
            )
            stop = threading.Event()
            began = time.perf_counter()
            sender.start()
            watcher = threading.Thread(target=lambda: (sender.join(), stop.set()))
            watcher.start()
            during = pings(client, stop, 0)
            watcher.join()
            seconds = time.perf_counter() - began
            refused = done.get(timeout=5)
            rejected = client.status(timeout=10)["rejected"]
            client.shutdown("benchmark done", timeout=10)
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    cpu = platform.processor() or platform.machine()
    print("## Unsigned large messages (scripts/bench_flood.py)\n")
    print(
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}; "
        f"{args.messages} unsigned `generate` messages of {args.buffers} x {args.mib} MiB from a "
        f"second process, {seconds:.1f} s until all were answered ({refused} refusals; "
        f"`status.rejected` {rejected}). Pings 2 ms apart. Backend: {args.root}.\n"
    )
    print("| phase | ping p50 ms | p99 ms | max ms | pings |")
    print("|---|---|---|---|---|")
    print(f"| idle | {figures(idle)} |")
    print(f"| during the flood | {figures(during)} |")


if __name__ == "__main__":
    main()
