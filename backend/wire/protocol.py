"""Wire protocol, sans I/O: signed multipart envelopes, message types and the connection file.

Nothing here touches a socket. `Session.serialize` turns a Message into frames and
`Session.deserialize` turns frames back into a Message or raises a typed ProtocolError. The
server and client wrap these with ZeroMQ. See docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import BackendError, ErrorCode, ProtocolError
from ..safefs import read_file, write_file

PROTOCOL_VERSION = "1.2"  # 1.1: jobs paging/search/disk use, delete_jobs; 1.2: fetch
DELIMITER = b"<TRELLIS2|MSG>"
SIGNATURE_SCHEME = "hmac-sha256"

# Limits on what a peer may send (the server also sets ZMQ_MAXMSGSIZE per frame).
MAX_JSON_FRAME = 1 << 20  # header, parent and content frames
MAX_BUFFER_FRAME = 96 << 20  # one binary frame (an image or a mesh)
MAX_BUFFERS = 4
MAX_MESSAGE_AGE = 300.0  # seconds; older messages are treated as replays
REPLAY_WINDOW = 65_536  # message ids remembered
MAX_HEADER_FIELD = 200  # characters of msg_id, msg_type, session, date, version
FETCH_DEFAULT = 1 << 20  # bytes per `fetch` chunk unless asked for less
FETCH_MAX = 4 << 20  # the most one `fetch` reply carries
# A job id, as every request, reply and event names it (the job store names folders so).
JOB_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}\Z")
# A file `fetch` may name: one plain name of the job's folder (no path, no hidden file).
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}\Z")

REQUESTS: dict[str, dict[str, Any]] = {
    # msg_type: {"fields": {name: (types, required)}, "buffers": (min, max)}
    "hello": {"fields": {"client": (str, False)}, "buffers": (0, 0)},
    "ping": {"fields": {}, "buffers": (0, 0)},
    "status": {"fields": {}, "buffers": (0, 0)},
    # `idempotency_key`: a request resent with the same key gets the job the first one made.
    "generate": {
        "fields": {
            "params": (dict, False),
            "filename": (str, False),
            "idempotency_key": (str, False),
        },
        "buffers": (1, 1),
    },
    "texture": {
        "fields": {
            "params": (dict, False),
            "filename": (str, False),
            "mesh_format": (str, True),
            "idempotency_key": (str, False),
        },
        "buffers": (2, 2),
    },
    "reexport": {
        "fields": {"job_id": (str, True), "params": (dict, False), "idempotency_key": (str, False)},
        "buffers": (0, 0),
    },
    "cancel": {"fields": {"job_id": (str, True)}, "buffers": (0, 0)},
    "jobs": {
        # `offset` pages by position; `before` (the `next` of the previous page) by job id.
        "fields": {
            "limit": (int, False),
            "offset": (int, False),
            "query": (str, False),
            "before": (str, False),
        },
        "buffers": (0, 0),
    },
    # Remove finished jobs' folders: one job, or every job older than N days.
    "delete_jobs": {
        "fields": {
            "job_id": (str, False),
            "older_than_days": (int, False),
            "dry_run": (bool, False),
        },
        "buffers": (0, 0),
    },
    "job": {"fields": {"job_id": (str, True), "log": (bool, False)}, "buffers": (0, 0)},
    # One chunk of one file of a job folder (backend/store/fetch.py): results without a shared disk.
    "fetch": {
        "fields": {
            "job_id": (str, True),
            "name": (str, True),
            "offset": (int, False),
            "length": (int, False),
        },
        "buffers": (0, 0),
    },
    "stats": {"fields": {}, "buffers": (0, 0)},
    "doctor": {"fields": {}, "buffers": (0, 0)},
    "shutdown": {"fields": {"reason": (str, False)}, "buffers": (0, 0)},
    # A warm standby backend takes over: it recovers the job store's queue and starts work.
    # `predecessor` {pid, why, log_path}: the backend that went before it (backendlogs.py).
    "activate": {"fields": {"predecessor": (dict, False)}, "buffers": (0, 0)},
}

EVENTS = (
    "job_queued",
    "job_started",
    "job_progress",
    "job_retry",
    "job_done",
    "job_failed",
    "job_cancelled",
    "backend_state",
    "heartbeat",
)


def reply_type(request_type: str) -> str:
    return f"{request_type}_reply"


def _now_iso(clock: Callable[[], float]) -> str:
    return datetime.fromtimestamp(clock(), tz=timezone.utc).isoformat(timespec="microseconds")


def _parse_iso(text: str) -> float:
    """A date and time with a UTC offset. A date alone, a week date or a naive time (which
    Python would read in the receiver's time zone) is a ValueError."""
    when = datetime.fromisoformat(text)
    if "T" not in text or when.tzinfo is None:
        raise ValueError(text)
    return when.timestamp()


@dataclass(frozen=True)
class Message:
    header: dict[str, Any]
    parent: dict[str, Any]
    content: dict[str, Any]
    buffers: tuple[bytes, ...] = ()

    @property
    def msg_type(self) -> str:
        return self.header["msg_type"]

    @property
    def msg_id(self) -> str:
        return self.header["msg_id"]

    @property
    def session(self) -> str:
        return self.header["session"]

    @property
    def parent_id(self) -> str | None:
        return self.parent.get("msg_id")


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def encode(content: dict[str, Any]) -> bytes:
    """A content frame as `Session.serialize` encodes it (compact JSON, no NaN): for content
    encoded by another process and sent with `Session.serialize_encoded`."""
    return _encode(content)


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON: accepted here, they would break every reply that echoes
    # the header (replies are encoded with allow_nan=False).
    raise ValueError(f"{name} is not valid JSON")


def _decode_json_frame(frame: bytes, what: str) -> dict[str, Any]:
    if len(frame) > MAX_JSON_FRAME:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{what} frame is {len(frame)} bytes")
    try:
        value = json.loads(frame.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting recurses
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{what} must be a JSON object")
    return value


class ReplayGuard:
    """Remembers message ids until their date can no longer pass the age check; a second
    sighting, or a date outside the window, is a replay. Memory stays bounded by the message
    rate over MAX_MESSAGE_AGE (and by `window` ids at most)."""

    def __init__(self, window: int = REPLAY_WINDOW, max_age: float = MAX_MESSAGE_AGE):
        self.window = window
        self.max_age = max_age
        self._seen: OrderedDict[str, float] = OrderedDict()  # msg_id -> when it may be forgotten
        self._lock = threading.Lock()  # the loop and the intake lane both check

    def check(self, msg_id: str, sent_at: float, now: float) -> None:
        with self._lock:
            self._check(msg_id, sent_at, now)

    def _check(self, msg_id: str, sent_at: float, now: float) -> None:
        if now - sent_at > self.max_age or sent_at - now > self.max_age:
            raise ProtocolError(
                ErrorCode.REPLAYED,
                f"message date {sent_at - now:+.0f} s from the receiver's clock "
                f"(at most {self.max_age:.0f} s either way)",
                "Check that the clocks of both computers are right, then send again.",
            )
        if msg_id in self._seen:
            raise ProtocolError(ErrorCode.REPLAYED, f"message {msg_id} was already received")
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)  # its date would be refused as stale anyway
        self._seen[msg_id] = sent_at + self.max_age
        if len(self._seen) > self.window:
            self._seen.popitem(last=False)


class Session:
    """Builds, signs, serializes and verifies messages for one endpoint.

    `session_id` is new for every backend process so clients notice a restart.
    """

    def __init__(
        self,
        key: bytes | str,
        session_id: str | None = None,
        clock: Callable[[], float] = time.time,
        replay_guard: ReplayGuard | None = None,
    ):
        if isinstance(key, str):
            key = key.encode("ascii")
        if not key:
            raise ValueError("an empty signing key would disable authentication")
        self.key = key
        self.session_id = session_id or uuid.uuid4().hex
        self.clock = clock
        self.replay = replay_guard or ReplayGuard()

    def msg(
        self,
        msg_type: str,
        content: dict[str, Any] | None = None,
        parent: Message | dict[str, Any] | None = None,
        buffers: Sequence[bytes] = (),
    ) -> Message:
        header = {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "session": self.session_id,
            "date": _now_iso(self.clock),
            "version": PROTOCOL_VERSION,
        }
        parent_header = parent.header if isinstance(parent, Message) else dict(parent or {})
        return Message(header, parent_header, dict(content or {}), tuple(bytes(b) for b in buffers))

    def sign(self, frames: Sequence[bytes]) -> bytes:
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for frame in frames:
            # Length-prefix each frame so moving bytes across a boundary changes the digest.
            mac.update(len(frame).to_bytes(8, "big"))
            mac.update(frame)
        return mac.hexdigest().encode("ascii")

    def serialize(self, message: Message) -> list[bytes]:
        body = [_encode(message.header), _encode(message.parent), _encode(message.content)]
        body.extend(message.buffers)
        return [DELIMITER, self.sign(body), *body]

    def serialize_encoded(
        self,
        msg_type: str,
        content: bytes,
        parent: Message | dict[str, Any] | None = None,
        buffers: Sequence[bytes] = (),
    ) -> list[bytes]:
        """The frames of a message whose content is already encoded (a JSON object made by
        another process: the backend's reader): sent as given, and the signature is over
        exactly those bytes. Raises ValueError for content that is not a JSON object's
        encoding as far as a cheap look can tell (its first and last byte)."""
        content = bytes(content)
        if content[:1] != b"{" or content[-1:] != b"}":
            raise ValueError("content is not an encoded JSON object")
        message = self.msg(msg_type, None, parent, buffers)
        body = [_encode(message.header), _encode(message.parent), content, *message.buffers]
        return [DELIMITER, self.sign(body), *body]

    def deserialize(self, frames: Sequence[bytes], check_replay: bool = True) -> Message:
        """Verify and decode frames that start at the delimiter. Raises ProtocolError."""
        if len(frames) < 5 or frames[0] != DELIMITER:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "not a TRELLIS.2 envelope")
        if len(frames) - 5 > MAX_BUFFERS:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(frames) - 5} binary frames")
        signature, body = frames[1], list(frames[2:])
        for buffer in body[3:]:
            if len(buffer) > MAX_BUFFER_FRAME:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"binary frame of {len(buffer)} bytes")
        if not hmac.compare_digest(signature, self.sign(body)):
            raise ProtocolError(ErrorCode.BAD_SIGNATURE, "invalid or missing signature")
        header = _decode_json_frame(body[0], "header")
        parent = _decode_json_frame(body[1], "parent header")
        content = _decode_json_frame(body[2], "content")
        _check_header(header)
        if check_replay:
            try:
                sent_at = _parse_iso(header["date"])
            except (TypeError, ValueError):
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE, "header date is not an ISO 8601 time with a UTC offset"
                ) from None
            self.replay.check(header["msg_id"], sent_at, self.clock())
        return Message(header, parent, content, tuple(bytes(b) for b in body[3:]))


