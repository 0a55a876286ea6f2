"""The server through a real ZeroMQ client: jobs end to end, control while busy, queue limits,
cancel, bad input, forged messages, stop and recovery."""

from __future__ import annotations

import json
import time

import pytest
import zmq

from backend.errors import BackendError, ErrorCode
from backend.wire import protocol
from tests.conftest import png_bytes

SLOW = "tests.cpu_engines:SlowEngine"


def collect_until(
    client, job_id, terminal=("job_done", "job_failed", "job_cancelled"), timeout=20.0
):
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in client.poll(0.2):
            if m.content.get("job_id") == job_id:
                events.append(m)
                if m.msg_type in terminal:
                    return events
    raise AssertionError(f"no terminal event for {job_id}; got {[e.msg_type for e in events]}")


def test_generate_end_to_end_emits_events_and_writes_a_valid_glb(make_server, image_png):
    from backend.checks.glbcheck import validate_glb_file

    s = make_server(SLOW, engine_options={"steps": "3", "step_seconds": "0.01"})
    job_id = s.client.generate(image_png, {"preset": "fast", "seed": 5}, filename="disc.png")
    events = collect_until(s.client, job_id)
    types = [e.msg_type for e in events]
    assert types[-1] == "job_done", events[-1].content
    assert "job_started" in types and "job_progress" in types
    progress = [e.content for e in events if e.msg_type == "job_progress"]
    assert progress[-1]["fraction"] <= 1.0
    assert [p["fraction"] for p in progress] == sorted(p["fraction"] for p in progress)
    done = events[-1].content
    report = validate_glb_file(done["glb_path"])
    assert report["triangles"] > 0
    assert done["oom_quality_degradation_level"] == 0 and done["degraded"] is False
    record = s.client.job(job_id)
    assert record["job"]["state"] == "done"
    assert {
        "input.png",
        "request.json",
        "result.glb",
        "stats.json",
        "thumbnail.png",
        "log.txt",
        "job.json",
    } <= set(record["files"])
    assert record["job"]["params"]["seed"] == 5 and record["job"]["filename"] == "disc.png"
    assert record["log"] is None  # state polls stay small; the log comes on request
    assert "done in" in s.client.request("job", {"job_id": job_id, "log": True})["log"]


def test_control_requests_are_answered_while_a_job_runs(make_server, image_png):
    s = make_server(SLOW, engine_options={"steps": "40", "step_seconds": "0.05"})
    job_id = s.client.generate(image_png)
    deadline = time.monotonic() + 10
    while (s.client.status()["current"] or {}).get("job_id") != job_id:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for request in ("ping", "status", "jobs", "stats", "hello"):
        reply = s.client.request(request, timeout=2.0)
        assert reply["ok"] is True
    status = s.client.status(timeout=2.0)
    assert status["state"] == "busy" and status["current"]["job_id"] == job_id
    assert s.client.job(job_id, timeout=2.0)["job"]["state"] == "running"
    s.client.cancel(job_id)
    assert collect_until(s.client, job_id)[-1].msg_type == "job_cancelled"


def test_full_queue_answers_busy_and_loses_nothing(make_server, image_png):
    s = make_server(SLOW, queue_depth=2, engine_options={"steps": "20", "step_seconds": "0.05"})
    accepted = [s.client.generate(image_png)]
    deadline = time.monotonic() + 10
    while not s.client.status()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    accepted += [s.client.generate(image_png), s.client.generate(image_png)]
    with pytest.raises(BackendError) as err:
        s.client.generate(image_png)
    assert err.value.code is ErrorCode.BUSY and err.value.retryable
    assert len(s.client.jobs()["jobs"]) == 3  # the refused one left no folder behind
    for job_id in accepted:
        s.client.cancel(job_id)


