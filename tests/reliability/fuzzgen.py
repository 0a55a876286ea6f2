"""Protocol fuzzing: hostile messages derived from protocol.REQUESTS, each with the error codes
the backend may answer. One set of mutations feeds two drivers: hypothesis (`HypothesisSource`,
shrinking, for CI) and a seeded `random.Random` (`RandomSource`, fast, for the 100,000 count)."""

from __future__ import annotations

import json
import random
import string
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from backend.wire import protocol

OK = "ok"  # the expected "code" of a successful reply
# Rejected before any handler runs: counted in status/stats `rejected`.
PROTOCOL_CODES = frozenset(
    {
        "bad_message",
        "bad_signature",
        "replayed",
        "too_large",
        "version_mismatch",
        "unknown_request",
    }
)
# Never to be sent in a well-formed way: they would stop the backend or start heavy work.
UNSAFE = ("shutdown", "doctor")
HARMLESS = ("hello", "ping", "status", "stats", "jobs", "activate")
TRAVERSAL = (
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    "",
    "jobs/../../../secret",
    "..\\..\\windows\\win.ini",
    "20240101-000000-abcdef/../../../secret",
    "20240101-000000-abcdef\n",
    "%2e%2e%2fsecret",
    "\x00",
    "C:\\Windows\\system32",
    "~/secret",
    "20240101-000000-zzzzzz",
)
JSON_BY_TYPE: dict[type, list[Any]] = {
    str: ["", "x", "../../etc/passwd", "\u202e\ufeff", "a" * 300],
    int: [0, -1, 1, 2**63, -(10**30), 10**40],
    float: [0.5, -1e308, 1e-300, 3.0],
    bool: [True, False],
    type(None): [None],
    list: [[], [1, "a", None], [[[]]]],
    dict: [{}, {"a": 1}, {"preset": "fast"}],
}


