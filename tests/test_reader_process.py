"""The reader process (backend/server/reader.py): `jobs`, `job` and `stats` are answered by a
process of the server's own, with the replies the in-process handlers give; the outcomes the
store holds only in memory still show; a reader that dies or hangs is replaced and its requests
answered in-process; no reader outlives its server."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from backend import safefs, settings
from backend.errors import BackendError, ErrorCode
from backend.procutil import pid_alive
from backend.server import handlers
from backend.store.jobs import JobStore
from backend.store.stats import aggregate
from backend.wire import protocol
from tests.conftest import png_bytes, wait_gone

SLOW = "tests.cpu_engines:SlowEngine"
FAST = {"steps": "1", "step_seconds": "0.001"}
WAIT = 30.0

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signals and /proc")


def reader_up(s, timeout: float = WAIT, other_than: int | None = None) -> dict:
    """`status.reader` once a reader (other than `other_than`) has said it is up."""
    deadline = time.monotonic() + timeout
    while True:
        figures = s.client.status()["reader"]
        if figures["pid"] is not None and figures["pid"] != other_than:
            return figures
        assert time.monotonic() < deadline, f"no reader came up: {figures}"
        time.sleep(0.02)


def finish(s, job_ids) -> None:
    deadline = time.monotonic() + WAIT
    for job_id in job_ids:
        while s.client.job(job_id)["job"]["state"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < deadline
            time.sleep(0.02)


def raw(s, msg_type: str, content: dict | None = None, timeout: float = 10.0) -> dict:
    """A reply's content as sent (ok or not)."""
    msg_id = s.client.send(msg_type, content or {})
    return s.client.wait_reply(msg_id, timeout, what=msg_type).content


def in_process(s, msg_type: str, content: dict | None = None) -> dict:
    """The same request answered by the in-process handler, as it would be encoded."""
    message = protocol.Message({"msg_type": msg_type}, {}, dict(content or {}))
    reply, _ = s.server._answer(handlers.ROUTES[msg_type], message)
    return json.loads(protocol.encode(reply))


def test_listings_records_and_stats_come_from_the_reader_with_the_same_replies(
    make_server, monkeypatch
):
    s = make_server(SLOW, engine_options=FAST)
    ids = [s.client.generate(png_bytes(), {"preset": "fast"}, f"n{i}.png") for i in range(7)]
    finish(s, ids)
    figures = reader_up(s)
    assert figures["pid"] != os.getpid() and pid_alive(figures["pid"])
    # Below the loop's priority: the CPU goes to the loop first.
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, figures["pid"]) == min(19, mine + settings.READER_NICE)

    # This process (the server's) opens no job.json while the reader answers.
    opened: list[str] = []
    real_read = JobStore._read
    monkeypatch.setattr(
        JobStore,
        "_read",
        lambda self, jobs, name: opened.append(name) or real_read(self, jobs, name),
    )
    requests = [
        ("jobs", {}),
        ("jobs", {"limit": 3}),
        ("jobs", {"limit": 2, "offset": 4}),
        ("jobs", {"query": "N3", "limit": 10}),
        ("jobs", {"limit": 3, "before": ids[4]}),
        ("jobs", {"limit": 3, "before": "20990101-000000-abcdef"}),
        ("jobs", {"limit": 0}),  # bad_params
        ("jobs", {"offset": -1}),
        ("jobs", {"query": "x" * 300}),
        ("job", {"job_id": ids[0]}),
        ("job", {"job_id": ids[1], "log": True}),
        ("job", {"job_id": "20990101-000000-abcdef"}),  # not_found
        ("job", {"job_id": "../../etc"}),
    ]
    replies = [raw(s, msg_type, content) for msg_type, content in requests]
    stats = raw(s, "stats")
    assert opened == []
    after = s.client.status()["reader"]
    assert after["pid"] == figures["pid"]
    assert after["answered"] - figures["answered"] == len(requests) + 1
    assert after["in_process"] == figures["in_process"]
    monkeypatch.setattr(JobStore, "_read", real_read)

    for (msg_type, content), reply in zip(requests, replies, strict=True):
        assert reply == in_process(s, msg_type, content), (msg_type, content)
    assert [r["ok"] for r in replies[6:9]] == [False] * 3
    assert {r["error"]["code"] for r in replies[6:9]} == {"bad_params"}
    assert replies[11]["error"]["code"] == replies[12]["error"]["code"] == "not_found"
    assert "done in" in replies[10]["log"]

    assert stats["ok"] is True
    assert stats["aggregate"] == aggregate(s.server.backend.stats.read())
    assert stats["aggregate"]["jobs"] == 7
    assert stats["requests"]["stats"] == 1 and stats["requests"]["jobs"] >= 9
    assert set(stats) == set(in_process(s, "stats"))

    # A job that ends later shows in the next `stats` (the tally reads what was appended).
    (more,) = [s.client.generate(png_bytes(), {"preset": "fast"}, "late.png")]
    finish(s, [more])
    assert raw(s, "stats")["aggregate"] == aggregate(s.server.backend.stats.read())
    assert raw(s, "stats")["aggregate"]["jobs"] == 8


