"""CPU engines for the add-on's failure paths (registered by import path): one that fails to
load the way a missing TRELLIS.2 install does, and one that fails every job with a chosen error
code (bad input, or a failure that may leave the GPU dirty)."""

from __future__ import annotations

from typing import Any

from backend.errors import BackendError, ErrorCode
from tests.cpu_engines import SlowEngine

LOAD_MESSAGE = "trellis2 is not importable: No module named 'trellis2'"
LOAD_HINT = "Set TRELLIS.2 Checkout in the add-on's preferences to your TRELLIS.2 clone."


class FailLoadEngine(SlowEngine):
    name = "fail-load"
    label = "Engine that cannot load"

    def load(self, progress=None) -> None:
        raise BackendError(ErrorCode.ENGINE_UNAVAILABLE, LOAD_MESSAGE, LOAD_HINT)


class FailJobEngine(SlowEngine):
    """Fails every job in its first stage with `code` (an ErrorCode value)."""

    name = "fail-job"
    label = "Engine that fails jobs"

    def __init__(self, code: str = "empty_alpha", **options: Any):
        super().__init__(**options)
        self.code = ErrorCode(code)

    def run_stage(self, stage, state, params, ctx) -> None:
        raise BackendError(self.code, f"test failure ({self.code.value})")
