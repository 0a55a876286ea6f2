"""The sans-I/O protocol core: envelopes, signatures, replay guard, connection file."""

from __future__ import annotations

import json
import os
import stat

import pytest

from backend.errors import ErrorCode, ProtocolError
from backend.wire import protocol


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def pair(clock=None):
    key = protocol.new_key()
    clock = clock or FakeClock()
    return protocol.Session(key, clock=clock), protocol.Session(key, clock=clock)


def test_round_trip_with_binary_buffer():
    sender, receiver = pair()
    msg = sender.msg("generate", {"params": {"seed": 3}}, buffers=[b"\x89PNG\x00\xff" * 10])
    got = receiver.deserialize(sender.serialize(msg))
    assert got.msg_type == "generate"
    assert got.content == {"params": {"seed": 3}}
    assert got.buffers == (b"\x89PNG\x00\xff" * 10,)
    assert got.header["session"] == sender.session_id
    assert got.header["version"] == protocol.PROTOCOL_VERSION


def test_reply_carries_parent_header():
    sender, receiver = pair()
    request = sender.msg("ping")
    reply = receiver.msg("ping_reply", {"ok": True}, parent=request)
    got = sender.deserialize(receiver.serialize(reply))
    assert got.parent_id == request.msg_id


def test_a_reply_from_pre_encoded_content_is_signed_over_exactly_those_bytes():
    """The backend's reader process encodes `jobs` pages itself; the server signs and sends
    the bytes it got, unchanged, and a client verifies them as any reply."""
    sender, receiver = pair()
    request = receiver.msg("jobs", {"limit": 5})
    content = b'{"ok":true,"jobs":[{"job_id":"x","created":1.5}],"next":null}'
    frames = sender.serialize_encoded("jobs_reply", content, request)
    assert frames[4] == content  # sent as given
    got = receiver.deserialize(frames)
    assert got.msg_type == "jobs_reply" and got.parent_id == request.msg_id
    assert got.content == {"ok": True, "jobs": [{"job_id": "x", "created": 1.5}], "next": None}
    forged = [*frames[:4], content.replace(b"1.5", b"2.5")]
    with pytest.raises(ProtocolError) as err:
        receiver.deserialize(forged)
    assert err.value.code is ErrorCode.BAD_SIGNATURE
    for bad in (b"", b"[1]", b'"text"', b"{ truncated"):
        with pytest.raises(ValueError):
            sender.serialize_encoded("jobs_reply", bad, request)


def test_each_process_gets_a_new_session_id():
    key = protocol.new_key()
    assert protocol.Session(key).session_id != protocol.Session(key).session_id


@pytest.mark.parametrize("index", [2, 3, 4, 5])
def test_tampering_with_any_frame_is_rejected(index):
    sender, receiver = pair()
    frames = sender.serialize(sender.msg("generate", {"a": 1}, buffers=[b"image-bytes"]))
    frames[index] = frames[index][:-1] + bytes([frames[index][-1] ^ 1])
    with pytest.raises(ProtocolError) as err:
        receiver.deserialize(frames)
    assert err.value.code in (ErrorCode.BAD_SIGNATURE,)


def test_moving_bytes_between_frames_breaks_the_signature():
    sender, receiver = pair()
    frames = sender.serialize(sender.msg("generate", {}, buffers=[b"ab", b"cd"]))
    frames[5], frames[6] = b"abc", b"d"
    with pytest.raises(ProtocolError) as err:
        receiver.deserialize(frames)
    assert err.value.code is ErrorCode.BAD_SIGNATURE


def test_wrong_key_and_unsigned_messages_are_rejected():
    sender, _ = pair()
    stranger = protocol.Session(protocol.new_key())
    frames = sender.serialize(sender.msg("status"))
    with pytest.raises(ProtocolError) as err:
        stranger.deserialize(frames)
    assert err.value.code is ErrorCode.BAD_SIGNATURE
    unsigned = [frames[0], b"", *frames[2:]]
    with pytest.raises(ProtocolError):
        stranger.deserialize(unsigned)