class RandomSource:
    """Draws from a seeded random.Random (fast: no shrinking, no bookkeeping)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.rng.randrange(len(seq))]

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def blob(self, low: int, high: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))

    def text(self, low: int, high: int) -> str:
        alphabet = string.printable + "é中\u0000\ud7ff"
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(low, high)))

    def json_value(self, depth: int = 3) -> Any:
        kind = self.rng.randrange(9 if depth > 0 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return self.rng.random() < 0.5
        if kind == 2:
            return self.rng.randint(-(2**70), 2**70)
        if kind == 3:
            return self.rng.uniform(-1e9, 1e9)
        if kind in (4, 5):
            return self.text(0, 12)
        if kind in (6, 7):
            return [self.json_value(depth - 1) for _ in range(self.rng.randint(0, 3))]
        return {self.text(0, 8): self.json_value(depth - 1) for _ in range(self.rng.randint(0, 3))}


class HypothesisSource:
    """Draws through hypothesis (`st.data()`), so failures shrink to a minimal message."""

    def __init__(self, data: Any):
        from hypothesis import strategies as st

        self.st = st
        self.data = data

    def choice(self, seq: Sequence[Any]) -> Any:
        return self.data.draw(self.st.sampled_from(list(seq)))

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(self.st.integers(low, high))

    def blob(self, low: int, high: int) -> bytes:
        return self.data.draw(self.st.binary(min_size=low, max_size=high))

    def text(self, low: int, high: int) -> str:
        return self.data.draw(self.st.text(min_size=low, max_size=high))

    def json_value(self, depth: int = 3) -> Any:
        st = self.st
        scalars = (
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=12)
        )  # noqa: E501
        value = st.recursive(
            scalars,
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=8), inner, max_size=3)
            ),  # noqa: E501
            max_leaves=8,
        )
        return self.data.draw(value)


@dataclass
class Probe:
    """One message to send, and the reply codes that are correct for it."""

    mutation: str
    frames: list[bytes]
    expect: frozenset[str]


def _iso(offset: float = 0.0) -> str:
    moment = datetime.now(timezone.utc) + timedelta(seconds=offset)
    return moment.isoformat(timespec="microseconds")


class Forge:
    """Builds envelopes, correctly signed or not, with any part replaced."""

    def __init__(self, key: str):
        self.session = protocol.Session(key)
        self.other = protocol.Session(protocol.new_key())

    def header(self, msg_type: str, **changes: Any) -> dict[str, Any]:
        header = {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "session": self.session.session_id,
            "date": _iso(),
            "version": protocol.PROTOCOL_VERSION,
        }
        header.update(changes)
        return header

    def frames(
        self,
        msg_type: str = "ping",
        content: Any = None,
        buffers: Sequence[bytes] = (),
        header: Any = None,
        parent: Any = None,
        raw: dict[int, bytes] | None = None,
        session: protocol.Session | None = None,
    ) -> list[bytes]:
        """[DELIMITER, signature, header, parent, content, *buffers]; `raw` replaces encoded
        body frames by index (0 header, 1 parent, 2 content) before signing."""
        body = [
            _dumps(self.header(msg_type) if header is None else header),
            _dumps({} if parent is None else parent),
            _dumps({} if content is None else content),
            *buffers,
        ]
        for index, value in (raw or {}).items():
            body[index] = value
        return [protocol.DELIMITER, (session or self.session).sign(body), *body]


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")  # NaN allowed on purpose


def _wrong_value(src, kind: type) -> Any:
    kinds = [k for k in JSON_BY_TYPE if k is not kind and not (kind is int and k is bool)]
    if kind is int:
        kinds = [k for k in JSON_BY_TYPE if k not in (int,)]  # bool is wrong for an int field
    return src.choice(JSON_BY_TYPE[src.choice(kinds)])


def _buffers_for(msg_type: str, src) -> list[bytes]:
    low, _ = protocol.REQUESTS[msg_type]["buffers"]
    return [src.blob(0, 64) for _ in range(low)]


def _valid_content(msg_type: str, src) -> dict[str, Any]:
    """Content of the right types (values may still be refused by the handler)."""
    content: dict[str, Any] = {}
    for name, (kind, required) in protocol.REQUESTS[msg_type]["fields"].items():
        if name == "idempotency_key":  # a fresh key: a reused one answers with its old job
            if src.integer(0, 1):
                content[name] = uuid.uuid4().hex
            continue
        if required or src.integer(0, 1):
            content[name] = {
                str: src.choice(TRAVERSAL) if name == "job_id" else src.text(0, 10),
                int: src.integer(1, 100),
                bool: bool(src.integer(0, 1)),
                dict: {},
            }[kind]
    return content


# -- mutations: each returns the probes of one case -------------------------------------------


def m_garbage(src, forge: Forge) -> list[Probe]:
    frames = [src.blob(0, 64) for _ in range(src.integer(1, 7))]
    if frames[0] == protocol.DELIMITER:
        frames[0] = b"x"
    return [Probe("garbage", frames, frozenset({"bad_message"}))]


def m_truncated(src, forge: Forge) -> list[Probe]:
    full = forge.frames(src.choice(HARMLESS))
    return [Probe("truncated", full[: src.integer(1, 4)], frozenset({"bad_message"}))]


def m_no_delimiter(src, forge: Forge) -> list[Probe]:
    full = forge.frames(src.choice(HARMLESS))
    if src.integer(0, 1):
        full = full[1:]
    else:
        full[0] = src.choice([b"", b"<IDS|MSG>", protocol.DELIMITER.lower(), src.blob(1, 20)])
        if full[0] == protocol.DELIMITER:  # hypothesis can draw the delimiter itself
            full[0] = b"x"
    return [Probe("no_delimiter", full, frozenset({"bad_message"}))]


def m_truncated_frame(src, forge: Forge) -> list[Probe]:
    full = forge.frames(src.choice(HARMLESS), {"client": "x" * 20})
    index = src.integer(2, 4)
    cut = src.integer(1, max(1, len(full[index])))
    full[index] = full[index][:-cut]
    return [Probe("truncated_frame", full, frozenset({"bad_signature"}))]


def m_bad_signature(src, forge: Forge) -> list[Probe]:
    full = forge.frames(src.choice(list(protocol.REQUESTS)))
    real = full[1]
    full[1] = src.choice(
        [b"", real.upper(), real[:-1], real + b"0", src.blob(1, 64), bytes(64), b"0" * 64]
    )
    return [Probe("bad_signature", full, frozenset({"bad_signature"}))]


def m_wrong_key(src, forge: Forge) -> list[Probe]:
    msg_type = src.choice(list(protocol.REQUESTS))  # a forged shutdown is the classic attack
    frames = forge.frames(
        msg_type,
        _valid_content(msg_type, src),
        _buffers_for(msg_type, src),
        session=forge.other,
    )
    return [Probe("wrong_key", frames, frozenset({"bad_signature"}))]


def m_tampered(src, forge: Forge) -> list[Probe]:
    full = forge.frames("generate", {"params": {"preset": "fast"}}, [src.blob(1, 64)])
    index = src.integer(2, len(full) - 1)
    frame = bytearray(full[index])
    where = src.integer(0, len(frame) - 1)
    frame[where] ^= src.integer(1, 255)
    full[index] = bytes(frame)
    return [Probe("tampered", full, frozenset({"bad_signature"}))]


def m_too_many_buffers(src, forge: Forge) -> list[Probe]:
    count = src.integer(protocol.MAX_BUFFERS + 1, protocol.MAX_BUFFERS + 4)
    msg_type = src.choice(list(protocol.REQUESTS))
    frames = forge.frames(msg_type, buffers=[src.blob(0, 16) for _ in range(count)])
    if src.integer(0, 1):
        frames[1] = b""  # checked before the signature, so unsigned is refused the same way
    return [Probe("too_many_buffers", frames, frozenset({"too_large"}))]


def m_oversized_json(src, forge: Forge) -> list[Probe]:
    pad = "x" * (protocol.MAX_JSON_FRAME + src.integer(0, 4096))
    index = src.integer(0, 2)
    value = {"pad": pad}
    if index == 0:
        value = forge.header("ping", pad=pad)
    frames = forge.frames("ping", raw={index: _dumps(value)})
    return [Probe("oversized_json", frames, frozenset({"too_large"}))]


def m_not_json(src, forge: Forge) -> list[Probe]:
    bad = src.choice(
        [b"", b"{", b"\xff\xfe\x00", b"{'a': 1}", b'{"a":}', src.blob(1, 40), b"\xc3\x28{}"]
    )
    frames = forge.frames(src.choice(HARMLESS), raw={src.integer(0, 2): bad})
    return [Probe("not_json", frames, frozenset({"bad_message"}))]


def m_not_object(src, forge: Forge) -> list[Probe]:
    value = src.choice([[], [1, 2], 1, -0.5, "ping", None, True])
    frames = forge.frames(src.choice(HARMLESS), raw={src.integer(0, 2): _dumps(value)})
    return [Probe("not_object", frames, frozenset({"bad_message"}))]


def m_deep_json(src, forge: Forge) -> list[Probe]:
    # Depths far from the recursion limit only: hypothesis raises that limit while it runs, so
    # a depth near it would decode or not depending on the driver.
    depth = src.choice([100, 50_000, 400_000])
    nested = ("[" * depth + "]" * depth).encode()
    index = src.integer(0, 2)
    if src.integer(0, 1):  # inside an object: shallow decodes (and is ignored), deep is refused
        if index == 0:
            h = _dumps(forge.header("ping"))
            raw = h[:-1] + b',"deep":' + nested + b"}"
        else:
            raw = b'{"deep":' + nested + b"}"
        expect = {"bad_message", OK} if depth < 500 else {"bad_message"}
    else:
        raw, expect = nested, {"bad_message"}
    frames = forge.frames("ping", raw={index: raw})
    return [Probe("deep_json", frames, frozenset(expect))]


def m_nan(src, forge: Forge) -> list[Probe]:
    literal = src.choice([b"NaN", b"Infinity", b"-Infinity"])
    index = src.integer(0, 2)
    msg_type = src.choice(HARMLESS)
    if index == 0:
        encoded = _dumps(forge.header(msg_type))
        raw = encoded[:-1] + b',"x":' + literal + b"}"
    else:
        raw = b'{"x":' + literal + b"}"
    frames = forge.frames(msg_type, raw={index: raw})
    return [Probe("nan", frames, frozenset({"bad_message"}))]


def m_header_field(src, forge: Forge) -> list[Probe]:
    name = src.choice(["msg_id", "msg_type", "session", "date", "version"])
    header = forge.header("ping")
    how = src.integer(0, 2)
    if how == 0:
        del header[name]
    elif how == 1:
        header[name] = _wrong_value(src, str)
        if isinstance(header[name], str):  # "" or too long: still refused
            header[name] = src.choice(["", "a" * 201])
    else:
        header[name] = src.choice(["", "z" * 201])
    return [Probe("header_field", forge.frames(header=header), frozenset({"bad_message"}))]


def m_version(src, forge: Forge) -> list[Probe]:
    version = src.choice(["2.0", "0.9", "99", "x", "10.0", "-1", "1x"])
    frames = forge.frames(header=forge.header("ping", version=version))
    return [Probe("version", frames, frozenset({"version_mismatch"}))]


def m_date(src, forge: Forge) -> list[Probe]:
    if src.integer(0, 1):
        date, expect = (
            src.choice(["yesterday", "2024-13-45", "12:00", "T", "2024-01-01T25:00"]),
            "bad_message",
        )  # noqa: E501
    else:
        offset = src.choice([-3600.0, -301.0, 301.0, 86400.0 * 365, -86400.0 * 3650])
        date, expect = _iso(offset), "replayed"
    frames = forge.frames(header=forge.header("ping", date=date))
    return [Probe("date", frames, frozenset({expect}))]


def m_replay(src, forge: Forge) -> list[Probe]:
    frames = forge.frames(src.choice(HARMLESS))
    return [
        Probe("replay_original", frames, frozenset({OK})),
        Probe("replay", list(frames), frozenset({"replayed"})),
    ]


def m_unknown_type(src, forge: Forge) -> list[Probe]:
    msg_type = src.choice(
        [
            "__init__",
            "__class__",
            "_on_ping",
            "ping_reply",
            "job_done",
            "heartbeat",
            "PING",
            "exec",
            "eval",
            src.text(1, 30),
        ]
    )
    if msg_type in protocol.REQUESTS or not msg_type:
        msg_type = "no-such-request"
    frames = forge.frames(header=forge.header(msg_type))
    return [Probe("unknown_type", frames, frozenset({"unknown_request"}))]


def m_field_type(src, forge: Forge) -> list[Probe]:
    with_fields = [t for t, spec in protocol.REQUESTS.items() if spec["fields"]]
    msg_type = src.choice(with_fields)
    fields = protocol.REQUESTS[msg_type]["fields"]
    content = _valid_content(msg_type, src)
    name = src.choice(list(fields))
    content[name] = _wrong_value(src, fields[name][0])
    frames = forge.frames(msg_type, content, _buffers_for(msg_type, src))
    return [Probe("field_type", frames, frozenset({"bad_message"}))]


def m_missing_required(src, forge: Forge) -> list[Probe]:
    required = [
        (t, n) for t, spec in protocol.REQUESTS.items() for n, (_, r) in spec["fields"].items() if r
    ]
    msg_type, name = src.choice(required)
    content = _valid_content(msg_type, src)
    del content[name]
    frames = forge.frames(msg_type, content, _buffers_for(msg_type, src))
    return [Probe("missing_required", frames, frozenset({"bad_message"}))]


def m_buffer_count(src, forge: Forge) -> list[Probe]:
    msg_type = src.choice(list(protocol.REQUESTS))
    low, high = protocol.REQUESTS[msg_type]["buffers"]
    wrong = [n for n in range(protocol.MAX_BUFFERS + 1) if not low <= n <= high]
    count = src.choice(wrong)
    content = _valid_content(msg_type, src)
    frames = forge.frames(msg_type, content, [src.blob(0, 32) for _ in range(count)])
    return [Probe("buffer_count", frames, frozenset({"bad_message"}))]


def m_bad_values(src, forge: Forge) -> list[Probe]:
    msg_type = src.choice(["jobs", "job", "cancel", "reexport", "generate", "texture"])
    content = _valid_content(msg_type, src)
    buffers = _buffers_for(msg_type, src)
    if msg_type == "jobs":
        content["limit"] = src.choice([0, -1, 10_001, 2**62, -(2**62)])
        expect = {"bad_params"}
    elif msg_type in ("job", "cancel", "reexport"):
        content["job_id"] = src.choice([*TRAVERSAL, src.text(0, 40)])
        if msg_type == "reexport" and src.integer(0, 1):
            content["params"] = {"texture_size": 1024}
        expect = {"not_found"}
    else:
        if src.integer(0, 1):
            content["params"] = {src.text(0, 10): src.json_value(), "resolution": src.json_value()}
        if msg_type == "texture" and src.integer(0, 1):
            content["mesh_format"] = src.choice(["obj", "../glb", "", "GLB ", src.text(0, 8)])
        content["filename"] = src.choice([*TRAVERSAL, src.text(0, 30)])
        expect = {"bad_params", "bad_image", "bad_mesh_input", "image_too_large"}
    return [Probe("bad_values", forge.frames(msg_type, content, buffers), frozenset(expect))]


def m_valid(src, forge: Forge) -> list[Probe]:
    msg_type = src.choice(HARMLESS)
    content = _valid_content(msg_type, src)
    content["x_" + src.text(0, 10)] = src.json_value()  # unknown fields are ignored
    if msg_type == "jobs":
        content["limit"] = src.integer(1, 50)
    parent = src.choice([{}, {"msg_id": src.text(0, 10)}, {"x": src.json_value()}])
    return [Probe("valid", forge.frames(msg_type, content, parent=parent), frozenset({OK}))]


# (mutation, weight): cheap ones often, the megabyte-sized ones rarely.
MUTATIONS: list[tuple[Callable[[Any, Forge], list[Probe]], int]] = [
    (m_garbage, 8),
    (m_truncated, 6),
    (m_no_delimiter, 5),
    (m_truncated_frame, 5),
    (m_bad_signature, 8),
    (m_wrong_key, 8),
    (m_tampered, 6),
    (m_too_many_buffers, 4),
    (m_oversized_json, 1),
    (m_not_json, 6),
    (m_not_object, 5),
    (m_deep_json, 2),
    (m_nan, 4),
    (m_header_field, 6),
    (m_version, 3),
    (m_date, 4),
    (m_replay, 4),
    (m_unknown_type, 5),
    (m_field_type, 10),
    (m_missing_required, 4),
    (m_buffer_count, 6),
    (m_bad_values, 10),
    (m_valid, 6),
]
_TABLE = [m for m, w in MUTATIONS for _ in range(w)]


def draw_case(src, forge: Forge) -> list[Probe]:
    """One fuzz case (one or two messages), drawn with `src`."""
    return src.choice(_TABLE)(src, forge)


def reply_code(content: dict[str, Any]) -> str:
    if content.get("ok") is True:
        return OK
    error = content.get("error")
    return error.get("code", "?") if isinstance(error, dict) else "?"


def now() -> float:
    return time.monotonic()
