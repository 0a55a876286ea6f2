"""Fault-injecting CPU engines for the fault tests (registered by import path)."""

from __future__ import annotations

import os
import time
from typing import Any

from backend.engines.base import StageContext
from backend.params import GenerationParams
from tests.cpu_engines import SlowEngine


class OnceFaultEngine(SlowEngine):
    """The SlowEngine, plus one fault at REL_FAULT_STAGE the first time only: the engine
    creates REL_FAULT_MARKER before the fault, so the retry on a fresh backend runs clean.
    REL_FAULT_MODE: `hang` (sleeps an hour) or `fill` (writes REL_FAULT_BYTES into the job's
    output file, as a huge GLB would, until the disk is full)."""

    name = "once-fault"

    def run_stage(
        self, stage: str, state: dict[str, Any], params: GenerationParams, ctx: StageContext
    ) -> None:
        marker = os.environ.get("REL_FAULT_MARKER")
        if stage == os.environ.get("REL_FAULT_STAGE") and marker and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            mode = os.environ.get("REL_FAULT_MODE", "hang")
            if mode == "hang":
                time.sleep(3600)
            elif mode == "fill":
                chunk = b"\x00" * (1 << 20)
                with open(state["output_path"], "wb") as f:
                    for _ in range(int(os.environ.get("REL_FAULT_BYTES", str(64 << 20))) >> 20):
                        f.write(chunk)
                        f.flush()
        super().run_stage(stage, state, params, ctx)


# -- disk faults in a backend process -------------------------------------------------------
# REL_FS_FAULT names a control file. While it holds "<ERRNO> [name]" (e.g. "ENOSPC job.json"),
# every change to the disk through backend.safefs (of that file name only, if one is given)
# fails with that errno, as on a full or read-only disk. Installed when the backend imports an
# engine from this module, which it does before it touches the output folder.


def _disk_fault(operation: str, path) -> None:
    try:
        with open(os.environ["REL_FS_FAULT"], encoding="ascii") as f:
            words = f.read().split()
    except (OSError, KeyError):
        return
    if not words:
        return
    name = words[1] if len(words) > 1 else None
    target = os.path.basename(str(path))
    if name is None or target == name or target.startswith(f".{name}."):
        import errno

        code = getattr(errno, words[0])
        raise OSError(code, os.strerror(code), str(path))


if os.environ.get("REL_FS_FAULT"):
    from backend import safefs

    safefs.fault = _disk_fault


class FaultFsEngine(SlowEngine):
    """The SlowEngine in a backend whose disk writes fail on demand (REL_FS_FAULT)."""

    name = "fault-fs"