def test_replayed_message_is_rejected_once_seen():
    sender, receiver = pair()
    frames = sender.serialize(sender.msg("cancel", {"job_id": "x"}))
    receiver.deserialize(frames)
    with pytest.raises(ProtocolError) as err:
        receiver.deserialize(frames)
    assert err.value.code is ErrorCode.REPLAYED


def test_stale_message_is_treated_as_replay():
    clock = FakeClock()
    sender, receiver = pair(clock)
    frames = sender.serialize(sender.msg("status"))
    clock.t += protocol.MAX_MESSAGE_AGE + 1
    with pytest.raises(ProtocolError) as err:
        receiver.deserialize(frames)
    assert err.value.code is ErrorCode.REPLAYED


def test_replay_window_is_bounded():
    guard = protocol.ReplayGuard(window=3)
    for i in range(10):
        guard.check(f"id{i}", 0.0, 0.0)
    assert len(guard._seen) == 3


@pytest.mark.parametrize(
    "frames, code",
    [
        ([], ErrorCode.BAD_MESSAGE),
        ([b"nope", b"", b"", b"", b""], ErrorCode.BAD_MESSAGE),
        ([protocol.DELIMITER, b"sig"], ErrorCode.BAD_MESSAGE),
        ([protocol.DELIMITER, b"s", b"{}", b"{}", b"{}", *[b""] * 5], ErrorCode.TOO_LARGE),
    ],
)
def test_malformed_envelopes_get_typed_errors(frames, code):
    _, receiver = pair()
    with pytest.raises(ProtocolError) as err:
        receiver.deserialize(frames)
    assert err.value.code is code


def _signed(session, header, parent=b"{}", content=b"{}"):
    body = [header, parent, content]
    return [protocol.DELIMITER, session.sign(body), *body]


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"msg_id": "a"}).encode(),
        json.dumps(
            {"msg_id": 1, "msg_type": "x", "session": "s", "date": "d", "version": "1.0"}
        ).encode(),
    ],
)
def test_signed_but_malformed_headers_are_rejected(header):
    sender, receiver = pair()
    with pytest.raises(ProtocolError) as err:
        receiver.deserialize(_signed(sender, header))
    assert err.value.code is ErrorCode.BAD_MESSAGE


def test_incompatible_major_version_is_rejected():
    sender, receiver = pair()
    msg = sender.msg("ping")
    msg.header["version"] = "9.0"
    with pytest.raises(ProtocolError) as err:
        receiver.deserialize(sender.serialize(msg))
    assert err.value.code is ErrorCode.VERSION_MISMATCH


def test_oversized_json_frame_is_rejected():
    sender, receiver = pair()
    msg = sender.msg("hello", {"client": "x" * (protocol.MAX_JSON_FRAME + 1)})
    with pytest.raises(ProtocolError) as err:
        receiver.deserialize(sender.serialize(msg))
    assert err.value.code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    "msg_type, content, buffers, ok",
    [
        ("generate", {"params": {}}, [b"img"], True),
        ("generate", {"params": {}}, [], False),
        ("generate", {"params": []}, [b"img"], False),
        ("cancel", {}, [], False),
        ("cancel", {"job_id": 5}, [], False),
        ("jobs", {"limit": True}, [], False),
        ("texture", {"mesh_format": "glb"}, [b"i", b"m"], True),
        ("rm -rf", {}, [], False),
    ],
)
def test_request_schema(msg_type, content, buffers, ok):
    session = protocol.Session(protocol.new_key())
    message = session.msg(msg_type, content, buffers=buffers)
    if ok:
        protocol.check_request(message)
    else:
        with pytest.raises(ProtocolError):
            protocol.check_request(message)


