"""Typed error codes that travel over the wire, each with a default hint for the user."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    # protocol
    BAD_MESSAGE = "bad_message"
    BAD_SIGNATURE = "bad_signature"
    REPLAYED = "replayed"
    UNKNOWN_REQUEST = "unknown_request"
    VERSION_MISMATCH = "version_mismatch"
    TOO_LARGE = "too_large"
    BAD_PARAMS = "bad_params"
    # jobs and queue
    BUSY = "busy"
    NOT_FOUND = "not_found"
    CANCELLED = "cancelled"
    SHUTTING_DOWN = "shutting_down"
    # inputs
    BAD_IMAGE = "bad_image"
    IMAGE_TOO_LARGE = "image_too_large"
    EMPTY_ALPHA = "empty_alpha"
    NEEDS_TRANSPARENCY = "needs_transparency"
    BAD_MESH_INPUT = "bad_mesh_input"
    # resources
    DISK_FULL = "disk_full"
    OUTPUT_UNWRITABLE = "output_unwritable"  # read-only, deleted, or holding a planted link
    OUTPUT_LOCKED = "output_locked"  # another supervisor or backend owns the output folder
    OUT_OF_MEMORY = "out_of_memory"
    GPU_POISONED = "gpu_poisoned"
    GPU_HUNG = "gpu_hung"
    # outputs
    INVALID_MESH = "invalid_mesh"
    INVALID_GLB = "invalid_glb"
    EMPTY_STRUCTURE = "empty_structure"
    # engine / environment
    ENGINE_UNAVAILABLE = "engine_unavailable"
    ENGINE_ERROR = "engine_error"
    WEIGHTS_MISMATCH = "weights_mismatch"
    BACKEND_DIED = "backend_died"
    INTERNAL = "internal"


# (hint, retryable) per code; a raise site may give a more specific hint.
_DEFAULTS: dict[ErrorCode, tuple[str, bool]] = {
    ErrorCode.BAD_MESSAGE: (
        "The client and backend disagree on the message format; update both.",
        False,
    ),
    ErrorCode.BAD_SIGNATURE: (
        "The message was not signed with this backend's key; reconnect.",
        False,
    ),
    ErrorCode.REPLAYED: ("This message id was already seen; send a fresh message.", False),
    ErrorCode.UNKNOWN_REQUEST: (
        "The backend does not know this request; update the backend.",
        False,
    ),
    ErrorCode.VERSION_MISMATCH: (
        "Client and backend protocol versions differ; update both.",
        False,
    ),
    ErrorCode.TOO_LARGE: ("The message is larger than the backend accepts.", False),
    ErrorCode.BAD_PARAMS: (
        "The message names the value that is not accepted; change it and send again.",
        False,
    ),
    ErrorCode.BUSY: ("The job queue is full; wait for a job to finish and try again.", True),
    ErrorCode.NOT_FOUND: ("No such job; it may have been deleted from the output folder.", False),
    ErrorCode.CANCELLED: ("The job was cancelled.", False),
    ErrorCode.SHUTTING_DOWN: ("The backend is shutting down; start it again.", True),
    ErrorCode.BAD_IMAGE: ("Use a PNG, JPEG or WebP image that opens in an image viewer.", False),
    ErrorCode.IMAGE_TOO_LARGE: (
        "Scale the image down (for example to 2048 px) and try again.",
        False,
    ),
    ErrorCode.EMPTY_ALPHA: (
        "The image's alpha channel hides everything; use an image with a visible subject.",
        False,
    ),
    ErrorCode.NEEDS_TRANSPARENCY: (
        "Use an image with a transparent background, or set up background removal.",
        False,
    ),
    ErrorCode.BAD_MESH_INPUT: ("Use a GLB or PLY file with at least one triangle.", False),
    ErrorCode.DISK_FULL: ("Free some disk space or choose another output folder.", True),
    ErrorCode.OUTPUT_UNWRITABLE: (
        "Make the output folder writable, or choose another one; the backend resumes by itself "
        "once it can write there.",
        True,
    ),
    ErrorCode.OUTPUT_LOCKED: (
        "Another backend uses this output folder: connect to it, or choose another folder.",
        False,
    ),
    ErrorCode.OUT_OF_MEMORY: (
        "Out of GPU memory even at the lowest quality; close other GPU programs or use 'fast'.",
        True,
    ),
    ErrorCode.GPU_POISONED: ("The GPU context broke; the backend restarts itself.", True),
    ErrorCode.GPU_HUNG: ("The GPU stopped answering; restart the backend.", True),
    ErrorCode.INVALID_MESH: ("The generated mesh was broken; try another seed.", True),
    ErrorCode.INVALID_GLB: ("The exported file was broken; try again or report a bug.", True),
    ErrorCode.EMPTY_STRUCTURE: (
        "Nothing was generated; try another seed or an image with a clearer subject.",
        True,
    ),
    ErrorCode.ENGINE_UNAVAILABLE: ("Run `python -m backend doctor` to see what is missing.", False),
    ErrorCode.ENGINE_ERROR: ("See the job's log excerpt for details.", True),
    ErrorCode.WEIGHTS_MISMATCH: (
        "The weights do not match the code; download the weights again.",
        False,
    ),
    ErrorCode.BACKEND_DIED: ("The backend process died; it was restarted.", True),
    ErrorCode.INTERNAL: ("This is a bug; see the backend log.", False),
}


def default_hint(code: ErrorCode) -> str:
    return _DEFAULTS[code][0]


def is_retryable(code: ErrorCode) -> bool:
    return _DEFAULTS[code][1]


class BackendError(Exception):
    """An error with a wire code, a message for people and a one-line hint."""

    def __init__(self, code: ErrorCode, message: str, hint: str | None = None):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.hint = hint if hint is not None else default_hint(self.code)

    @property
    def retryable(self) -> bool:
        return is_retryable(self.code)

    def to_dict(self) -> dict:
        return {
            "code": self.code.value,
            "message": self.message,
            "hint": self.hint,
            "retryable": self.retryable,
        }

    @classmethod
    def from_dict(cls, data: dict) -> BackendError:
        try:
            code = ErrorCode(data.get("code"))
        except ValueError:
            code = ErrorCode.INTERNAL
        return cls(code, str(data.get("message", "")), data.get("hint"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value!r}, {self.message!r})"


class ProtocolError(BackendError):
    """A message that cannot be accepted (unsigned, malformed, replayed, too large)."""


class InputError(BackendError):
    """A user input (image, mesh, parameters) that cannot be used."""


class OutputError(BackendError):
    """A generated mesh or GLB that failed validation; never reported as success."""


class JobCancelled(BackendError):
    def __init__(self, message: str = "Cancelled by the user"):
        super().__init__(ErrorCode.CANCELLED, message)


def describe(exc: BaseException) -> str:
    """An exception's text for a message to the user: its text, or its type, at most 200
    characters."""
    text = str(exc).strip() or type(exc).__name__
    return text[:200]
