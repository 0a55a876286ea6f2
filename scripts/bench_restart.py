"""Restart-to-ready latency of the supervisor: cold start, the user's Restart, a crash
(kill -9) and a warm-standby takeover, each timed from the trigger until the supervisor is
READY with a connected client. Prints a Markdown table (and JSON with --json); writes nothing
outside a temporary folder."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.supervision.supervisor import (  # noqa: E402
    BackendSpec,
    RespawnPolicy,
    Supervisor,
    SupervisorState,
)


def wait_ready(sup: Supervisor, old_pid: int | None, timeout: float = 60.0) -> float:
    """Tick every millisecond until a backend other than `old_pid` is READY; returns when."""
    deadline = time.monotonic() + timeout
    while True:
        sup.tick()
        if sup.state is SupervisorState.READY and sup.client is not None and sup.pid != old_pid:
            return time.monotonic()
        if sup.state is SupervisorState.DEAD:
            raise SystemExit(f"backend died: {sup.state_reason}")
        if time.monotonic() > deadline:
            raise SystemExit(f"not ready within {timeout} s: {sup.status()}")
        time.sleep(0.001)


def wait_standby(sup: Supervisor, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (sup.status()["standby"] or {}).get("ready"):
        sup.tick()
        if time.monotonic() > deadline:
            raise SystemExit("the standby did not get ready")
        time.sleep(0.005)


def measure(engine: str, options: dict[str, str], trials: int, root: Path) -> dict[str, list]:
    results: dict[str, list[float]] = {"cold start": [], "restart": [], "crash (kill -9)": []}
    results["restart, warm standby"] = []
    for standby in (False, True):
        spec = BackendSpec(
            output_dir=root / "out",
            connection_file=root / "run" / "backend.json",
            engine=engine,
            engine_options=options,
            min_free_disk_mb=1,
        )
        sup = Supervisor(spec, RespawnPolicy(standby=standby, storm_limit=10_000))
        began = time.monotonic()
        sup.start()
        ready = wait_ready(sup, None)
        if not standby:
            results["cold start"].append(ready - began)
        try:
            for _ in range(trials):
                if standby:
                    wait_standby(sup)
                    old = sup.pid
                    began = time.monotonic()
                    sup.restart("benchmark")
                    results["restart, warm standby"].append(wait_ready(sup, old) - began)
                    continue
                old = sup.pid
                began = time.monotonic()
                sup.restart("benchmark")
                results["restart"].append(wait_ready(sup, old) - began)
                old = sup.pid
                began = time.monotonic()
                os.kill(old, signal.SIGKILL)
                results["crash (kill -9)"].append(wait_ready(sup, old) - began)
        finally:
            sup.stop(timeout=30)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", default="preview")
    parser.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    options = dict(pair.split("=", 1) for pair in args.engine_opt)
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        results = measure(args.engine, options, args.trials, Path(tmp))
    rows = {}
    for name, values in results.items():
        if values:
            rows[name] = {
                "n": len(values),
                "median_s": round(statistics.median(values), 3),
                "min_s": round(min(values), 3),
                "max_s": round(max(values), 3),
            }
    if args.json:
        print(json.dumps({"engine": args.engine, "cpus": os.cpu_count(), "rows": rows}, indent=2))
        return 0
    print(
        f"engine {args.engine}; {platform.platform()}; {os.cpu_count()} CPUs; Python "
        f"{platform.python_version()}\n"
    )
    print("| trigger → READY | n | median | min | max |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['n']} | {row['median_s']:.3f} s | {row['min_s']:.3f} s "
            f"| {row['max_s']:.3f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
