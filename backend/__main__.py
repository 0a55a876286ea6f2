"""Command line: `python -m backend {serve,generate,jobs,cancel,stats,doctor,supervise} --help`."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__, settings
from .errors import BackendError
from .files import default_output_dir
from .pipeline import gpu

DESCRIPTION = """\
TRELLIS.2 for Blender - the backend.

Turns an image into a textured 3D model (GLB). The Blender add-on starts this for you;
use these commands for scripts, batch jobs and troubleshooting.

  serve      run the backend server (the add-on talks to it over ZeroMQ on 127.0.0.1)
  generate   turn one image into a GLB right here, without a server
  jobs       list past jobs from the output folder
  cancel     cancel a job while no backend runs on its output folder
  stats      success rate, timings and memory figures of past jobs
  doctor     check a TRELLIS.2 installation (packages, GPU, weights) and say how to fix it
  supervise  keep a backend alive for scripts: restart it when it crashes
  worker     studio server: a Celery worker that owns one GPU (docs/SCALE.md)
  gateway    studio server: the encrypted, authenticated entry point for artists;
             `gateway add-user NAME` prints an artist's connection string
"""


def _engine_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-opt expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = value
    return options


def _params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.params:
        try:
            params.update(json.loads(args.params))
        except ValueError as exc:
            raise SystemExit(f"--params is not JSON: {exc}") from None
    for name in ("preset", "seed", "resolution", "texture_size", "decimation_target", "image_size"):
        value = getattr(args, name, None)
        if value is not None:
            params[name] = value
    if getattr(args, "no_remesh", False):
        params["remesh"] = False
    return params


def cmd_serve(args: argparse.Namespace) -> int:
    gpu.configure_allocator()  # before anything can import torch
    # The control loop shares the GIL with job, intake and reader threads that compute in
    # Python; a thread asking for the GIL waits up to this interval (5 ms by default), so a
    # shorter one keeps `ping` and `status` answered within milliseconds (scripts/bench_loop.py).
    sys.setswitchinterval(settings.GIL_SWITCH_INTERVAL)
    # Pillow encodes a PNG (every texture a job exports) in chunks of MAXBLOCK output bytes
    # with the GIL held: 64 KiB took ~11 ms per chunk on the CI machine, a quarter ~4 ms.
    from PIL import ImageFile

    ImageFile.MAXBLOCK = settings.PNG_ENCODE_CHUNK
    # A crash inside a CUDA extension (segfault, abort) then leaves the Python stack in the
    # backend's log, which the supervisor shows with the failed job.
    faulthandler.enable()
    from .server.loop import Server, ServerConfig

    config = ServerConfig(
        connection_file=Path(args.connection_file),
        output_dir=Path(args.output_dir or default_output_dir()),
        state_dir=Path(args.state_dir) if args.state_dir else None,
        engine=args.engine,
        engine_options=_engine_options(args.engine_opt),
        queue_depth=args.queue_depth,
        max_concurrent=args.max_concurrent,
        min_free_disk=int(args.min_free_disk_mb * 2**20),
        parent_pid=args.parent_pid,
        vram_cap_bytes=int(args.vram_cap_gb * 2**30) if args.vram_cap_gb else None,
        heartbeat_interval=args.heartbeat,
        standby=args.standby,
        recover=not args.no_recover,
    )
    server = Server(config)
    from .store.ownerlock import OutputLocked

    try:
        server.claim()  # before the connection file: a refused backend never looks alive
    except OutputLocked as exc:
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return settings.EXIT_LOCKED
    info = server.bind()
    logging.getLogger(__name__).info(
        "backend %s serving engine %s on 127.0.0.1:%s/%s (session %s)",
        __version__,
        server.engine.name,
        info.shell_port,
        info.iopub_port,
        info.session,
    )
    # SIGTERM and Ctrl-C stop it like a `shutdown` request: the running job requeues itself
    # at its next checkpoint (within SIGNAL_GRACE), the connection file is removed, the exit
    # code is 0. A signal after a stop began (the supervisor's ladder, a second Ctrl-C) stops
    # waiting for it.
    stop = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGBREAK,) if sys.platform == "win32" else ())

    def on_signal(name: str) -> None:
        server.request_stop(f"{name} received", grace=settings.SIGNAL_GRACE, escalate=True)

    with _stop_signals(stop, on_signal):
        code = server.serve_forever()
    if code == settings.EXIT_POISONED:
        # A broken CUDA context can hang interpreter teardown; leave at once.
        logging.shutdown()
        os._exit(code)
    return code


def cmd_generate(args: argparse.Namespace) -> int:
    gpu.configure_allocator()
    from .checks.images import load_image
    from .engines import create as create_engine
    from .params import parse_params
    from .pipeline.runner import Runner, RunnerConfig
    from .store.jobs import JobStore
    from .store.stats import StatsLog

    image_path = Path(args.image)
    try:
        data = image_path.read_bytes()
    except OSError as exc:
        raise BackendError("bad_image", f"cannot read {image_path}: {exc.strerror}") from None
    load_image(data)
    params = parse_params(_params_from_args(args)).to_dict()
    from .store.ownerlock import BACKEND_LOCK, OWNER_LOCK, OutputLock

    output_dir = Path(args.output_dir or default_output_dir())
    engine = create_engine(args.engine, **_engine_options(args.engine_opt))
    # This process runs a job in the folder: it must own it like a backend (typed error if
    # a supervisor or backend does).
    locks = [
        OutputLock(output_dir, name, "generate command") for name in (OWNER_LOCK, BACKEND_LOCK)
    ]
    store = JobStore(output_dir, locks=locks)
    store.claim()
    if store.problem is not None:
        raise store.problem
    stats = StatsLog(output_dir / "state" / "stats.jsonl")
    engine.load(lambda fraction, text="": None)
    runner = Runner(
        engine, store, stats, config=RunnerConfig(min_free_disk=int(args.min_free_disk_mb * 2**20))
    )
    ext = image_path.suffix.lstrip(".").lower() or "png"
    record = store.create(
        "generate", engine.name, params, image=data, image_ext=ext, filename=image_path.name
    )

    def emit(kind: str, content: dict[str, Any]) -> None:
        if args.quiet:
            return
        if kind == "job_progress":
            print(f"  {content['fraction'] * 100:5.1f}%  {content['label']}", file=sys.stderr)
        elif kind == "job_retry":
            print(f"  retry: {content.get('level_name', content.get('reason'))}", file=sys.stderr)

    result = runner.run(record, emit=emit)
    if result.outcome != "done":
        error = result.error or {}
        raise BackendError(
            error.get("code", "internal"), error.get("message", result.outcome), error.get("hint")
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.glb_path, out)
    stats_line = result.mesh_stats or {}
    print(
        f"{out}  ({stats_line.get('vertices')} vertices, {stats_line.get('faces')} faces, "
        f"{result.seconds:.2f} s, job {record.id})"
    )
    if result.degraded_reason:
        print(result.degraded_reason)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from .store.jobs import JobStore

    store = JobStore(Path(args.output_dir or default_output_dir()))
    records, warnings = store.list(args.limit)
    if args.json:
        print(json.dumps({"jobs": [r.to_dict() for r in records], "warnings": warnings}, indent=2))
        return 0
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not records:
        print(f"no jobs in {store.jobs_dir}")
    for r in records:
        detail = (r.result or {}).get("glb_path") or (r.error or {}).get("message") or ""
        level = f"L{r.level}" if r.level is not None else "  "
        print(f"{r.id}  {r.state.value:9s} {r.kind:8s} {level:3s} {r.filename[:30]:30s} {detail}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel one job while no backend runs on the output folder: what a supervisor with no
    backend runs, so that it never edits the job store itself. It holds backend.lock while it
    writes, so it never races a backend (one that runs is refused: output_locked, exit 73)."""
    from .errors import ErrorCode
    from .store.jobs import JobStore
    from .store.ownerlock import BACKEND_LOCK, OutputLock

    output_dir = Path(args.output_dir or default_output_dir())
    store = JobStore(output_dir, locks=[OutputLock(output_dir, BACKEND_LOCK, "cancel")])
    try:
        store.claim()
        record = store.get(args.job_id)
        if not record.terminal:
            record = store.transition(record.id, "cancel")
            store.append_log(record.id, "cancelled while no backend was running")
        reply: dict[str, Any] = {"ok": True, "job_id": record.id, "state": record.state.value}
        code = 0
    except BackendError as exc:
        reply = {"ok": False, "error": exc.to_dict()}
        code = settings.EXIT_LOCKED if exc.code is ErrorCode.OUTPUT_LOCKED else 1
    finally:
        store.release()
    if args.json:
        print(json.dumps(reply))
    elif reply["ok"]:
        print(f"{reply['job_id']}  {reply['state']}")
    else:
        error = reply["error"]
        print(f"error: {error['message']}\nhint: {error['hint']}", file=sys.stderr)
    return code