def test_outcomes_kept_in_memory_show_through_the_reader(make_server, monkeypatch):
    """A job the store could not record (the disk is full) ends in memory only; `job` and
    `jobs` answered by the reader (which reads the disk) show it as the server knows it."""
    s = make_server(SLOW, engine_options={"steps": "400", "step_seconds": "0.05"})
    running = s.client.generate(png_bytes(), {"preset": "fast"}, "running.png")
    queued = s.client.generate(png_bytes(), {"preset": "fast"}, "queued.png")
    before = reader_up(s)

    def full(operation, path):
        if os.path.basename(str(path)).startswith((".job.json.", "job.json")):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(safefs, "fault", full)
    error = BackendError(ErrorCode.DISK_FULL, "disk full while writing the record")
    assert s.server.backend.store.settle(queued, error)
    assert s.server.backend.store.pending() == [queued]
    on_disk = json.loads((s.config.output_dir / "jobs" / queued / "job.json").read_text())
    assert on_disk["state"] == "queued"

    record = s.client.job(queued)["job"]
    assert record["state"] == "failed" and record["error"]["code"] == "disk_full"
    listed = {j["job_id"]: j for j in s.client.request("jobs", {"limit": 10})["jobs"]}
    assert listed[queued]["state"] == "failed" and listed[running]["state"] == "running"
    assert s.client.request("jobs", {"query": "failed"})["total"] == 1
    after = s.client.status()["reader"]
    assert after["answered"] - before["answered"] == 3 and after["in_process"] == 0

    monkeypatch.setattr(safefs, "fault", None)
    s.client.cancel(running)