def _check_header(header: dict[str, Any]) -> None:
    for name in ("msg_id", "msg_type", "session", "date", "version"):
        if not isinstance(header.get(name), str) or not header[name]:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"header.{name} missing or not a string")
        if len(header[name]) > MAX_HEADER_FIELD:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"header.{name} too long")
    major = header["version"].split(".", 1)[0]
    if major != PROTOCOL_VERSION.split(".", 1)[0]:
        raise ProtocolError(
            ErrorCode.VERSION_MISMATCH,
            f"protocol {header['version']} is not compatible with {PROTOCOL_VERSION}",
        )


def check_request(message: Message, requests: dict[str, dict[str, Any]] = REQUESTS) -> None:
    """Check a request's type, content fields and buffer count against REQUESTS (or another
    table in the same form: the gateway's, backend/studio/jobdesk.py)."""
    spec = requests.get(message.msg_type)
    if spec is None:
        raise ProtocolError(ErrorCode.UNKNOWN_REQUEST, f"unknown request {message.msg_type!r}")
    if "id" in message.content and "job_id" in spec["fields"]:
        # One name for a job's id everywhere: `id` here would be ignored, and the request
        # would act on no job or on the wrong one.
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"{message.msg_type}: the job is named by job_id, not id"
        )
    for name, (kind, required) in spec["fields"].items():
        if name not in message.content:
            if required:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{message.msg_type}: {name} missing")
            continue
        value = message.content[name]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"{message.msg_type}: {name} must be {kind.__name__}",
            )
    low, high = spec["buffers"]
    if not low <= len(message.buffers) <= high:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"{message.msg_type} takes {low}..{high} binary frames, got {len(message.buffers)}",
        )


