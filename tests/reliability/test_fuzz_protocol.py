"""Protocol fuzzing and security: malformed, truncated, oversized and wrong-typed messages,
unsigned, forged and replayed ones, loopback-only sockets, the connection file's mode, and path
traversal. Every message must get its typed error (or be dropped and counted); none may stop
the backend."""

from __future__ import annotations

import os
import random
import stat
import time
from collections import Counter
from pathlib import Path

import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.errors import ErrorCode
from backend.wire import protocol
from tests.conftest import png_bytes
from tests.reliability import fuzzgen
from tests.reliability.support import (
    FULL,
    WAIT,
    listening_sockets,
    record,
    scale,
    tree_snapshot,
)

CODES = {c.value for c in ErrorCode} | {fuzzgen.OK}


class Wire:
    """A raw DEALER on a backend's shell socket, reading signed replies."""

    def __init__(self, info: protocol.ConnectionInfo):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(info.shell_url)
        self.reader = protocol.Session(info.key)
        self.forge = fuzzgen.Forge(info.key)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 5.0) -> dict | None:
        """The next reply's content, or None when nothing came within `timeout`."""
        message = self.recv_message(timeout)
        return None if message is None else message.content

    def recv_message(self, timeout: float = 5.0) -> protocol.Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        message = self.reader.deserialize(self.sock.recv_multipart(), check_replay=False)
        assert message.msg_type.endswith("_reply"), message.msg_type
        return message

    def close(self) -> None:
        self.sock.close(0)


def match_replies(batch: list[fuzzgen.Probe], replies: list[protocol.Message]) -> list:
    """Each probe's reply content (None when none came). Replies can overtake each other (a
    request answered off the loop comes later), so they are matched by `parent_header`, as
    clients do; a refusal whose request header was unreadable has `{}` and takes the first
    such probe. Two probes with one msg_id (a replay) each take a reply their codes allow."""
    keys = [protocol.readable_header(p.frames).get("msg_id") for p in batch]
    matched: list = [None] * len(batch)
    for reply in replies:
        key = reply.parent.get("msg_id")
        code = fuzzgen.reply_code(reply.content)
        free = [i for i, k in enumerate(keys) if k == key and matched[i] is None]
        if not free:
            free = [i for i, m in enumerate(matched) if m is None]
        fits = [i for i in free if code in batch[i].expect]
        if free:
            matched[(fits or free)[0]] = reply.content
    return matched


def _stats(client) -> dict:
    stats = client.stats(timeout=WAIT)
    return {"requests": stats["requests"], "rejected": stats["rejected"]}


def _delta(after: dict, before: dict) -> Counter:
    return Counter({k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)})


class Tally:
    """What was sent and what came back, by mutation and by reply code."""

    def __init__(self) -> None:
        self.sent = 0
        self.by_mutation: Counter[str] = Counter()
        self.by_code: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def check(self, probe: fuzzgen.Probe, content: dict | None) -> None:
        code = "no reply" if content is None else fuzzgen.reply_code(content)
        self.by_code[code] += 1
        if code not in probe.expect:
            self.unexpected.append(f"{probe.mutation}: got {code}, expected {sorted(probe.expect)}")

    @property
    def protocol_rejections(self) -> Counter:
        return Counter({c: n for c, n in self.by_code.items() if c in fuzzgen.PROTOCOL_CODES})

    @property
    def handled(self) -> int:
        return sum(n for c, n in self.by_code.items() if c not in fuzzgen.PROTOCOL_CODES)