def test_cancel_of_a_queued_job_and_of_a_running_job(make_server, image_png):
    s = make_server(SLOW, engine_options={"steps": "100", "step_seconds": "0.02"})
    running = s.client.generate(image_png)
    queued = s.client.generate(image_png)
    assert s.client.cancel(queued)["state"] == "cancelled"
    assert s.client.job(queued)["job"]["state"] == "cancelled"
    deadline = time.monotonic() + 10
    while s.client.status()["running"] != [running]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert s.client.cancel(running)["state"] == "cancelling"
    assert collect_until(s.client, running)[-1].msg_type == "job_cancelled"
    record = s.client.job(running)["job"]
    assert record["state"] == "cancelled" and record["error"]["code"] == "cancelled"
    assert not (s.config.output_dir / "jobs" / running / "result.glb").exists()


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", ErrorCode.BAD_IMAGE),
        (b"definitely not an image", ErrorCode.BAD_IMAGE),
        (png_bytes()[:200], ErrorCode.BAD_IMAGE),
        (png_bytes(subject=False), ErrorCode.EMPTY_ALPHA),
    ],
)
def test_bad_images_are_refused_with_typed_errors(make_server, data, code):
    s = make_server(SLOW)
    with pytest.raises(BackendError) as err:
        s.client.generate(data)
    assert err.value.code is code and err.value.hint
    assert s.client.jobs()["jobs"] == []
    assert s.client.ping()["pong"] is True


def test_bad_params_are_refused(make_server, image_png):
    s = make_server(SLOW)
    with pytest.raises(BackendError) as err:
        s.client.generate(image_png, {"samplers": {"shape": {"cfg_strength": 3}}})
    assert err.value.code is ErrorCode.BAD_PARAMS


def test_disk_threshold_refuses_before_anything_is_queued(make_server, image_png):
    s = make_server(SLOW, min_free_disk=1 << 60)
    with pytest.raises(BackendError) as err:
        s.client.generate(image_png)
    assert err.value.code is ErrorCode.DISK_FULL
    assert s.client.jobs()["jobs"] == []


def test_a_reexport_of_an_unknown_job_is_not_found_whatever_the_disk(make_server):
    s = make_server("preview", min_free_disk=1 << 60)
    with pytest.raises(BackendError) as err:
        s.client.reexport("20270115-080000-0123abcd", {})
    assert err.value.code is ErrorCode.NOT_FOUND


def _raw_dealer(s):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(s.info.shell_url)
    return sock


def test_forged_unsigned_and_replayed_messages_are_rejected(make_server):
    s = make_server(SLOW)
    sock = _raw_dealer(s)
    honest = protocol.Session(s.info.key)
    forger = protocol.Session(protocol.new_key())
    reader = protocol.Session(s.info.key)
    try:
        # forged: signed with the wrong key
        sock.send_multipart(forger.serialize(forger.msg("shutdown")))
        reply = reader.deserialize(sock.recv_multipart())
        assert reply.content["error"]["code"] == "bad_signature"
        # unsigned
        frames = honest.serialize(honest.msg("shutdown"))
        frames[1] = b""
        sock.send_multipart(frames)
        assert reader.deserialize(sock.recv_multipart()).content["error"]["code"] == "bad_signature"
        # replayed: the same signed frames twice
        frames = honest.serialize(honest.msg("ping"))
        sock.send_multipart(frames)
        assert reader.deserialize(sock.recv_multipart()).content["ok"] is True
        sock.send_multipart(frames)
        assert reader.deserialize(sock.recv_multipart()).content["error"]["code"] == "replayed"
        # garbage frames
        sock.send_multipart([b"\x00" * 3])
        assert reader.deserialize(sock.recv_multipart()).content["error"]["code"] == "bad_message"
    finally:
        sock.close()
    assert s.client.ping()["pong"] is True
    rejected = s.client.status()["rejected"]
    assert rejected == {"bad_signature": 2, "replayed": 1, "bad_message": 1}
    assert s.thread.is_alive()


def test_events_are_signed_and_carry_the_session(make_server, image_png):
    s = make_server(SLOW, engine_options={"steps": "2", "step_seconds": "0.01"})
    job_id = s.client.generate(image_png)
    events = collect_until(s.client, job_id)
    assert {e.session for e in events} == {s.info.session}
    assert s.client.rejected == 0


def test_history_survives_a_backend_restart(make_server, tmp_path, image_png):
    s = make_server(SLOW, engine_options={"steps": "2", "step_seconds": "0.01"})
    job_id = s.client.generate(image_png)
    assert collect_until(s.client, job_id)[-1].msg_type == "job_done"
    output_dir = s.config.output_dir
    s.stop()
    s2 = make_server(SLOW, output_dir=output_dir)
    assert s2.info.session != s.info.session
    jobs = s2.client.jobs()["jobs"]
    assert [j["job_id"] for j in jobs] == [job_id] and jobs[0]["state"] == "done"