def test_connection_file_is_owner_only_and_complete(tmp_path):
    info = protocol.ConnectionInfo(
        shell_port=5555, iopub_port=5556, key=protocol.new_key(), session="abc", pid=os.getpid()
    )
    path = protocol.write_connection_file(tmp_path / "run" / "backend.json", info)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    for name in (
        "transport",
        "ip",
        "shell_port",
        "iopub_port",
        "key",
        "signature_scheme",
        "pid",
        "session",
    ):
        assert name in data
    assert data["ip"] == "127.0.0.1"
    assert protocol.read_connection_file(path) == info
    assert not list(path.parent.glob(".conn-*"))  # no temp files left behind


def test_unreadable_connection_files_give_typed_errors(tmp_path):
    from backend.errors import BackendError

    with pytest.raises(BackendError) as err:
        protocol.read_connection_file(tmp_path / "missing.json")
    assert err.value.code is ErrorCode.NOT_FOUND
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(BackendError):
        protocol.read_connection_file(bad)
    bad.write_text(json.dumps({"signature_scheme": "none"}))
    with pytest.raises(BackendError):
        protocol.read_connection_file(bad)


def test_empty_key_is_refused():
    with pytest.raises(ValueError):
        protocol.Session(b"")


def test_replay_guard_forgets_ids_only_once_their_date_is_stale():
    guard = protocol.ReplayGuard(window=1000, max_age=10.0)
    guard.check("old", sent_at=0.0, now=0.0)
    guard.check("new", sent_at=5.0, now=5.0)
    with pytest.raises(ProtocolError):
        guard.check("old", sent_at=0.0, now=9.0)  # still remembered: its date still passes
    guard.check("later", sent_at=11.0, now=11.0)
    assert "old" not in guard._seen and "new" in guard._seen
    with pytest.raises(ProtocolError):
        guard.check("old", sent_at=0.0, now=11.0)  # forgotten, but now refused as stale


def test_a_stale_date_says_how_far_off_the_clock_is():
    clock = FakeClock()
    sender, receiver = pair(clock)
    frames = sender.serialize(sender.msg("status"))
    clock.t += 400
    with pytest.raises(ProtocolError) as err:
        receiver.deserialize(frames)
    assert err.value.code is ErrorCode.REPLAYED
    assert "-400 s" in err.value.message
    assert "clock" in err.value.hint  # not "this message id was already seen"


@pytest.mark.parametrize(
    "date",
    [
        "2027-01-15T08:00:00",  # no offset: read in the receiver's time zone
        "2027-01-15",  # a date alone
        "2027-W03",  # a week date
        "yesterday",
    ],
)
def test_a_date_that_is_not_a_time_with_an_offset_is_a_bad_message(date):
    clock = FakeClock(1_800_000_000.0)  # 2027-01-15T08:00:00Z
    sender, receiver = pair(clock)
    message = sender.msg("status")
    message.header["date"] = date
    with pytest.raises(ProtocolError) as err:
        receiver.deserialize(sender.serialize(message))
    assert err.value.code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("date", ["2027-01-15T08:00:00Z", "2027-01-15T10:00:00+02:00"])
def test_a_time_with_any_utc_offset_is_accepted(date):
    sender, receiver = pair(FakeClock(1_800_000_000.0))
    message = sender.msg("status")
    message.header["date"] = date
    assert receiver.deserialize(sender.serialize(message)).header["date"] == date


def test_a_refusal_for_a_too_long_msg_id_still_names_it():
    """A client matches a refusal by `parent_header.msg_id`: the one field that made the
    request unacceptable must come back too."""
    sender, receiver = pair()
    message = sender.msg("ping")
    message.header["msg_id"] = "b" * 201
    frames = sender.serialize(message)
    with pytest.raises(ProtocolError) as err:
        receiver.deserialize(frames)
    assert err.value.code is ErrorCode.BAD_MESSAGE
    assert protocol.readable_header(frames)["msg_id"] == "b" * 201
