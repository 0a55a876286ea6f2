"""Control-loop latency while a real TRELLIS.2 job runs (GPU machine; issue #15).

`ping` round trips (p50/p99/max) from one client against `python -m backend serve --engine
trellis2` (the random weights of scripts/gpu/make_weights.py), in one run:
  1. idle, after the engine has loaded (and, with a lister job, idle next to the lister);
     also 50 `status` requests, which the loop answers too;
  2. one job at a time (`--jobs`, presets with examples/robot.png, seed 1): a ping every 2 ms,
     counted while the job runs: after its `job_started` and before its terminal event (the
     pinging client follows the job by its events, sending nothing else), by the stage its
     last `job_progress` named; the pings of the 3 s after the job are kept apart. A second
     client asks `status` every `--status-every` s (5: the supervisor's STATUS_INTERVAL) on
     a thread; pings that overlapped one of its requests are also reported apart;
  3. `--lister-job`: the same with a third client (its own process) listing every job of the
     folder page by page (`jobs` following `next`; scripts/bench_loop.py's Lister), the folder
     holding `--fill` finished jobs written beforehand;
  4. `--where-job` (optional): one more job with a sampler thread in the backend (a
     sitecustomize only this script puts on the backend's path, off until then) that sleeps
     1 ms and, when it wakes more than 5 ms late, notes where every other thread is: right
     after a long GIL hold, the holder stands on the line that held it.

    source scripts/gpu/env.sh   # TRELLIS2_WEIGHTS, TRELLIS2_CHECKOUT, PYTHONPATH
    python3 scripts/gpu/bench_loop_gpu.py --out loop.json [--jobs fast,balanced]
        [--lister-job fast] [--where-job fast] [--fill 2000] [--pings 1000] [--budget 540]
        [--job-seconds fast=60,balanced=130] [--status-every 5]

`--engine preview` runs the same phases on the CPU (to check the script). Prints a summary;
the JSON holds per-phase and per-stage figures, the slowest pings, each job's outcome, level,
structure (the cascade's counted tokens) and stage seconds, and the backend log's tail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_loop import Lister, fill_store  # noqa: E402

from backend.supervision import commands  # noqa: E402
from backend.wire.client import Client, ClientTimeout  # noqa: E402

IMAGE = ROOT / "examples" / "robot.png"
# Wall seconds a job may need on an H200 (tests/test_gpu_trellis2.py's PRESET_SECONDS);
# `--job-seconds` overrides them. A job that would not end before `--budget` is not started.
PRESET_SECONDS = {"fast": 150, "balanced": 150, "high": 220, "game-asset": 330}
AFTER_JOB = 3.0

# Put on the backend's path only by this script (a folder of its own). Off until the flag
# file exists; then a thread wakes every millisecond and, when late, notes every thread's
# innermost frames.
SITECUSTOMIZE = """
import os, sys, threading, time, traceback, json
def _where(flag, out, late_ms):
    me = threading.get_ident()
    kept = 0
    while kept < 5000:
        if not os.path.exists(flag):
            time.sleep(0.2)
            continue
        began = time.perf_counter()
        time.sleep(0.001)
        late = (time.perf_counter() - began) * 1000 - 1.0
        if late < late_ms:
            continue
        names = {t.ident: t.name for t in threading.enumerate()}
        threads = {}
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            stack = traceback.extract_stack(frame)[-8:]
            threads[names.get(ident, str(ident))] = [
                f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in stack] + [
                (stack[-1].line or "") if stack else ""]
        with open(out, "a") as f:
            f.write(json.dumps({"t": time.time(), "late_ms": round(late, 2),
                                "threads": threads}) + "\\n")
        kept += 1
if os.environ.get("BENCH_WHERE_FLAG") and "serve" in sys.argv:
    threading.Thread(target=_where, name="bench-where", daemon=True, args=(
        os.environ["BENCH_WHERE_FLAG"], os.environ["BENCH_WHERE_OUT"],
        float(os.environ.get("BENCH_WHERE_LATE_MS", "5")))).start()