def test_stop_mid_job_requeues_it_and_the_next_backend_finishes_it(make_server, image_png):
    s = make_server(SLOW, engine_options={"steps": "200", "step_seconds": "0.02"})
    job_id = s.client.generate(image_png)
    deadline = time.monotonic() + 10
    while s.client.status()["running"] != [job_id]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    s.client.shutdown("test")
    s.thread.join(timeout=20)
    assert not s.thread.is_alive()
    on_disk = json.loads((s.config.output_dir / "jobs" / job_id / "job.json").read_text())
    assert on_disk["state"] == "queued"
    assert not s.config.connection_file.exists()
    s2 = make_server(
        SLOW, output_dir=s.config.output_dir, engine_options={"steps": "2", "step_seconds": "0.01"}
    )
    final = s2.client.wait_for_job(job_id, timeout=20)
    assert final["event"] == "job_done"
    assert s2.client.job(job_id)["job"]["recoveries"] == 0  # a clean stop is not a crash


def test_stats_aggregate_after_jobs(make_server, image_png):
    s = make_server(SLOW, engine_options={"steps": "1", "step_seconds": "0"})
    ids = [s.client.generate(image_png) for _ in range(3)]
    for job_id in ids:
        s.client.wait_for_job(job_id, timeout=20)
    agg = s.client.stats()["aggregate"]
    assert agg["jobs"] == 3 and agg["success_rate"] == 1.0
    assert agg["seconds_p95"] >= agg["seconds_p50"] > 0
    assert agg["level_distribution"] == {"0": 3}


def test_doctor_request_reports_without_blocking_the_loop(make_server):
    s = make_server(SLOW)
    msg_id = s.client.send("doctor")
    assert s.client.ping(timeout=2)["pong"] is True  # answered while doctor runs
    reply = s.client.wait_reply(msg_id, timeout=120, what="doctor").content
    assert reply["ok"] is True
    checks = {c["name"]: c for c in reply["report"]["checks"]}
    assert "python" in checks and checks["python"]["ok"] is True
    assert "trellis2" in checks and all("hint" in c for c in checks.values())


def test_jobs_a_dead_backend_left_running_are_settled_by_the_next_one(
    make_server, tmp_path, image_png
):
    """The one recovery rule (`jobs.after_backend_died`), applied by a backend that finds jobs
    `running` on start: the first run again and finish, one that already ran again fails with
    backend_died, one the user cancelled stays cancelled."""
    from backend.store.jobs import JobStore

    output_dir = tmp_path / "left"
    store = JobStore(output_dir)
    again, twice, cancelled = (
        store.create("generate", "tests.cpu_engines:SlowEngine", {}, image=image_png).id
        for _ in range(3)
    )
    for job_id in (again, twice, cancelled):
        store.transition(job_id, "start")
    store.update(twice, recoveries=1)
    store.request_cancel(cancelled)
    s = make_server(
        SLOW, output_dir=output_dir, engine_options={"steps": "2", "step_seconds": "0.01"}
    )
    assert s.client.wait_for_job(again, timeout=20)["event"] == "job_done"
    records = {j: s.client.job(j)["job"] for j in (again, twice, cancelled)}
    assert records[again]["recoveries"] == 1
    assert records[twice]["state"] == "failed"
    assert records[twice]["error"]["code"] == "backend_died"
    assert records[cancelled]["state"] == "cancelled"
    assert records[twice]["error"]["log_tail"] == ""  # no note: nothing known of its death
    assert "found running at start-up" in records[twice]["error"]["message"]


def _left_running(output_dir, image_png, recoveries: int) -> str:
    from backend.store.jobs import JobStore

    store = JobStore(output_dir)
    job_id = store.create("generate", "tests.cpu_engines:SlowEngine", {}, image=image_png).id
    store.transition(job_id, "start")
    store.update(job_id, recoveries=recoveries)
    return job_id