def test_hypothesis_fuzz_against_a_live_server(make_server):
    """Hypothesis drives every mutation against an in-thread server; a failure shrinks to the
    smallest message that breaks it."""
    s = make_server("preview")
    wire = Wire(s.info)
    before = _stats(s.client)
    tally = Tally()

    @settings(
        max_examples=scale(400, 4000),
        deadline=None,
        database=None,
        derandomize=not FULL,  # CI runs the same examples every time
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def fuzz(data):
        for probe in fuzzgen.draw_case(fuzzgen.HypothesisSource(data), wire.forge):
            wire.send(probe.frames)
            content = wire.recv()
            tally.sent += 1
            tally.by_mutation[probe.mutation] += 1
            tally.check(probe, content)
            assert content is not None, f"no reply to {probe.mutation}"
            code = fuzzgen.reply_code(content)
            assert code in probe.expect, (probe.mutation, content)
            assert code == fuzzgen.OK or content["error"]["hint"]

    try:
        fuzz()
        assert s.client.ping(timeout=WAIT)["pong"] is True
        assert s.thread.is_alive() and s.exit_code is None
        after = _stats(s.client)
    finally:
        wire.close()
    assert _delta(after["rejected"], before["rejected"]) == tally.protocol_rejections
    handled = sum(_delta(after["requests"], before["requests"]).values()) - 2  # ping, stats
    assert handled == tally.handled
    record(
        "fuzz_hypothesis",
        {
            "messages": tally.sent,
            "by_mutation": dict(tally.by_mutation),
            "by_code": dict(tally.by_code),
            "unexpected": len(tally.unexpected),
            "crashes": 0,
        },
    )


def test_random_fuzz_against_a_backend_process(backend_proc):
    """The big count: a seeded generator over the same mutations, fired in batches at a real
    `python -m backend serve` process. It must answer every message, keep running, count what
    it refused and still exit 0 when asked to stop."""
    total = scale(5_000, 100_000)
    b = backend_proc("preview")
    wire = Wire(b.info)
    rng = random.Random(20_240_607)
    src = fuzzgen.RandomSource(rng)
    tally = Tally()
    before = _stats(b.client)
    began = time.monotonic()
    try:
        while tally.sent < total:
            batch: list[fuzzgen.Probe] = []
            while len(batch) < 64:
                batch.extend(fuzzgen.draw_case(src, wire.forge))
            for probe in batch:
                wire.send(probe.frames)
            replies = []
            while len(replies) < len(batch):
                reply = wire.recv_message()
                if reply is None:
                    break
                replies.append(reply)
            for probe, content in zip(batch, match_replies(batch, replies), strict=True):
                tally.sent += 1
                tally.by_mutation[probe.mutation] += 1
                tally.check(probe, content)
            assert b.alive(), f"the backend died after {tally.sent} messages:\n{b.log()}"
            assert not tally.unexpected, tally.unexpected[:10]
        seconds = time.monotonic() - began
        assert b.client.ping(timeout=WAIT)["pong"] is True
        after = _stats(b.client)
    finally:
        wire.close()
    assert _delta(after["rejected"], before["rejected"]) == tally.protocol_rejections
    handled = sum(_delta(after["requests"], before["requests"]).values()) - 2  # ping, stats
    assert handled == tally.handled
    assert b.client.jobs(limit=10_000)["jobs"] == []  # no hostile message created a job
    pid = b.pid
    assert b.stop() == 0, b.log()
    record(
        "fuzz_random",
        {
            "messages": tally.sent,
            "by_mutation": dict(tally.by_mutation),
            "by_code": dict(tally.by_code),
            "unexpected": len(tally.unexpected),
            "seconds": round(seconds, 2),
            "per_second": round(tally.sent / seconds),
            "crashes": 0,
            "exit_code": 0,
            "pid": pid,
            "server_rejected": dict(_delta(after["rejected"], before["rejected"])),
        },
    )


def test_unsigned_forged_and_replayed_messages_are_all_rejected(backend_proc):
    """Every message without this backend's key, or seen before, is refused: 100 %."""
    n = scale(100, 2_000)
    b = backend_proc("preview")
    wire = Wire(b.info)
    other = Wire(b.info)  # a second connection: a replay from elsewhere is still a replay
    forger = protocol.Session(protocol.new_key())
    honest = protocol.Session(b.info.key)
    counts: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    image = png_bytes((64, 64))

    def expect(kind: str, frames: list[bytes], code: str, sock: Wire = wire) -> None:
        sock.send(frames)
        content = sock.recv()
        got = "no reply" if content is None else fuzzgen.reply_code(content)
        counts[kind] += 1
        outcomes[f"{kind}:{got}"] += 1
        assert got == code, (kind, content)

    try:
        # One real job, so a replayed `generate` would be visible as a second job.
        legit = honest.serialize(
            honest.msg("generate", {"params": {"preset": "fast"}}, None, [image])
        )
        expect("legit_generate", legit, fuzzgen.OK)
        for i in range(n):
            msg_type = ("shutdown", "generate", "cancel", "jobs", "ping")[i % 5]
            buffers = [image] if msg_type == "generate" else []
            content = {"job_id": "x"} if msg_type == "cancel" else {}
            forged = forger.serialize(forger.msg(msg_type, content, None, buffers))
            expect("forged", forged, "bad_signature")
            unsigned = honest.serialize(honest.msg(msg_type, content, None, buffers))
            unsigned[1] = (b"", b"0" * 64, b"deadbeef")[i % 3]
            expect("unsigned", unsigned, "bad_signature")
            expect("replayed", list(legit), "replayed", sock=(wire, other)[i % 2])
            fresh = honest.serialize(honest.msg("ping"))
            expect("fresh", fresh, fuzzgen.OK)
            expect("replayed", fresh, "replayed", sock=(wire, other)[i % 2])
        assert b.client.ping(timeout=WAIT)["pong"] is True
        jobs = b.client.jobs()["jobs"]
    finally:
        wire.close()
        other.close()
    assert len(jobs) == 1  # the replayed generate never made a second job
    assert b.alive() and b.stop() == 0
    hostile = ("forged", "unsigned", "replayed")
    attempts = sum(counts[k] for k in hostile)
    rejected = sum(
        n for key, n in outcomes.items() if key.split(":")[0] in hostile and not key.endswith(":ok")
    )
    record(
        "auth",
        {
            **{kind: counts[kind] for kind in hostile},
            "attempts": attempts,
            "rejected": rejected,
            "rejected_percent": round(100.0 * rejected / attempts, 2),
            "jobs_created_by_replays": len(jobs) - 1,
        },
    )


def test_oversized_frames_are_refused_or_dropped_and_the_backend_stays_up(backend_proc):
    """Near and over the limits: a 96 MiB + 1 buffer (too_large), a frame over the socket's
    MAXMSGSIZE (dropped by ZeroMQ), an image over the decoder's byte limit, a 1 MiB + 1 header."""
    b = backend_proc("preview")
    wire = Wire(b.info)
    forge = wire.forge
    outcomes = {}
    try:
        big = bytes(protocol.MAX_BUFFER_FRAME + 1)
        wire.send(forge.frames("generate", {}, [big]))
        outcomes["buffer_96MiB_plus_1"] = fuzzgen.reply_code(wire.recv(WAIT))
        wire.send(forge.frames("generate", {}, [bytes(64 * 2**20 + 1)]))
        outcomes["image_64MiB_plus_1"] = fuzzgen.reply_code(wire.recv(WAIT))
        wire.send(forge.frames("ping", raw={0: b" " * (protocol.MAX_JSON_FRAME + 1)}))
        outcomes["header_1MiB_plus_1"] = fuzzgen.reply_code(wire.recv(WAIT))
        del big
        # Over MAXMSGSIZE: ZeroMQ drops the frame and the connection; nothing reaches Python.
        huge = bytes(protocol.MAX_BUFFER_FRAME + (1 << 20) + 1)
        wire.send([protocol.DELIMITER, b"", b"{}", b"{}", b"{}", huge])
        del huge
        outcomes["frame_over_maxmsgsize"] = "dropped" if wire.recv(3.0) is None else "answered"
    finally:
        wire.close()
    assert outcomes == {
        "buffer_96MiB_plus_1": "too_large",
        "image_64MiB_plus_1": "image_too_large",
        "header_1MiB_plus_1": "too_large",
        "frame_over_maxmsgsize": "dropped",
    }
    assert b.client.ping(timeout=WAIT)["pong"] is True and b.alive()
    assert b.client.jobs()["jobs"] == []
    assert b.stop() == 0
    record("oversized", {"outcomes": outcomes})


def test_sockets_are_loopback_only_and_the_connection_file_is_private(backend_proc):
    b = backend_proc("preview")
    conn = b.conn
    mode = stat.S_IMODE(conn.stat().st_mode)
    info = protocol.read_connection_file(conn)
    listening = listening_sockets(b.pid)
    cmdline = Path(f"/proc/{b.pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{b.pid}/environ").read_bytes()
    assert mode == 0o600, oct(mode)
    assert info.ip == "127.0.0.1" and info.transport == "tcp"
    assert {port for _, port in listening} >= {info.shell_port, info.iopub_port}
    assert {addr for addr, _ in listening} == {"127.0.0.1"}, listening  # never 0.0.0.0 or ::
    assert info.key.encode() not in cmdline and info.key.encode() not in environ
    leftovers = [p.name for p in conn.parent.iterdir() if p.name != conn.name]
    assert leftovers == []  # no temp file with the key left next to it
    assert b.stop() == 0
    assert not conn.exists()  # removed at exit: a stale key is not left on disk
    record(
        "loopback",
        {
            "connection_file_mode": oct(mode),
            "listening": sorted(f"{a}:{p}" for a, p in listening),
            "key_on_command_line": False,
            "key_in_environment": False,
        },
    )


def test_no_request_reads_or_writes_outside_the_output_directory(backend_proc, tmp_path):
    """Path traversal through every field that names a job or a file: typed errors, nothing
    created or read outside the output directory, and inside it only job folders and state."""
    secret = tmp_path / "secret"
    secret.mkdir()
    marker = "TOP-SECRET-7f3a"
    (secret / "passwd").write_text(marker)
    b = backend_proc("preview")
    out = b.output_dir
    done = b.client.generate(png_bytes((64, 64)), {"preset": "fast"}, filename="ok.png")
    assert b.client.wait_for_job(done, WAIT)["event"] == "job_done"
    outside_before = tree_snapshot(tmp_path, skip=(out, b.log_path))
    inside_before = set(tree_snapshot(out))
    wire = Wire(b.info)
    forge = wire.forge
    names = [
        *fuzzgen.TRAVERSAL,
        str(secret / "passwd"),
        str(out / "jobs" / done),
        f"{done}/../../../secret",
        f"../{done}",
        f"{done}/",
        f"{done}\\..\\..",
    ]
    codes: Counter[str] = Counter()
    replies = []
    try:
        for name in names:
            for msg_type, content in (
                ("job", {"job_id": name}),
                ("cancel", {"job_id": name}),
                ("reexport", {"job_id": name, "params": {"texture_size": 512}}),
                ("texture", {"mesh_format": name, "filename": name}),
            ):
                buffers = (
                    [png_bytes((64, 64)), b"glTF" + bytes(64)] if msg_type == "texture" else []
                )
                wire.send(forge.frames(msg_type, content, buffers))
                reply = wire.recv()
                code = fuzzgen.reply_code(reply)
                codes[f"{msg_type}:{code}"] += 1
                replies.append(reply)
                assert code in ("not_found", "bad_mesh_input"), (msg_type, name, reply)
        # A filename full of directories is stored as a plain name; the file stays in its job.
        renamed = []
        for name in names[:6]:
            wire.send(
                forge.frames(
                    "generate",
                    {"filename": name, "params": {"preset": "fast"}},
                    [png_bytes((64, 64))],
                )
            )
            reply = wire.recv()
            assert reply["ok"], reply
            renamed.append(reply["job_id"])
        for job_id in renamed:
            b.client.wait_for_job(job_id, WAIT)
            stored = b.client.job(job_id)["job"]["filename"]
            assert "/" not in stored and "\\" not in stored, stored
    finally:
        wire.close()
    assert b.client.ping()["pong"] is True
    assert marker not in repr(replies)
    assert tree_snapshot(tmp_path, skip=(out, b.log_path)) == outside_before
    created = set(tree_snapshot(out)) - inside_before
    allowed = {os.path.join("jobs", j) for j in renamed}
    strays = [
        p
        for p in created
        if not (p.startswith("state") or any(p == a or p.startswith(a + os.sep) for a in allowed))
    ]
    assert strays == []
    assert b.stop() == 0
    record(
        "traversal",
        {
            "names_tried": len(names),
            "requests": sum(codes.values()) + len(renamed),
            "codes": dict(codes),
            "files_outside_output_dir_changed": 0,
            "secret_leaked": False,
        },
    )