def cmd_stats(args: argparse.Namespace) -> int:
    from .store.stats import aggregate, read_lines

    output_dir = Path(args.output_dir or default_output_dir())
    path = Path(args.file) if args.file else output_dir / "state" / "stats.jsonl"
    try:
        records, bad = read_lines(path)  # never through a link
    except OSError as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    summary = aggregate(records)
    summary["malformed_lines"] = bad
    summary["file"] = str(path)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.3f}"
        print(f"{key:22s} {value}")
    return 0


def cmd_jobhost(args: argparse.Namespace) -> int:
    """One of a backend's job processes (started by `serve --max-concurrent N`, not by hand):
    backend/server/jobhost.py."""
    faulthandler.enable()  # a crash in an engine leaves its stack in the backend's log
    from .server import jobhost

    return jobhost.run(args.slot, args.parent_pid)


def cmd_reader(args: argparse.Namespace) -> int:
    """A backend's reader process (started by `serve`, not by hand): backend/server/reader.py."""
    from .server import reader

    return reader.run(Path(args.output_dir), Path(args.state_dir), args.parent_pid)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import format_report, run_doctor

    report = run_doctor(
        weights_dir=args.weights_dir,
        dinov3_path=args.dinov3_path,
        rembg_path=args.rembg_path,
        trellis_checkout=args.trellis_checkout,
        output_dir=str(args.output_dir or default_output_dir()),
        engine=args.engine,
        for_blender=args.for_blender,
    )
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0 if report.get("ok") else 1


