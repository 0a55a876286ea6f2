"""The protocol holds what docs/protocol.md promises, and the document names what the code
does: every error code, request, event and limit; refusals a client can match; `jobs` newest
first; one shape for requeued and cancelled jobs; signals stop `serve` cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from backend import settings
from backend.checks.images import ImageLimits
from backend.errors import ErrorCode
from backend.server import handlers
from backend.store import listing
from backend.wire import protocol
from backend.wire.client import Client

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
SLOW = "tests.cpu_engines:SlowEngine"


def _number_forms(value: int) -> set[str]:
    """How the document may write a number: 65536, 65,536, 64 MiB, 1 MiB."""
    forms = {str(value), f"{value:,}"}
    for unit, size in (("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)):
        if value >= size and value % size == 0:
            forms.add(f"{value // size} {unit}")
    return forms


# -- the document names what the code does ------------------------------------------------------


@pytest.mark.parametrize("code", [c.value for c in ErrorCode])
def test_every_error_code_is_documented(code):
    assert f"`{code}`" in DOC, f"docs/protocol.md does not name the error code {code}"


@pytest.mark.parametrize("request_type", sorted(protocol.REQUESTS))
def test_every_request_is_documented_and_routed(request_type):
    assert f"`{request_type}`" in DOC
    assert request_type in handlers.ROUTES  # a schema without a handler would be `internal`


def test_every_route_has_a_schema():
    assert set(handlers.ROUTES) == set(protocol.REQUESTS)


def test_only_requests_on_the_intake_lane_take_buffers():
    """The loop hands a message with large buffers to the intake lane unchecked, and answers
    it there: no request that runs elsewhere may carry buffers."""
    for msg_type, spec in protocol.REQUESTS.items():
        if spec["buffers"][1] > 0:
            assert handlers.ROUTES[msg_type].lane is handlers.Lane.INTAKE, msg_type


@pytest.mark.parametrize("event", protocol.EVENTS)
def test_every_event_is_documented(event):
    assert f"`{event}`" in DOC


LIMITS = {
    "image bytes": ImageLimits().max_bytes,
    "image pixels": ImageLimits().max_pixels,
    "image side": ImageLimits().max_side,
    "JSON frame": protocol.MAX_JSON_FRAME,
    "buffer frame": protocol.MAX_BUFFER_FRAME,
    "buffers": protocol.MAX_BUFFERS,
    "message age": int(protocol.MAX_MESSAGE_AGE),
    "replay window": protocol.REPLAY_WINDOW,
    "header field": protocol.MAX_HEADER_FIELD,
    "fetch chunk": protocol.FETCH_DEFAULT,
    "fetch reply": protocol.FETCH_MAX,
    "queue depth": settings.QUEUE_DEPTH,
    "jobs limit": listing.JOBS_LIMIT,
    "jobs offset": listing.JOBS_OFFSET,
    "query": listing.QUERY_CHARS,
    "idempotency key": handlers.MAX_KEY_CHARS,
    "delete days": handlers.DELETE_DAYS,
    "locked exit": settings.EXIT_LOCKED,
    "poisoned exit": settings.EXIT_POISONED,
}


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_every_limit_is_documented_with_its_value(name):
    forms = _number_forms(LIMITS[name])
    assert any(re.search(rf"(?<![\d,]){re.escape(f)}(?!\d|,\d)", DOC) for f in forms), (
        f"docs/protocol.md does not state the {name} limit ({LIMITS[name]})"
    )


def test_optional_fields_are_marked_optional_in_the_requests_table():
    """`name?` in the table exactly when the schema says the field is optional."""
    rows = {}
    for line in DOC.splitlines():
        match = re.match(r"\| `(\w+)` \|([^|]*)\|", line)
        if match and match.group(1) in protocol.REQUESTS:
            rows.setdefault(match.group(1), match.group(2))
    for request_type, spec in protocol.REQUESTS.items():
        cell = rows.get(request_type)
        assert cell is not None, f"{request_type} has no row in the requests table"
        for name, (_, required) in spec["fields"].items():
            written = re.search(rf"`?{name}(\?)?`?", cell)
            assert written, f"{request_type}: {name} is not in its row"
            assert (written.group(1) is None) == required, f"{request_type}.{name}"


# -- refusals a client can match --------------------------------------------------------------


def _dealer(s) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(s.info.shell_url)
    return sock


def test_an_error_reply_carries_the_refused_requests_header(make_server):
    s = make_server(SLOW)
    sock = _dealer(s)
    honest = protocol.Session(s.info.key)
    forger = protocol.Session(protocol.new_key())
    long_id = honest.msg("ping")
    long_id.header["msg_id"] = "b" * 201  # refused for its length, still matched by it
    try:
        cases = [
            (forger, forger.msg("ping"), "bad_signature"),
            (honest, honest.msg("no_such_request"), "unknown_request"),
            (honest, honest.msg("jobs", {"limit": "ten"}), "bad_message"),
            (honest, honest.msg("cancel", {"id": "20260101-000000-abcdef"}), "bad_message"),
            (honest, long_id, "bad_message"),
        ]
        for session, message, code in cases:
            sock.send_multipart(session.serialize(message))
            reply = honest.deserialize(sock.recv_multipart())
            assert reply.msg_type == "error_reply"
            assert reply.content["error"]["code"] == code
            assert reply.parent_id == message.msg_id, code
            assert reply.parent["msg_type"] == message.msg_type
    finally:
        sock.close()


def test_a_job_is_named_job_id_in_requests_and_records(make_server, image_png):
    s = make_server(SLOW, engine_options={"steps": "1", "step_seconds": "0.01"})
    job_id = s.client.generate(image_png)
    s.client.wait_for_job(job_id, timeout=20)
    record = s.client.job(job_id)["job"]
    assert record["job_id"] == job_id
    assert s.client.jobs()["jobs"][0]["job_id"] == job_id


# -- behaviour the document promises ----------------------------------------------------------


def test_jobs_with_a_limit_returns_the_newest(make_server, image_png):
    s = make_server(SLOW, engine_options={"steps": "1", "step_seconds": "0.001"})
    made = []
    for _ in range(6):
        made.append(s.client.generate(image_png))
        s.client.wait_for_job(made[-1], timeout=20)
    reply = s.client.request("jobs", {"limit": 3})
    assert [j["job_id"] for j in reply["jobs"]] == made[::-1][:3]
    assert reply["total"] == 6 and reply["next"] == made[3]


def test_paging_past_unreadable_job_folders_ends_with_next_null(make_server, image_png):
    """`total` counts folders and a page may list fewer than `limit`, down to none: a client
    that follows `next` until it is null sees every readable job once and stops."""
    s = make_server(SLOW, engine_options={"steps": "1", "step_seconds": "0.001"})
    job_id = s.client.generate(image_png)
    s.client.wait_for_job(job_id, timeout=20)
    out = s.config.output_dir
    for broken in ("29990101-000000-aaaaa1", "29990101-000000-aaaaa2"):  # newest first
        (out / "jobs" / broken).mkdir(parents=True)
        (out / "jobs" / broken / "job.json").write_text("{not json")
    listed, warned, before, pages = [], 0, None, 0
    while pages < 10:
        content = {"limit": 1} if before is None else {"limit": 1, "before": before}
        reply = s.client.request("jobs", content)
        listed += [j["job_id"] for j in reply["jobs"]]
        warned += len(reply["warnings"])
        pages += 1
        before = reply["next"]
        if before is None:
            break
    assert listed == [job_id] and warned == 2 and before is None
    assert s.client.request("jobs", {})["total"] == 3


def _events(client: Client, job_id: str, until: str, timeout: float = 20) -> list:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in client.poll(0.1):
            if message.content.get("job_id") == job_id:
                seen.append(message)
                if message.msg_type == until:
                    return seen
    raise AssertionError(f"no {until} for {job_id}: {[m.msg_type for m in seen]}")


def _subscribed(client: Client) -> None:
    """A heartbeat came through: the event socket is connected (PUB drops events before)."""
    deadline = time.monotonic() + 10
    while not any(m.msg_type == "heartbeat" for m in client.poll(0.1)):
        assert time.monotonic() < deadline


def test_a_requeued_job_is_announced_with_the_fields_of_its_first_queued_event(
    make_server, image_png
):
    s = make_server(SLOW, engine_options={"steps": "200", "step_seconds": "0.02"})
    _subscribed(s.client)
    job_id = s.client.generate(image_png, filename="robot.png")
    first = _events(s.client, job_id, "job_started")[0]
    assert first.msg_type == "job_queued"
    s.server.request_stop("test")  # the running job goes back to the queue
    again = [m for m in _events(s.client, job_id, "job_queued") if m.msg_type == "job_queued"]
    requeued = again[-1].content
    assert set(requeued) - {"reason"} == set(first.content)
    assert requeued["kind"] == "generate" and requeued["filename"] == "robot.png"
    assert requeued["position"] >= 1


def test_a_cancelled_job_has_one_record_shape_queued_or_running(make_server, image_png):
    s = make_server(SLOW, engine_options={"steps": "200", "step_seconds": "0.02"})
    running = s.client.generate(image_png)
    queued = s.client.generate(image_png)
    deadline = time.monotonic() + 10
    while s.client.status()["running"] != [running]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert s.client.cancel(queued)["state"] == "cancelled"
    assert s.client.cancel(running)["state"] == "cancelling"
    s.client.wait_for_job(running, timeout=20)
    records = [s.client.job(j)["job"] for j in (queued, running)]
    for record in records:
        assert record["state"] == "cancelled"
        assert record["error"]["code"] == "cancelled"
        assert record["finished"] is not None
    assert set(records[0]["error"]) == set(records[1]["error"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_signal_stops_serve_cleanly(tmp_path, image_png, sig):
    """The running job is requeued, the connection file removed, and the exit code is 0."""
    conn, out = tmp_path / "c.json", tmp_path / "out"
    command = [sys.executable, "-m", "backend", "serve", "--connection-file", str(conn)]
    command += ["--output-dir", str(out), "--engine", SLOW, "--min-free-disk-mb", "1"]
    command += ["--engine-opt", "steps=500", "--engine-opt", "step_seconds=0.02"]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not conn.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with Client(conn) as client:
            client.hello(timeout=10)
            job_id = client.generate(image_png)
            while client.status()["running"] != [job_id]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        proc.send_signal(sig)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert not conn.exists()
    record = json.loads((out / "jobs" / job_id / "job.json").read_text())
    assert record["state"] == "queued" and record["recoveries"] == 0