"""


def stats_of(samples: list[float]) -> dict:
    if not samples:
        return {"count": 0}
    ordered = sorted(samples)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, round(q * n))], 3)

    return {
        "count": n,
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round(ordered[-1], 3),
        "over_5ms": sum(s > 5.0 for s in ordered),
    }


def ping_once(client: Client) -> float:
    began = time.perf_counter()
    try:
        client.ping(timeout=30)
    except ClientTimeout:
        return 30_000.0
    return (time.perf_counter() - began) * 1000


class StatusPoller:
    """A second client asking `status` every `every` seconds, as the supervisor does (its
    STATUS_INTERVAL), on a thread of its own; the spans of its requests are kept so the
    pings that shared the loop with one can be told apart."""

    def __init__(self, conn: Path, every: float):
        self.every = every
        self.spans: list[tuple[float, float]] = []  # perf_counter() at send and at reply
        self.sent: float | None = None  # the request in flight: when it was sent
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
        if every > 0:
            self.thread.start()

    def _run(self, conn: Path) -> None:
        with Client(conn, subscribe=False) as client:
            while not self.stop.wait(self.every):
                self.sent = t0 = time.perf_counter()  # set before sending: seen while in flight
                client.status(timeout=30)
                self.spans.append((t0, time.perf_counter()))
                self.sent = None  # after the span is kept: one of the two is always seen

    def ms(self, since: float = 0.0) -> list[float]:
        return [(b - a) * 1000 for a, b in self.spans if a >= since]

    def overlaps(self, t0: float, t1: float) -> bool:
        sent = self.sent
        if sent is not None and sent < t1:
            return True
        return any(a < t1 and t0 < b for a, b in self.spans[-50:])

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(40)


class JobProbe:
    """Pings every 2 ms while one job runs, following it by its events (`job_started`, each
    `job_progress`'s stage, the terminal event) on the same client: no request of its own."""

    def __init__(self, client: Client, job_id: str, began: float, poller: StatusPoller):
        self.client = client
        self.job_id = job_id
        self.began = began
        self.poller = poller
        self.running: list[tuple[float, float, str, bool]] = []  # (t, ms, stage, by a status)
        self.after: list[float] = []
        self.stages_seen: dict[str, int] = {}  # stage -> the largest step total seen
        self.started: float | None = None
        self.ended: float | None = None
        self.outcome: str | None = None
        self.stage = ""

    def events(self) -> None:
        for message in self.client.poll(0):
            content = message.content or {}
            if content.get("job_id") != self.job_id:
                continue
            now = time.perf_counter() - self.began
            if message.msg_type == "job_started":
                self.started = now
            elif message.msg_type == "job_progress":
                self.stage = content.get("stage") or "?"
                total = content.get("total") or 0
                self.stages_seen[self.stage] = max(self.stages_seen.get(self.stage, 0), total)
                if self.started is None:
                    self.started = now
            elif message.msg_type in ("job_done", "job_failed", "job_cancelled"):
                self.ended, self.outcome = now, message.msg_type

    def run(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.ended is None:
            self.events()
            stage = self.stage
            t0 = time.perf_counter()
            ms = ping_once(self.client)
            t1 = time.perf_counter()
            self.events()
            # counted when the job had started before the ping and had not ended after it
            if self.started is not None and self.ended is None:
                overlap = self.poller.overlaps(t0, t1)
                self.running.append((t0 - self.began, ms, stage, overlap))
            time.sleep(0.002)
        if self.ended is None:  # events may be dropped (PUB/SUB): the store is the truth
            record = self.client.job(self.job_id, timeout=30)["job"]
            self.outcome = f"{record['state']} (no terminal event within {timeout:.0f} s)"
        # the pings right after the job: the runner's cleanup, the result's bookkeeping
        stop = time.perf_counter() + AFTER_JOB
        while time.perf_counter() < stop:
            self.after.append(ping_once(self.client))
            time.sleep(0.002)

    def report(self) -> dict:
        by_stage: dict[str, list[float]] = {}
        for _, ms, stage, _ in self.running:
            by_stage.setdefault(stage, []).append(ms)
        slowest = sorted(self.running, key=lambda r: -r[1])[:20]
        return {
            "running": stats_of([r[1] for r in self.running]),
            "running_no_status": stats_of([r[1] for r in self.running if not r[3]]),
            "running_with_status": stats_of([r[1] for r in self.running if r[3]]),
            "by_stage": {stage: stats_of(v) for stage, v in by_stage.items()},
            "after_job_3s": stats_of(self.after),
            "slowest": [
                {"t": round(t, 3), "ms": round(ms, 2), "stage": s, "status_in_flight": o}
                for t, ms, s, o in slowest
            ],
            "stage_step_totals": self.stages_seen,
            "seconds_to_started": self.started,
            "seconds_to_end": self.ended,
            "outcome": self.outcome,
        }


def job_summary(output_dir: Path, job_id: str) -> dict:
    folder = output_dir / "jobs" / job_id
    try:
        job = json.loads((folder / "job.json").read_text())
        stats = json.loads((folder / "stats.json").read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    attempts = stats.get("attempts") or []
    mesh = stats.get("mesh_stats") or {}
    return {
        "state": job.get("state"),
        "error": job.get("error"),
        "level": job.get("level"),
        "attempts": [
            {k: a.get(k) for k in ("level", "outcome", "stage", "seconds")} for a in attempts
        ],
        "final_params": {
            k: (job.get("final_params") or {}).get(k)
            for k in ("resolution", "max_num_tokens", "remesh", "remesh_band")
        },
        "seconds": stats.get("seconds"),
        "stage_seconds": attempts[-1].get("stage_seconds") if attempts else None,
        "structure": mesh.get("structure"),
        "faces": mesh.get("faces"),
        "vram_peak": max((a.get("vram_peak") or 0) for a in attempts) if attempts else None,
    }


def where_summary(path: Path) -> dict:
    """The late wake-ups grouped by each non-idle thread's innermost frame."""
    if not path.is_file():
        return {"events": 0}
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # a thread waiting in a blocking call is not what held the GIL (its innermost line)
    idle = re.compile(r"\b(wait|get|poll|select|sleep|recv\w*|read|readline|accept|join|acquire)\(")
    spots: dict[str, dict] = {}
    for event in events:
        for name, record in event["threads"].items():
            stack, line = record[:-1], record[-1]
            if not stack or idle.search(line):
                continue
            key = f"{name.rsplit('-', 1)[0]}: " + " <- ".join(reversed(stack[-3:]))
            spot = spots.setdefault(key, {"count": 0, "late_ms": 0.0, "max_ms": 0.0})
            spot["count"] += 1
            spot["late_ms"] = round(spot["late_ms"] + event["late_ms"], 2)
            spot["max_ms"] = max(spot["max_ms"], event["late_ms"])
    top = sorted(spots.items(), key=lambda kv: -kv[1]["late_ms"])[:25]
    lates = [e["late_ms"] for e in events]
    return {"events": len(events), "late_ms": stats_of(lates), "spots": dict(top)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", default="trellis2")
    parser.add_argument("--jobs", default="fast,balanced", help="presets, one job at a time")
    parser.add_argument("--lister-job", default="fast", help="preset run next to the lister")
    parser.add_argument("--where-job", default="", help="preset run with the late-wake sampler")
    parser.add_argument("--fill", type=int, default=2000, help="finished jobs in the folder")
    parser.add_argument("--pings", type=int, default=1000, help="idle pings")
    parser.add_argument("--budget", type=float, default=540.0)
    parser.add_argument("--job-seconds", default="", help="e.g. fast=60,balanced=130")
    parser.add_argument(
        "--status-every", type=float, default=5.0, help="a second client's `status` (0: none)"
    )
    args = parser.parse_args()
    began = time.time()
    deadline = began + args.budget
    tmp = Path(tempfile.mkdtemp(prefix="bench-loop-gpu-"))
    out_dir = tmp / "out"
    report: dict = {"engine": args.engine, "phases": {}, "jobs": {}, "notes": []}

    def save() -> None:
        report["seconds"] = round(time.time() - began, 1)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))

    t0 = time.perf_counter()
    fill_store(out_dir, args.fill)
    report["fill"] = {"jobs": args.fill, "seconds": round(time.perf_counter() - t0, 1)}

    options = {}
    if args.engine == "trellis2":
        options = {
            "weights_dir": os.environ["TRELLIS2_WEIGHTS"],
            "trellis_checkout": os.environ["TRELLIS2_CHECKOUT"],
        }
    conn = tmp / "conn.json"
    command = commands.serve_command(
        sys.executable,
        connection_file=conn,
        output_dir=out_dir,
        engine=args.engine,
        engine_options=options,
        queue_depth=100,
        min_free_disk_mb=1,
    )
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    where_flag, where_out = tmp / "where.on", tmp / "where.jsonl"
    env = commands.backend_environment(
        extra_pythonpath=[str(site)],
        overrides={"BENCH_WHERE_FLAG": str(where_flag), "BENCH_WHERE_OUT": str(where_out)},
    )
    log_path = tmp / "serve.log"
    report["command"] = command
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            run_phases(args, report, save, server, conn, out_dir, where_flag, where_out, deadline)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(30)
    report["serve_log_tail"] = log_path.read_text(errors="replace")[-6000:]
    save()
    return 0


def run_phases(args, report, save, server, conn, out_dir, where_flag, where_out, deadline):
    """Wait for `ready`, then the idle pings and one job after the other."""
    t0 = time.perf_counter()
    while not conn.exists():
        if server.poll() is not None or time.time() > deadline:
            raise SystemExit("the backend did not start")
        time.sleep(0.05)
    seconds = dict(PRESET_SECONDS)
    for pair in filter(None, args.job_seconds.split(",")):
        preset, value = pair.split("=")
        seconds[preset] = float(value)
    with Client(conn) as client:  # subscribed: a job is followed by its events
        client.hello(timeout=30)
        while True:
            status = client.status(timeout=30)
            if status["state"] == "ready":
                break
            if status["state"] == "failed" or time.time() > deadline:
                raise SystemExit(f"the engine did not load: {status.get('engine_error')}")
            time.sleep(0.2)
        report["time_to_ready_s"] = round(time.perf_counter() - t0, 1)
        engine = status.get("engine") or {}
        report["engine_info"] = {
            k: engine.get(k) for k in ("name", "attention_backend", "low_vram", "device")
        }
        report["gpu"] = (status.get("vram") or {}).get("device")
        report["cpus"] = os.cpu_count()
        report["python"] = sys.version.split()[0]
        print("ready in", report["time_to_ready_s"], "s", flush=True)
        for _ in range(200):  # warm-up
            ping_once(client)
        status_ms = []  # what one `status` costs the loop (answered there, like ping)
        for _ in range(50):
            t0 = time.perf_counter()
            client.status(timeout=30)
            status_ms.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.01)
        report["phases"]["idle_status"] = stats_of(status_ms)
        print("idle status", report["phases"]["idle_status"], flush=True)
        client.poll(0)
        idle = []
        for _ in range(args.pings):
            idle.append(ping_once(client))
            time.sleep(0.002)
        report["phases"]["idle"] = stats_of(idle)
        print("idle", report["phases"]["idle"], flush=True)
        if args.lister_job:  # the listing alone, as a baseline for the job next to it
            lister = Lister(conn)
            listing = []
            for _ in range(args.pings):
                listing.append(ping_once(client))
                time.sleep(0.002)
            lister.join()
            report["phases"]["listing"] = {
                **stats_of(listing),
                "lister": {"full_listings": lister.full_listings, "pages": lister.pages},
            }
            print("listing", report["phases"]["listing"], flush=True)
        save()

        plan = [(p, "") for p in args.jobs.split(",") if p]
        if args.lister_job:
            plan.append((args.lister_job, "lister"))
        if args.where_job:
            plan.append((args.where_job, "where"))
        image = IMAGE.read_bytes()
        for preset, extra in plan:
            name = preset + (f"+{extra}" if extra else "")
            if time.time() + seconds[preset] > deadline:
                report["notes"].append(f"{name}: not run (time)")
                save()
                continue
            lister = Lister(conn) if extra == "lister" else None
            if extra == "where":
                where_flag.touch()
            poller = StatusPoller(conn, args.status_every)
            job_began = time.perf_counter()
            job_id = client.generate(image, {"preset": preset, "seed": 1}, timeout=30)
            probe = JobProbe(client, job_id, job_began, poller)
            try:
                probe.run(max(10.0, min(seconds[preset] + 120, deadline - time.time() - 8)))
            finally:
                poller.close()
                if lister is not None:
                    lister.join()
                where_flag.unlink(missing_ok=True)
            phase = probe.report()
            phase["status_every"] = args.status_every
            phase["status_ms"] = stats_of(poller.ms())
            if lister is not None:
                phase["lister"] = {"full_listings": lister.full_listings, "pages": lister.pages}
            if extra == "where":
                time.sleep(0.5)
                phase["where"] = where_summary(where_out)
            report["phases"][name] = phase
            time.sleep(0.5)  # the job's record written
            report["jobs"][name] = {"job_id": job_id, **job_summary(out_dir, job_id)}
            print(name, "running", phase["running"], flush=True)
            print(name, "job", json.dumps(report["jobs"][name], default=str)[:600], flush=True)
            save()
        client.shutdown("benchmark done", timeout=10)
    server.wait(60)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