def readable_header(frames: Sequence[bytes]) -> dict[str, str]:
    """The header of a refused request, as far as it can be read (frames from the delimiter
    on), so an `error_reply` can name the request it answers: the standard string fields
    only, whatever the signature says, and whatever their length (a field too long is a reason
    to refuse, and the client still needs its msg_id to match the refusal; the frame limit
    bounds them). {} when there is no readable header."""
    if len(frames) < 3 or frames[0] != DELIMITER:
        return {}
    try:
        header = _decode_json_frame(frames[2], "header")
    except ProtocolError:
        return {}
    return {
        name: header[name]
        for name in ("msg_id", "msg_type", "session", "date", "version")
        if isinstance(header.get(name), str)
    }


def ok_reply(**content: Any) -> dict[str, Any]:
    return {"ok": True, **content}


def error_reply(error: BackendError) -> dict[str, Any]:
    return {"ok": False, "error": error.to_dict()}


# --- connection file -------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionInfo:
    shell_port: int
    iopub_port: int
    key: str
    session: str
    pid: int
    transport: str = "tcp"
    ip: str = "127.0.0.1"
    signature_scheme: str = SIGNATURE_SCHEME
    version: str = PROTOCOL_VERSION
    engine: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def endpoint(self, port: int) -> str:
        return f"{self.transport}://{self.ip}:{port}"

    @property
    def shell_url(self) -> str:
        return self.endpoint(self.shell_port)

    @property
    def iopub_url(self) -> str:
        return self.endpoint(self.iopub_port)


