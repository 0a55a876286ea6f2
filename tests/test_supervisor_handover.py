"""The supervisor and the add-on never read or write job folders (issue #15): what the
supervisor knows of a dead backend goes to the next backend (`backendlogs.Predecessor`), and a
cancel with no backend runs the backend's own `cancel` command."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend import settings
from backend.__main__ import build_parser
from backend.backendlogs import Predecessor, fallback_log_dir
from backend.store.jobs import JobStore
from backend.supervision import commands
from backend.supervision.backend_process import BackendSpec, backend_environment
from tests.conftest import ROOT, png_bytes

FORBIDDEN_MODULES = ("backend.store.jobs", "backend.store.stats")
FORBIDDEN_NAMES = {"JobStore", "StatsLog"}
GUARDED = ("backend/supervision", "blender_addon")


def _imported(path: Path, tree: ast.AST) -> list[str]:
    """Every module (and `from` name) a file imports, relative imports made absolute."""
    package = list(path.relative_to(ROOT).parent.parts)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_no_module_of_the_supervision_or_the_add_on_touches_the_job_store():
    """No import of the job store or the stats log, and no JobStore/StatsLog named (made)."""
    found = []
    files = [f for folder in GUARDED for f in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 10
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for name in _imported(path, tree):
            if name.startswith(FORBIDDEN_MODULES):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
        for node in ast.walk(tree):
            named = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
            if isinstance(node, (ast.Name, ast.Attribute)) and named in FORBIDDEN_NAMES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} names {named}")
    assert found == []


def test_the_check_sees_what_it_forbids(tmp_path):
    """The AST check above, fed a module that does what it must not."""
    bad = ROOT / "blender_addon" / "_probe_for_the_check.py"
    source = "from ..backend.store.jobs import JobStore\nJobStore('x')\n"
    tree = ast.parse(source)
    assert "backend.store.jobs" in _imported(bad, tree)
    sup = ROOT / "backend" / "supervision" / "_probe.py"
    assert "backend.store.stats" in _imported(sup, ast.parse("from ..store import stats\n"))
    assert "backend.store.jobs" in _imported(sup, ast.parse("from ..store.jobs import X\n"))


def test_the_supervisor_loads_no_job_store_module():
    code = (
        "import sys, backend.supervision.supervisor, backend.wire.client\n"
        "print(sorted(m for m in sys.modules if m.startswith('backend.store')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.replace("'", '"')) == ["backend.store", "backend.store.ownerlock"]


# -- the note -------------------------------------------------------------------------------


def test_the_note_goes_only_to_the_backend_spawned_with_it(tmp_path, monkeypatch):
    spec = BackendSpec(output_dir=tmp_path, connection_file=tmp_path / "c.json")
    monkeypatch.setenv(settings.ENV_PREDECESSOR, '{"pid": 1, "why": "stale", "log_path": null}')
    assert settings.ENV_PREDECESSOR not in backend_environment(spec)  # never inherited
    note = Predecessor.make(4242, "killed", tmp_path / "logs" / "backend-x.log")
    env = backend_environment(spec, note)
    assert Predecessor.from_env(env) == Predecessor.make(4242, "killed", None)  # not a log name
    log = tmp_path / "logs" / "backend-20260101-000000-000000-4242.log"
    env = backend_environment(spec, Predecessor.make(4242, "killed", log))
    assert Predecessor.from_env(env) == Predecessor(4242, "killed", log)
    assert settings.ENV_PREDECESSOR not in commands.backend_environment()


@pytest.mark.parametrize(
    "data",
    [
        None,
        "",
        "{",
        "[]",
        json.dumps({"pid": True, "why": "x", "log_path": None}),
        json.dumps({"pid": 0, "why": "x", "log_path": None}),
        json.dumps({"pid": 2**40, "why": "x", "log_path": None}),
        json.dumps({"pid": 7, "why": None, "log_path": None}),
        json.dumps({"pid": 7, "why": "x", "log_path": 3}),
        json.dumps({"pid": 7, "why": "x" * 5000, "log_path": None}),  # too long a note
    ],
)
def test_a_note_that_is_not_sound_is_no_note(data):
    assert Predecessor.from_json(data) is None


def test_a_note_is_cut_to_one_line_and_reads_only_backend_logs(tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    name = "backend-20260101-000000-000000-4242.log"
    (out / "logs" / name).write_text("a\nb\n")
    note = Predecessor.from_json(
        json.dumps(
            {"pid": 7, "why": "x\n\x1b[2Jy" + "z" * 999, "log_path": str(out / "logs" / name)}
        )
    )
    assert note is not None and note.why.startswith("x [2Jy") and len(note.why) == 300
    assert note.tail(out) == "a\nb"
    assert note.tail(tmp_path / "another-output") == ""  # not where its logs would be
    relative = Predecessor.from_json(json.dumps({"pid": 7, "why": "x", "log_path": name}))
    assert relative is not None and relative.log_path is None
    for bad in ("../../etc/passwd", "/etc/passwd", f"/x/{name}\x00"):
        note = Predecessor.from_json(json.dumps({"pid": 7, "why": "x", "log_path": bad}))
        assert note is not None and note.log_path is None
    assert fallback_log_dir().name.startswith("trellis2-logs-")  # the other place logs go
    link_dir = out / "logs"
    (link_dir / "backend-20260101-000000-000000-1.log").symlink_to(out / "logs" / name)
    assert Predecessor(7, "x", link_dir / "backend-20260101-000000-000000-1.log").tail(out) == ""


# -- cancel with no backend -----------------------------------------------------------------


def _cancel(out: Path, job_id: str) -> tuple[int, dict]:
    command = commands.cancel_command(sys.executable, output_dir=out, job_id=job_id)
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=commands.backend_environment(),
        cwd=settings.EXTENSION_ROOT,
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout.splitlines()[-1])


def test_the_cancel_command_is_what_the_cli_parses():
    command = commands.cancel_command("py", output_dir=Path("/o"), job_id="-x")
    args = build_parser().parse_args(command[3:])
    assert args.command == "cancel" and args.json is True
    assert Path(args.output_dir) == Path("/o") and args.job_id == "-x"  # never an option


def test_the_cancel_command_cancels_with_no_backend_and_never_beside_one(tmp_path, make_server):
    out = tmp_path / "out"
    store = JobStore(out)
    queued, running, done = (
        store.create("generate", "preview", {}, image=png_bytes()).id for _ in range(3)
    )
    store.transition(running, "start")
    store.transition(done, "start")
    store.transition(done, "finish", result={})
    for job_id in (queued, running):
        code, reply = _cancel(out, job_id)
        assert code == 0 and reply == {"ok": True, "job_id": job_id, "state": "cancelled"}
        assert store.get(job_id).state.value == "cancelled"
        assert "cancelled while no backend was running" in store.log_excerpt(job_id)
    assert _cancel(out, done) == (0, {"ok": True, "job_id": done, "state": "done"})
    code, reply = _cancel(out, "20260101-000000-abcdef")
    assert code == 1 and reply["error"]["code"] == "not_found"

    again = store.create("generate", "preview", {}, image=png_bytes()).id
    s = make_server("tests.cpu_engines:SlowEngine", output_dir=out, standby=True)
    code, reply = _cancel(out, again)  # a standby holds nothing: the command may go on
    assert code == 0 and reply["state"] == "cancelled"
    other = store.create("generate", "preview", {}, image=png_bytes()).id
    s.client.request("activate")  # now it runs this folder's jobs: its backend.lock
    code, reply = _cancel(out, other)
    assert code == settings.EXIT_LOCKED and reply["error"]["code"] == "output_locked"
    assert reply["error"]["owner"]["pid"] == os.getpid()
    assert store.get(other).state.value != "cancelled"
