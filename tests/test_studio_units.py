"""The studio server's pure parts: queues by card size, time limits, connection strings, the
gateway's key folder and request table. No Redis, no processes."""

from __future__ import annotations

import os
import stat

import pytest
import zmq

from backend.errors import BackendError, ProtocolError
from backend.store.jobs import JobRecord, JobState, outcome_event
from backend.studio import dispatch
from backend.studio.jobdesk import REQUESTS
from backend.wire import curvekeys, protocol

# -- queues by card size ----------------------------------------------------------------------

CARDS = [
    # card GB, job needs GB, served?
    (24, 0, True),
    (24, 16, True),
    (24, 24, True),
    (24, 25, False),  # rounds up to the 32 tier
    (40, 33, True),  # an A100-40 takes what fits in 40
    (40, 41, False),
    (48, 40, True),
    (80, 48, True),
    (141, 141, True),
    (141, 142, False),  # more than any tier
    (6, 0, False),  # smaller than every tier
]


@pytest.mark.parametrize(("card", "need", "served"), CARDS)
def test_a_queue_is_consumed_only_by_cards_large_enough(card, need, served):
    assert dispatch.can_serve(card, need) is served
    tier = dispatch.need_tier(need)
    queues = dispatch.queues_for_card(card, "w")
    if tier is not None:
        assert (dispatch.queue_name(tier) in queues) is served
    assert queues[-1] == dispatch.worker_queue("w")  # re-exports reach this worker


def test_tiers_round_needs_up_and_cards_down():
    assert dispatch.need_tier(0) == dispatch.CARD_TIERS_GB[0]
    assert dispatch.need_tier(20) == 24 and dispatch.card_tier(23.9) == 16
    assert dispatch.card_tier(dispatch.CARD_TIERS_GB[0] - 1) is None
    assert list(dispatch.CARD_TIERS_GB) == sorted(set(dispatch.CARD_TIERS_GB))


def test_celery_settings_one_job_per_gpu_acknowledged_late():
    settings = dispatch.celery_settings(dispatch.Timing())
    assert settings["worker_concurrency"] == 1
    assert settings["worker_prefetch_multiplier"] == 1
    assert settings["task_acks_late"] and settings["task_reject_on_worker_lost"]
    assert settings["broker_transport_options"]["visibility_timeout"] == 120.0


@pytest.mark.parametrize(
    "bad",
    [
        {"retry_countdown": 200.0},  # held unacknowledged past the visibility timeout
        {"lease_renew": 20.0},
        {"registry_renew": 10.0},
    ],
)
def test_timing_refuses_limits_that_would_duplicate_or_drop_jobs(bad):
    with pytest.raises(ValueError):
        dispatch.Timing(**bad).check()
    dispatch.Timing().check()


# -- keys and connection strings ----------------------------------------------------------------


def test_add_user_authorizes_a_key_and_prints_a_working_string(tmp_path):
    home = tmp_path / "home"
    text = curvekeys.add_user(home, "alice", "tcp://gpu-box.studio:5555")
    conn = curvekeys.decode_connection(text)
    assert conn.user == "alice" and conn.shell == "tcp://gpu-box.studio:5555"
    assert conn.events == "tcp://gpu-box.studio:5556"
    keys = curvekeys.ensure_home(home)
    assert conn.server_key == keys.public.decode() and conn.signing_key == keys.signing_key
    # The string's secret key belongs to the authorized public key (libzmq derives it).
    assert zmq.curve_public(conn.secret_key.encode()) == conn.public_key.encode()
    assert curvekeys.authorized_users(home) == {conn.public_key: "alice"}
    # The artist's secret is not kept on the server.
    assert not any(conn.secret_key in p.read_text() for p in home.rglob("*") if p.is_file())
    with pytest.raises(BackendError, match="already exists"):
        curvekeys.add_user(home, "alice", "tcp://gpu-box.studio:5555")
    curvekeys.remove_user(home, "alice")
    assert curvekeys.authorized_users(home) == {}


def test_the_gateway_home_is_private(tmp_path):
    home = tmp_path / "home"
    curvekeys.ensure_home(home)
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    for name in ("server.key_secret", "signing.key"):
        assert stat.S_IMODE(os.stat(home / name).st_mode) == 0o600
    first = curvekeys.ensure_home(home)
    assert curvekeys.ensure_home(home) == first  # keys are made once


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tcp://gpu:5555",
        curvekeys.CONNECTION_PREFIX + "!!!",
        curvekeys.CONNECTION_PREFIX + "eyJzaGVsbCI6MX0",  # {"shell":1}: fields missing
    ],
)
def test_a_damaged_connection_string_is_a_typed_error(text):
    with pytest.raises(BackendError) as caught:
        curvekeys.decode_connection(text)
    assert caught.value.code.value == "bad_message" and caught.value.hint


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65, "a b"])
def test_user_names_cannot_leave_the_authorized_folder(tmp_path, name):
    with pytest.raises(BackendError):
        curvekeys.add_user(tmp_path / "home", name, "tcp://h:1")


def test_a_half_written_certificate_authorizes_nobody(tmp_path):
    home = tmp_path / "home"
    curvekeys.ensure_home(home)
    (curvekeys.authorized_dir(home) / "junk.key").write_text("metadata\ncurve\n")
    assert curvekeys.authorized_users(home) == {}


# -- the gateway's requests ------------------------------------------------------------------------


def _request(msg_type, content, buffers=()):
    return protocol.Session("k" * 64).msg(msg_type, content, buffers=buffers)


@pytest.mark.parametrize(
    ("msg_type", "content", "buffers", "ok"),
    [
        ("fetch", {"job_id": "j", "name": "result.glb"}, (), True),
        ("fetch", {"job_id": "j"}, (), False),
        ("fetch", {"job_id": "j", "name": "r", "offset": "0"}, (), False),
        ("generate", {"min_vram_gb": 48}, (b"png",), True),
        ("generate", {"min_vram_gb": "48"}, (b"png",), False),
        ("shutdown", {}, (), False),  # artists cannot stop the studio's server
        ("doctor", {}, (), False),
        ("activate", {}, (), False),
    ],
)
def test_gateway_request_table(msg_type, content, buffers, ok):
    message = _request(msg_type, content, buffers)
    if ok:
        protocol.check_request(message, REQUESTS)
    else:
        with pytest.raises(ProtocolError):
            protocol.check_request(message, REQUESTS)


def test_outcome_events_match_the_local_backend_shapes():
    base = {"id": "20260101-000000-abcdef", "kind": "generate", "engine": "p", "params": {}}
    done = JobRecord(
        **base,
        state=JobState.DONE,
        level=2,
        result={"glb_path": "/s/r.glb", "mesh_stats": {"faces": 1}},
        extra={"worker": "w1"},
    )
    kind, content = outcome_event(done)
    assert kind == "job_done" and content["degraded"] and content["worker"] == "w1"
    assert content["oom_quality_degradation_level"] == 2
    failed = JobRecord(**base, state=JobState.FAILED, error={"code": "internal", "message": "m"})
    assert outcome_event(failed) == ("job_failed", {"job_id": base["id"], **failed.error})
    assert outcome_event(JobRecord(**base, state=JobState.CANCELLED))[0] == "job_cancelled"


def test_the_remote_connection_needs_no_server_packages():
    """The add-on imports backend.wire.remote with Blender's Python: pyzmq, no Celery or Redis."""
    import subprocess
    import sys

    code = (
        "import sys, backend.wire.remote; "
        "print(sorted(m for m in ('celery', 'kombu', 'redis', 'numpy', 'PIL', 'torch') "
        "if m in sys.modules))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
