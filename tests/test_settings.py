"""One place for each setting: what the supervisor launches is what `serve` accepts, with the
defaults `settings.py` names; the copies that modules outside this change still keep agree."""

from __future__ import annotations

import os
from pathlib import Path

from backend import settings
from backend.__main__ import build_parser
from backend.pipeline import gpu
from backend.supervision import commands, lifecycle
from backend.supervision.backend_process import BackendSpec, backend_command, backend_environment


def test_the_supervisors_serve_command_is_what_serve_parses(tmp_path):
    spec = BackendSpec(
        output_dir=tmp_path / "out",
        connection_file=tmp_path / "c.json",
        engine="trellis2",
        engine_options={"weights_dir": "/w", "rembg_path": "/r=x"},
        state_dir=tmp_path / "state",
        min_free_disk_mb=12.5,
        queue_depth=3,
        extra_args=["--max-concurrent", "2"],
    )
    command = backend_command(spec, spec.standby_connection_file, "standby", 0.25)
    assert command[1:3] == ["-m", "backend"]
    args = build_parser().parse_args(command[3:])
    assert args.command == "serve" and args.standby is True
    assert Path(args.connection_file) == spec.standby_connection_file
    assert Path(args.output_dir) == spec.output_dir and Path(args.state_dir) == spec.state_dir
    assert args.engine == "trellis2" and args.engine_opt == ["weights_dir=/w", "rembg_path=/r=x"]
    assert args.heartbeat == 0.25 and args.queue_depth == 3 and args.min_free_disk_mb == 12.5
    assert args.max_concurrent == 2 and args.parent_pid == os.getpid()


def test_serve_defaults_are_the_settings():
    args = build_parser().parse_args(["serve", "--connection-file", "c.json"])
    assert args.queue_depth == settings.QUEUE_DEPTH
    assert args.min_free_disk_mb * 2**20 == settings.MIN_FREE_DISK
    assert args.heartbeat == settings.HEARTBEAT_INTERVAL
    assert args.max_concurrent == settings.MAX_CONCURRENT
    gateway = build_parser().parse_args(["gateway", "--listen", "tcp://127.0.0.1:5555"])
    assert gateway.queue_depth == settings.GATEWAY_QUEUE_DEPTH


def test_doctor_command_names_the_engine_folders():
    command = commands.doctor_command(
        "py", output_dir=Path("/o"), engine_options={"weights_dir": "/w", "other": "x"}
    )
    args = build_parser().parse_args(command[3:])
    assert args.command == "doctor" and args.json is True
    assert args.weights_dir == "/w" and Path(args.output_dir) == Path("/o")


def test_the_add_ons_doctor_command_is_what_doctor_parses():
    command = commands.doctor_command(
        "py",
        output_dir=Path("/o"),
        engine="preview",
        engine_options={"weights_dir": "/w", "trellis_checkout": "/c"},
        for_blender=True,
    )
    assert command[:3] == ["py", "-m", "backend"]
    args = build_parser().parse_args(command[3:])
    assert args.command == "doctor" and args.json is True and args.for_blender is True
    assert args.engine == "preview" and Path(args.output_dir) == Path("/o")
    assert args.weights_dir == "/w" and args.trellis_checkout == "/c"
    plain = build_parser().parse_args(commands.doctor_command("py")[3:])
    assert plain.for_blender is False and plain.engine is None and plain.output_dir is None


def test_a_backend_runs_this_copy_of_the_package(tmp_path):
    spec = BackendSpec(
        output_dir=tmp_path, connection_file=tmp_path / "c.json", extra_pythonpath=["/wheels"]
    )
    path = backend_environment(spec)["PYTHONPATH"].split(os.pathsep)
    assert path[:2] == [str(settings.EXTENSION_ROOT), str(Path("/wheels").resolve())]
    assert (settings.EXTENSION_ROOT / "backend" / "__main__.py").is_file()


def test_copies_kept_outside_settings_agree():
    """gpu.py keeps its own name for the poisoned exit code (it imports nothing of ours)."""
    assert gpu.POISONED_EXIT_CODE == settings.EXIT_POISONED
    assert lifecycle.classify_exit(settings.EXIT_POISONED)[0] is lifecycle.Cause.POISONED