def test_a_job_run_again_at_recovery_is_announced_as_queued_again(tmp_path, image_png):
    """A job the last backend left running is announced with `job_queued` as when it was
    first queued, plus why it is queued again (a standby's subscribers see it at `activate`);
    a queued one is not announced again."""
    from backend.server.loop import ServerConfig
    from backend.server.workers import Backend
    from backend.store.jobs import JobStore

    output_dir = tmp_path / "left"
    again = _left_running(output_dir, image_png, 0)
    waiting = JobStore(output_dir).create("generate", SLOW, {}, image=image_png).id
    events: list[tuple[str, dict]] = []
    config = ServerConfig(
        connection_file=tmp_path / "c.json", output_dir=output_dir, engine=SLOW, standby=True
    )
    backend = Backend(
        config, lambda kind, content, parent=None: events.append((kind, content)), "s"
    )
    try:
        backend.activate()
    finally:
        backend.store.release()
    assert backend.queue_snapshot() == [again, waiting]
    assert [c for kind, c in events if kind == "job_queued"] == [
        {
            "job_id": again,
            "kind": "generate",
            "position": 1,
            "filename": "",  # the store's record had none
            "reason": "found running at start-up",
        }
    ]


def test_the_supervisors_note_names_the_death_in_the_job_log_and_error(
    make_server, tmp_path, image_png, monkeypatch
):
    """What the supervisor knew of the dead backend (settings.ENV_PREDECESSOR) reaches the
    jobs it left running: the reason and its log's last lines in each job's log, and in a
    failed job's error (`log_tail`)."""
    from backend import settings
    from backend.backendlogs import Predecessor
    from backend.store.jobs import JobStore

    output_dir = tmp_path / "left"
    again, twice = (_left_running(output_dir, image_png, n) for n in (0, 1))
    logs = output_dir / "logs"
    logs.mkdir(mode=0o700)
    dead_log = logs / "backend-20260101-000000-000000-4242.log"
    dead_log.write_text("# python -m backend serve\n" + "noise\n" * 100 + "its last words\n")
    note = Predecessor.make(4242, "the backend was killed by SIGKILL", dead_log)
    monkeypatch.setenv(settings.ENV_PREDECESSOR, note.to_json())
    s = make_server(
        SLOW, output_dir=output_dir, engine_options={"steps": "2", "step_seconds": "0.01"}
    )
    assert s.client.wait_for_job(again, timeout=20)["event"] == "job_done"
    failed = s.client.job(twice)["job"]
    assert failed["state"] == "failed" and failed["error"]["code"] == "backend_died"
    assert "killed by SIGKILL" in failed["error"]["message"]
    assert str(dead_log) in failed["error"]["hint"]
    tail = failed["error"]["log_tail"]
    assert tail.endswith("its last words") and len(tail.splitlines()) == 40
    store = JobStore(output_dir)
    for job_id in (again, twice):
        text = store.log_excerpt(job_id)
        assert "backend pid 4242 went away during this job: the backend was killed by SIGKILL" in (
            text
        )
        assert f"--- last lines of {dead_log.name} ---" in text and "its last words" in text
    assert "running it again" in store.log_excerpt(again)


@pytest.mark.parametrize(
    "note",
    [
        "{not json",
        '{"pid": 4242, "why": "x", "log_path": null}' + " " * 5000,  # too long
        '{"pid": "4242", "why": "x", "log_path": null}',
        '{"pid": 4242, "why": ["x"], "log_path": null}',
        "[1, 2]",
    ],
)
def test_a_note_that_is_not_sound_is_ignored(make_server, tmp_path, image_png, monkeypatch, note):
    from backend import settings

    output_dir = tmp_path / "left"
    twice = _left_running(output_dir, image_png, 1)
    monkeypatch.setenv(settings.ENV_PREDECESSOR, note)
    s = make_server(SLOW, output_dir=output_dir)
    error = s.client.job(twice)["job"]["error"]
    assert "found running at start-up" in error["message"] and error["log_tail"] == ""