def new_key() -> str:
    return secrets.token_hex(32)


def write_connection_file(path: str | Path, info: ConnectionInfo) -> Path:
    """Write atomically with owner-only permissions (0600) from the first byte, never through
    a link, in a folder that is made 0700 (an existing one must be ours, and loses group and
    other access, or be a shared sticky folder such as /tmp)."""
    path = Path(path)
    write_file(path, json.dumps(asdict(info), indent=2).encode("utf-8"))
    return path


def read_connection_file(path: str | Path) -> ConnectionInfo:
    """Read a connection file; one that is a link or another user's is refused."""
    path = Path(path)
    try:
        data = json.loads(read_file(path, MAX_JSON_FRAME).decode("utf-8"))
    except FileNotFoundError:
        raise BackendError(
            ErrorCode.NOT_FOUND,
            f"no connection file at {path}",
            "Start the backend first (python -m backend serve --connection-file ...).",
        ) from None
    except (OSError, ValueError) as exc:
        raise BackendError(
            ErrorCode.BAD_MESSAGE, f"unreadable connection file {path}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise BackendError(ErrorCode.BAD_MESSAGE, f"connection file {path} is not an object")
    if data.get("signature_scheme") != SIGNATURE_SCHEME:
        raise BackendError(
            ErrorCode.BAD_MESSAGE, f"unsupported signature scheme {data.get('signature_scheme')!r}"
        )
    known = {f for f in ConnectionInfo.__dataclass_fields__}
    try:
        return ConnectionInfo(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise BackendError(
            ErrorCode.BAD_MESSAGE, f"incomplete connection file {path}: {exc}"
        ) from None