def test_a_hung_or_killed_reader_is_replaced_and_its_requests_are_answered(make_server):
    s = make_server(SLOW, engine_options=FAST, reader_timeout=1.0)
    ids = [s.client.generate(png_bytes(), {"preset": "fast"}) for _ in range(3)]
    finish(s, ids)
    first = reader_up(s)["pid"]
    expected = raw(s, "jobs", {"limit": 2})

    # Hung: it stops answering. Its request is answered in-process after the timeout.
    os.kill(first, signal.SIGSTOP)
    began = time.monotonic()
    hung = s.client.request_async("jobs", {"limit": 2}, timeout=10)
    assert s.client.ping()["pong"]  # the loop is not waiting on it
    deadline = time.monotonic() + 10
    while not hung.done:
        s.client.poll(0.05)
        assert time.monotonic() < deadline
    assert hung.result() == expected
    assert 0.9 < time.monotonic() - began < 8
    assert wait_gone(first), "the hung reader was not killed"
    second = reader_up(s, other_than=first)
    assert second["restarts"] == 1 and second["in_process"] >= 1

    # Killed while it holds a request: answered in-process at once, a new reader started.
    os.kill(second["pid"], signal.SIGSTOP)
    lost = s.client.request_async("job", {"job_id": ids[0]}, timeout=10)
    s.client.poll(0.2)
    os.kill(second["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not lost.done:
        s.client.poll(0.05)
        assert time.monotonic() < deadline
    assert lost.result()["job"]["job_id"] == ids[0]
    third = reader_up(s, other_than=second["pid"])
    assert third["restarts"] == 2
    assert raw(s, "jobs", {"limit": 2}) == expected  # and the new one answers
    assert s.client.status()["reader"]["answered"] > third["answered"]


def test_a_reader_that_cannot_run_leaves_every_answer_in_process(make_server, monkeypatch):
    """A reader that exits at once (here: a command that does nothing) is started again after
    growing pauses; meanwhile every request is answered in-process."""
    from backend.supervision import commands

    monkeypatch.setattr(
        commands, "reader_command", lambda python, **_: [python, "-c", "import sys; sys.exit(3)"]
    )
    s = make_server(SLOW, engine_options=FAST)
    (job_id,) = [s.client.generate(png_bytes(), {"preset": "fast"})]
    finish(s, [job_id])
    began = time.monotonic()
    while time.monotonic() - began < 2.0:
        assert s.client.request("jobs", {"limit": 1})["jobs"][0]["job_id"] == job_id
        time.sleep(0.05)
    figures = s.client.status()["reader"]
    assert figures["pid"] is None and figures["answered"] == 0
    assert figures["in_process"] >= 20
    assert 1 <= figures["restarts"] <= 4  # 0.5 s, 1 s, 2 s ... apart, not a storm


def test_the_reader_ends_with_its_server(make_server, tmp_path):
    # A clean stop.
    s = make_server()
    pid = reader_up(s)["pid"]
    s.stop()
    assert wait_gone(pid, 5)

    # A server killed with SIGKILL: its reader sees its stdin close and exits.
    from backend.supervision import commands
    from backend.wire.client import Client

    conn = tmp_path / "killed" / "conn.json"
    server = subprocess.Popen(
        commands.serve_command(
            sys.executable,
            connection_file=conn,
            output_dir=tmp_path / "killed" / "out",
            min_free_disk_mb=1,
        ),
        env=commands.backend_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + WAIT
        while not conn.exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with Client(conn, subscribe=False) as client:
            client.hello(timeout=10)
            while (pid := client.status(timeout=10)["reader"]["pid"]) is None:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert pid_alive(pid) and pid != server.pid
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        assert wait_gone(pid, 10), "the reader outlived its server"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


def test_the_readers_channel_is_a_socket_only_this_user_can_reach(make_server):
    """A port on 127.0.0.1 lets any local user connect to the reader's one-peer channel
    first and keep the reader out; a Unix socket in a 0700 folder does not. The folder goes
    with the reader."""
    import stat as stat_module

    s = make_server()
    reader_up(s)
    url = s.server.reader.socket.getsockopt_string(zmq.LAST_ENDPOINT)
    assert url.startswith("ipc://")
    folder = os.path.dirname(url[len("ipc://") :])
    st = os.stat(folder)
    assert stat_module.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    s.stop()
    assert not os.path.exists(folder)


def test_a_stopped_reader_is_replaced_before_a_client_gives_up(make_server):
    """The reader's timeout is long (a big listing may take a while), but a reader that is
    not working on its requests is replaced within `READER_STALL`: the request is answered
    before a client's 5 s timeout."""
    s = make_server(SLOW, engine_options=FAST)
    assert s.config.reader_timeout == settings.READER_TIMEOUT > 5
    (job_id,) = [s.client.generate(png_bytes(), {"preset": "fast"})]
    finish(s, [job_id])
    first = reader_up(s)["pid"]
    os.kill(first, signal.SIGSTOP)
    try:
        began = time.monotonic()
        reply = s.client.request("jobs", {"limit": 1}, timeout=5.0)
        waited = time.monotonic() - began
    finally:
        if pid_alive(first):
            os.kill(first, signal.SIGKILL)
    assert reply["jobs"][0]["job_id"] == job_id
    assert settings.READER_STALL * 0.9 < waited < 5.0
    assert wait_gone(first)


def test_a_reader_busy_with_a_long_request_is_not_taken_for_a_hung_one(monkeypatch):
    """Hung means stopped, or no CPU used for READER_STALL while a request waits; a reader
    whose CPU time moves keeps its request until READER_TIMEOUT."""
    from backend.server import reader

    clock = {"cpu": 1.0, "stopped": False}
    monkeypatch.setattr(reader, "cpu_seconds", lambda pid: clock["cpu"])
    monkeypatch.setattr(reader, "is_stopped", lambda pid: clock["stopped"])
    process = reader.ReaderProcess(None, Path("out"), Path("state"), timeout=20.0, stall=2.5)
    process.proc = subprocess.Popen([sys.executable, "-c", ""])  # a pid to ask about
    process.proc.wait()
    waiting = reader.Forwarded(b"", None, sent=0.0)
    for step in range(60):  # 6 s of checks, the CPU time moving
        clock["cpu"] += 0.01
        assert not process._stalled(step / 10, waiting)
    assert not process._stalled(6.0, waiting)  # unchanged since the last look: not yet
    assert process._stalled(8.6, waiting)  # no CPU for 2.6 s
    process._cpu_mark = None
    clock["stopped"] = True
    assert not process._stalled(1.0, waiting)  # stopped, but the request is young
    assert process._stalled(2.6, waiting)


def test_channel_folders_of_backends_that_are_gone_are_swept(make_server, tmp_path):
    """A backend and its reader killed together leave their channel's folder: the next
    reader to start removes those of this user's backends that are gone, no other."""
    import tempfile

    parent = Path(tempfile.gettempdir())
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    gone = parent / f"trellis2-reader-{dead.pid}-abc123"
    alive = parent / f"trellis2-reader-{os.getpid()}-abc123"
    unrelated = parent / "trellis2-reader-notapid"
    for folder in (gone, alive, unrelated):
        folder.mkdir(mode=0o700)
    (gone / "channel").write_bytes(b"")
    try:
        s = make_server()
        reader_up(s)
        assert not gone.exists()
        assert alive.exists() and unrelated.exists()
    finally:
        for folder in (gone, alive, unrelated):
            if folder.exists():
                shutil.rmtree(folder)