def cmd_supervise(args: argparse.Namespace) -> int:
    """Keep a backend alive for scripts and batch use, until SIGTERM or Ctrl-C."""
    from .supervision.backend_process import BackendSpec
    from .supervision.supervisor import (
        JOB_EVENTS,
        RespawnPolicy,
        Supervisor,
        SupervisorEvent,
        SupervisorState,
    )

    spec = BackendSpec(
        python=args.python or sys.executable,
        engine=args.engine,
        engine_options=_engine_options(args.engine_opt),
        output_dir=Path(args.output_dir) if args.output_dir else default_output_dir(),
        connection_file=Path(args.connection_file),
        log_dir=args.log_dir,
        min_free_disk_mb=args.min_free_disk_mb,
        env={"CUDA_VISIBLE_DEVICES": str(args.gpu)} if args.gpu is not None else {},
    )
    policy = RespawnPolicy(fresh_per_job=args.fresh_per_job, standby=args.standby)
    for name in ("heartbeat_timeout", "job_watchdog", "storm_limit", "storm_window"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(policy, name, value)
    supervisor = Supervisor(spec, policy)
    log = logging.getLogger("backend.supervision.supervisor")
    with _stop_signals((signal.SIGTERM,)) as stopping:
        try:
            supervisor.start()
            while not stopping:
                for event in supervisor.tick():
                    if isinstance(event, SupervisorEvent):
                        log.info("%s: %s", event.kind, event.reason)
                    elif event.msg_type in ("job_queued", "job_started", *JOB_EVENTS):
                        log.info("%s %s", event.msg_type, event.content.get("job_id"))
                if supervisor.state is SupervisorState.DEAD:
                    error = supervisor.last_error
                    print(f"error: {supervisor.state_reason}", file=sys.stderr)
                    if error is not None and error.hint:
                        print(error.hint, file=sys.stderr)
                    return settings.EXIT_START_FAILED
                time.sleep(0.05)
            log.info("%s received; stopping the backend", stopping[0])
            return settings.EXIT_OK
        except KeyboardInterrupt:
            return settings.EXIT_OK
        finally:
            supervisor.stop()


@contextlib.contextmanager
def _stop_signals(signals: tuple[int, ...], on_stop=None):
    """Within the block, each of `signals` is recorded (by name, in the list yielded) instead
    of killing the process, and `on_stop(name)` is called; the old handlers come back after."""
    received: list[str] = []

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        received.append(name)
        if on_stop is not None:
            on_stop(name)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def cmd_worker(args: argparse.Namespace) -> int:
    from .studio.worker import main as worker_main

    return worker_main(args)


def cmd_gateway(args: argparse.Namespace) -> int:
    from .wire import curvekeys

    if not getattr(args, "home", None):
        raise SystemExit("gateway needs --home FOLDER (its keys)")
    action = getattr(args, "action", None)
    if action == "add-user":
        address = args.connect
        if not address:
            info = curvekeys.read_gateway_info(args.home) or {}
            address = info.get("shell")
        if not address or "0.0.0.0" in address:
            raise SystemExit(
                "add-user needs the address artists connect to: --connect tcp://HOST:PORT"
            )
        print(curvekeys.add_user(args.home, args.name, address))
        return 0
    if action == "remove-user":
        curvekeys.remove_user(args.home, args.name)
        print(f"removed {args.name}; their open connections are refused from their next request")
        return 0
    if action == "list-users":
        for key, name in sorted(curvekeys.authorized_users(args.home).items(), key=lambda i: i[1]):
            print(f"{name}  {key}")
        return 0
    missing = [flag for flag in ("listen", "broker", "store") if not getattr(args, flag)]
    if missing:
        raise SystemExit(f"gateway needs --{', --'.join(missing)}")
    from .studio.gateway import main as gateway_main

    return gateway_main(args)


def _add_worker_parser(sub) -> None:
    from .studio.dispatch import Timing

    p = sub.add_parser("worker", help="studio server: a Celery worker that owns one GPU")
    p.add_argument("--broker", required=True, help="the Redis broker, redis://HOST:PORT/DB")
    p.add_argument("--store", required=True, help="the shared job store (the gateway's --store)")
    p.add_argument(
        "--work-dir", required=True, help="this worker's own folder (its backend's jobs, logs)"
    )
    p.add_argument("--gpu", type=int, metavar="N", help="the GPU this worker owns")
    p.add_argument(
        "--vram-gb", type=float, required=True, help="the card's memory in GB (sets its queues)"
    )
    p.add_argument("--name", help="unique worker name (default gpuN-HOSTNAME)")
    p.add_argument("--engine", default="preview", help="preview, trellis2, or pkg.module:Class")
    p.add_argument("--engine-opt", action="append", metavar="KEY=VALUE")
    p.add_argument("--python", help="interpreter for the backend (default this one)")
    p.add_argument("--min-free-disk-mb", type=float, help="the backend's free-disk threshold")
    p.add_argument("--heartbeat-timeout", type=float, help="the backend's (default 5 s)")
    for name in Timing.__dataclass_fields__:  # the distributed path's time limits
        flag = f"--{name.replace('_', '-')}"
        default = getattr(Timing, name)
        p.add_argument(flag, type=float, dest=name, help=f"seconds (default {default:g})")
    p.set_defaults(func=cmd_worker)


def _add_gateway_parser(sub) -> None:
    # --home before or after the action; SUPPRESS keeps an action from erasing it.
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument("--home", default=argparse.SUPPRESS, help="the gateway's keys folder")
    p = sub.add_parser(
        "gateway", parents=[home], help="studio server: the entry point for artists' Blenders"
    )
    p.add_argument("--listen", help="tcp://HOST:PORT for requests; events use PORT+1")
    p.add_argument("--broker", help="the Redis broker, redis://HOST:PORT/DB")
    p.add_argument("--store", help="the shared job store (workers use the same folder)")
    p.add_argument(
        "--queue-depth",
        type=int,
        default=settings.GATEWAY_QUEUE_DEPTH,
        help="waiting jobs before 'busy'",
    )
    p.add_argument("--min-free-disk-mb", type=float, default=settings.MIN_FREE_DISK_MB)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    q = actions.add_parser("add-user", parents=[home], help="authorize an artist; prints a string")
    q.add_argument("name")
    q.add_argument("--connect", help="tcp://HOST:PORT artists reach (default: the --listen)")
    q = actions.add_parser("remove-user", parents=[home], help="revoke an artist's key")
    q.add_argument("name")
    actions.add_parser("list-users", parents=[home], help="authorized artists and their keys")
    p.set_defaults(func=cmd_gateway)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m backend",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show tracebacks and debug logs"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser, engine: bool = True) -> None:
        p.add_argument(
            "--output-dir", help=f"job folders live here (default {default_output_dir()})"
        )
        if engine:
            p.add_argument(
                "--engine",
                default="preview",
                help="preview (CPU, no GPU), trellis2, or pkg.module:Class",
            )
            p.add_argument(
                "--engine-opt",
                action="append",
                metavar="KEY=VALUE",
                help="engine option, e.g. weights_dir=/models/TRELLIS.2-4B (repeatable)",
            )
            p.add_argument(
                "--gpu",
                type=int,
                metavar="N",
                help="run on GPU N only (sets CUDA_VISIBLE_DEVICES for the backend process)",
            )
            p.add_argument(
                "--min-free-disk-mb",
                type=float,
                default=settings.MIN_FREE_DISK_MB,
                help="refuse a job when less disk than this is free (default %(default)g)",
            )

    p = sub.add_parser("serve", help="run the backend server")
    p.add_argument(
        "--connection-file",
        required=True,
        help="where to write ports and the signing key (JSON, owner-only)",
    )
    common(p)
    p.add_argument("--state-dir", help="stats and memory profile (default OUTPUT_DIR/state)")
    p.add_argument(
        "--queue-depth",
        type=int,
        default=settings.QUEUE_DEPTH,
        help="jobs waiting before 'busy'",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=settings.MAX_CONCURRENT,
        help="jobs running at once, each in a process of its own when above 1 (GPU engines: one)",
    )
    p.add_argument("--parent-pid", type=int, help="exit when this process exits")
    p.add_argument("--vram-cap-gb", type=float, help="emulate a smaller GPU (testing)")
    p.add_argument(
        "--heartbeat",
        type=float,
        default=settings.HEARTBEAT_INTERVAL,
        help="heartbeat interval in seconds",
    )
    p.add_argument(
        "--standby",
        action="store_true",
        help="load the engine, then wait for an `activate` request (warm standby)",
    )
    p.add_argument(
        "--no-recover",
        action="store_true",
        help="do not rerun jobs that a previous backend left unfinished",
    )
    p.set_defaults(func=cmd_serve)

    # The backend's own reader process (not listed: `serve` starts it, see reader.py).
    p = sub.add_parser("reader")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--parent-pid", type=int)
    p.set_defaults(func=cmd_reader)

    # The backend's job processes (not listed: `serve --max-concurrent N` starts them).
    p = sub.add_parser("jobhost")
    p.add_argument("--slot", type=int, default=0)
    p.add_argument("--parent-pid", type=int)
    p.set_defaults(func=cmd_jobhost)

    p = sub.add_parser("generate", help="turn one image into a GLB, in this process")
    p.add_argument("image", help="input image (PNG with transparency works best)")
    p.add_argument("-o", "--output", required=True, help="where to write the GLB")
    common(p)
    p.add_argument("--preset", choices=["fast", "balanced", "high", "game-asset"])
    p.add_argument("--seed", type=int)
    p.add_argument("--resolution", type=int, choices=[512, 1024, 1536])
    p.add_argument("--texture-size", type=int, choices=[512, 1024, 2048, 4096])
    p.add_argument("--decimation-target", type=int, help="target face count")
    p.add_argument("--image-size", type=int, help="longest side of the conditioning image")
    p.add_argument("--no-remesh", action="store_true")
    p.add_argument("--params", help="more parameters as JSON, e.g. '{\"samplers\": {...}}'")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("jobs", help="list past jobs")
    common(p, engine=False)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser(
        "cancel", help="cancel a job while no backend runs (a running one takes `cancel` requests)"
    )
    common(p, engine=False)
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("stats", help="aggregate figures of past jobs")
    common(p, engine=False)
    p.add_argument("--file", help="a stats.jsonl file (default OUTPUT_DIR/state/stats.jsonl)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("doctor", help="check a TRELLIS.2 installation")
    common(p, engine=False)
    p.add_argument("--weights-dir")
    p.add_argument("--dinov3-path")
    p.add_argument("--rembg-path")
    p.add_argument("--trellis-checkout")
    p.add_argument(
        "--engine", help="the engine the backend runs: with preview, TRELLIS.2 items are optional"
    )
    p.add_argument(
        "--for-blender", action="store_true", help="hints name the add-on's preference fields"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("supervise", help="keep a backend alive (restarts it when it dies)")
    p.add_argument("--connection-file", required=True)
    common(p)
    p.add_argument("--python", default=sys.executable, help="interpreter for the backend")
    p.add_argument("--fresh-per-job", action="store_true", help="a new process for every job")
    p.add_argument("--standby", action="store_true", help="keep a warm standby backend")
    p.add_argument("--log-dir", help="backend logs (default OUTPUT_DIR/logs, rotated)")
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        help="seconds without a heartbeat before the backend is restarted (default 5)",
    )
    p.add_argument(
        "--job-watchdog",
        type=float,
        help="seconds a job may run before the backend is restarted (default 1800)",
    )
    p.add_argument(
        "--storm-limit",
        type=int,
        help="restarts within --storm-window that stop respawning (default 5)",
    )
    p.add_argument("--storm-window", type=float, help="seconds (default 120)")
    p.set_defaults(func=cmd_supervise)

    _add_worker_parser(sub)
    _add_gateway_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "gpu", None) is not None and args.command != "supervise":
        # Before anything imports torch: upstream TRELLIS.2 uses the default CUDA device in
        # many places, so a process sees only its one GPU (the supervisor passes it on).
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    try:
        return args.func(args)
    except BackendError as exc:
        if args.verbose:
            raise
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        return 0


if __name__ == "__main__":
    sys.exit(main())
