#!/usr/bin/env python3
"""Figures for docs/SCALE.md: the studio server on this machine (real redis-server, gateway
and worker processes; CPU engines stand in for GPUs).

1. throughput: the same load (N jobs at once from two sessions) on 1 and on 2 workers, jobs
   per minute and their ratio; with a device-bound stand-in (SlowEngine: the job waits like
   on a GPU, the CPU stays free) and with the CPU-bound preview engine;
2. latency: one small job end to end, local backend (supervisor + client, GLB read from disk)
   against the gateway path (CURVE, Celery, Redis, worker, download);
3. the gateway's download rate over CURVE (`fetch` chunks);
4. Redis commands and events per job (what the broker must carry per job).

    .venv/bin/python scripts/bench_scale.py [--jobs 24] [--runs 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from backend.supervision.supervisor import BackendSpec, RespawnPolicy, Supervisor  # noqa: E402
from backend.wire.remote import RemoteBackend  # noqa: E402
from tests.cluster import Cluster  # noqa: E402
from tests.conftest import png_bytes  # noqa: E402

SLOW = "tests.cpu_engines:SlowEngine"


def _cluster(folder: Path, engine: str, options: dict, workers: int, depth: int) -> tuple:
    cluster = Cluster(folder, engine=engine, engine_options=options, queue_depth=depth)
    strings = [cluster.add_user(f"artist{i}") for i in range(2)]
    cluster.start_gateway()
    names = [f"w{i}" for i in range(workers)]
    for gpu, name in enumerate(names):
        cluster.start_worker(name, vram_gb=24, gpu=gpu)
    cluster.wait_workers(names)
    sessions = [RemoteBackend(s) for s in strings]
    deadline = time.monotonic() + 30
    while len(sessions[0].status()["workers"]) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway does not list the workers")
        time.sleep(0.2)
    return cluster, sessions


def _commands(url: str) -> dict[str, int]:
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}


def throughput(engine: str, options: dict, workers: int, jobs: int, image: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cluster, sessions = _cluster(Path(tmp), engine, options, workers, depth=jobs + 4)
        try:
            before = _commands(cluster.redis.url)
            ids: list[list[str]] = [[], []]
            began = time.monotonic()

            def artist(i: int) -> None:
                remote = sessions[i]
                for _ in range(jobs // 2):
                    ids[i].append(remote.generate(image, {"preset": "fast"}))
                for job_id in ids[i]:
                    remote.wait_for_job(job_id, 600)

            threads = [threading.Thread(target=artist, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.monotonic() - began
            after = _commands(cluster.redis.url)
            done = sum(len(x) for x in ids)
            calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            return {
                "engine": engine,
                "workers": workers,
                "jobs": done,
                "seconds": round(seconds, 2),
                "jobs_per_minute": round(done / seconds * 60, 1),
                "redis_commands_per_job": round(sum(calls.values()) / done, 1),
                "redis_publish_per_job": round(calls.get("publish", 0) / done, 1),
            }
        finally:
            for s in sessions:
                s.close()
            cluster.close()


def latency_gateway(runs: int, image: bytes) -> list[tuple[float, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster, sessions = _cluster(Path(tmp), "preview", {}, 1, depth=8)
        try:
            remote = sessions[0]
            remote.wait_for_job(remote.generate(image, {"preset": "fast"}), 120)  # warm
            out = []
            for _ in range(runs):
                began = time.perf_counter()
                job_id = remote.generate(image, {"preset": "fast"})
                submitted = time.perf_counter() - began
                remote.wait_for_job(job_id, 120)
                remote.download(job_id)
                out.append((time.perf_counter() - began, submitted))
            return out
        finally:
            for s in sessions:
                s.close()
            cluster.close()


def latency_local(runs: int, image: bytes) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = BackendSpec(
            output_dir=Path(tmp) / "out",
            connection_file=Path(tmp) / "run" / "backend.json",
            engine="preview",
            min_free_disk_mb=1,
        )
        sup = Supervisor(spec, RespawnPolicy())
        sup.start_and_wait()
        try:
            client = sup.client
            client.wait_for_job(client.generate(image, {"preset": "fast"}), 120)  # warm
            out = []
            for _ in range(runs):
                began = time.perf_counter()
                job_id = client.generate(image, {"preset": "fast"})
                done = client.wait_for_job(job_id, 120)
                Path(done["glb_path"]).read_bytes()
                out.append(time.perf_counter() - began)
            return out
        finally:
            sup.stop()


def download_rate(size_mb: int, chunk_mb: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cluster, sessions = _cluster(Path(tmp), "preview", {}, 1, depth=8)
        try:
            remote = sessions[0]
            job_id = remote.generate(png_bytes(), {"preset": "fast"})
            remote.wait_for_job(job_id, 120)
            big = cluster.store / "jobs" / job_id / "big.bin"
            big.write_bytes(os.urandom(size_mb << 20))
            began = time.perf_counter()
            data = remote.download(job_id, "big.bin", chunk=chunk_mb << 20)
            seconds = time.perf_counter() - began
            assert len(data) == size_mb << 20
            return {
                "size_mb": size_mb,
                "chunk_mb": chunk_mb,
                "seconds": round(seconds, 3),
                "mb_per_s": round(size_mb / seconds, 1),
            }
        finally:
            for s in sessions:
                s.close()
            cluster.close()


def _summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "runs": len(values),
        "median_ms": round(statistics.median(values) * 1000, 1),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 1),
        "min_ms": round(ordered[0] * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--slow-seconds", type=float, default=2.0, help="device time per job")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--phases", default="throughput,latency,download", help="comma-separated subset"
    )
    args = parser.parse_args()
    image = png_bytes()
    step = args.slow_seconds / 30  # SlowEngine: 3 stages x 10 steps
    slow = {"steps": "10", "step_seconds": f"{step:.4f}"}
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "throughput": [],
    }
    phases = set(args.phases.split(","))
    if "throughput" in phases:
        for engine, options in ((SLOW, slow), ("preview", {})):
            for workers in (1, 2):
                row = throughput(engine, options, workers, args.jobs, image)
                results["throughput"].append(row)
                print(json.dumps(row), flush=True)
    if "latency" in phases:
        local, remote = latency_local(args.runs, image), latency_gateway(args.runs, image)
        results["latency_local"] = _summary(local)
        results["latency_gateway"] = _summary([r[0] for r in remote])
        results["gateway_submit"] = _summary([r[1] for r in remote])
        results["added_latency_median_ms"] = round(
            results["latency_gateway"]["median_ms"] - results["latency_local"]["median_ms"], 1
        )
        keys = ("latency_local", "latency_gateway", "gateway_submit", "added_latency_median_ms")
        print(json.dumps({k: results[k] for k in keys}), flush=True)
    if "download" in phases:
        results["download"] = [download_rate(64, chunk) for chunk in (1, 4)]
        print(json.dumps(results["download"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