def test_a_note_naming_a_log_elsewhere_is_kept_without_reading_it(
    make_server, tmp_path, image_png, monkeypatch
):
    """Only a backend log where supervisors write them is read: a path elsewhere, or a file
    that is not named like a backend log, leaves the tail out (the reason still stands)."""
    from backend import settings
    from backend.store.jobs import JobStore

    output_dir = tmp_path / "left"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    secret = elsewhere / "backend-20260101-000000-000000-4242.log"
    secret.write_text("a secret\n")
    (output_dir / "logs").mkdir(parents=True)
    (output_dir / "logs" / "id_rsa").write_text("a key\n")
    for path in (secret, output_dir / "logs" / "id_rsa"):
        job_id = _left_running(output_dir, image_png, 1)
        note = {"pid": 4242, "why": "the backend was killed\nby SIGKILL", "log_path": str(path)}
        monkeypatch.setenv(settings.ENV_PREDECESSOR, json.dumps(note))
        s = make_server(SLOW, output_dir=output_dir)
        error = s.client.job(job_id)["job"]["error"]
        assert "the backend was killed by SIGKILL" in error["message"]  # one line
        assert error["log_tail"] == ""
        text = JobStore(output_dir).log_excerpt(job_id)
        assert "a secret" not in text and "a key" not in text
        s.stop()


def test_a_backend_whose_start_fails_leaves_no_connection_file(tmp_path, monkeypatch):
    """A connection file names a live backend: one that fails after binding (say, on a job
    store it cannot recover) removes it, and stops its reader, before it exits."""
    from backend.server.loop import Server, ServerConfig
    from backend.server.workers import Backend

    config = ServerConfig(
        connection_file=tmp_path / "runtime" / "backend.json",
        engine=SLOW,
        output_dir=tmp_path / "out",
        min_free_disk=1 << 20,
        settle_heap=False,
    )
    server = Server(config)
    server.bind()
    assert config.connection_file.exists()

    def fail(self):
        raise RuntimeError("the queue could not be recovered")

    monkeypatch.setattr(Backend, "start", fail)
    with pytest.raises(RuntimeError):
        server.serve_forever()
    assert not config.connection_file.exists()
    assert server.reader is None or server.reader.proc is None  # stopped


def test_large_messages_are_checked_off_the_loop_and_refused_or_run_as_others(
    make_server, image_png, monkeypatch
):
    """Hashing an image holds up whichever thread does it: large messages are checked on the
    intake lane, so the loop answers others meanwhile, and they are refused (signature,
    replay) and run (a new job) as any other."""
    from backend import settings

    monkeypatch.setattr(settings, "LOOP_VERIFY_BYTES", 1000)
    s = make_server(SLOW, engine_options={"steps": "1", "step_seconds": "0.001"})
    sock = _raw_dealer(s)
    honest = protocol.Session(s.info.key)
    forger = protocol.Session(protocol.new_key())
    big = image_png + b"\0" * 2000  # a PNG with trailing bytes decodes the same
    slow_sign = protocol.Session.sign

    def sign(self, frames):
        if sum(map(len, frames[3:])) > 1000:
            time.sleep(1.0)  # a long hash
        return slow_sign(self, frames)

    monkeypatch.setattr(protocol.Session, "sign", sign)
    try:
        forged = forger.msg("generate", {}, buffers=[big])
        sock.send_multipart(forger.serialize(forged))
        ping = honest.msg("ping")
        sock.send_multipart(honest.serialize(ping))
        first = honest.deserialize(sock.recv_multipart(), check_replay=False)
        assert first.parent_id == ping.msg_id  # answered while the large one was checked
        refused = honest.deserialize(sock.recv_multipart(), check_replay=False)
        assert refused.msg_type == "error_reply" and refused.parent_id == forged.msg_id
        assert refused.content["error"]["code"] == "bad_signature"

        job = honest.msg("generate", {}, buffers=[big])
        frames = honest.serialize(job)
        sock.send_multipart(frames)
        made = honest.deserialize(sock.recv_multipart(), check_replay=False)
        assert made.msg_type == "generate_reply" and made.content["ok"], made.content
        sock.send_multipart(frames)  # the same message again
        again = honest.deserialize(sock.recv_multipart(), check_replay=False)
        assert again.content["error"]["code"] == "replayed"
    finally:
        sock.close()
    s.client.wait_for_job(made.content["job_id"], timeout=20)
    assert s.client.status()["rejected"] == {"bad_signature": 1, "replayed": 1}
