"""The add-on's Doctor button: `python -m backend doctor` run with the backend's interpreter in
a child process (it may import torch), collected by the tick, and what the last run found.
Plain Python (no bpy); the command line and its environment come from
`backend.supervision.commands`."""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from typing import Any

from ..backend import settings
from ..backend.supervision import commands
from .launch import BackendConfig, bundled_site_dirs
from .wording import one_line

log = logging.getLogger("trellis2_blender")

REMOTE = "Doctor checks this computer's backend; the studio server's admin runs it there"


def doctor_command(config: BackendConfig) -> tuple[list[str], dict[str, str]]:
    """`python -m backend doctor` for these settings: (arguments, environment). The child
    imports this copy of the backend, and with Blender's own Python the extension's wheels."""
    args = commands.doctor_command(
        config.interpreter,
        output_dir=config.output_dir,
        engine=config.engine,
        engine_options=config.engine_options,
        for_blender=True,
    )
    extra = bundled_site_dirs() if config.own_python else []
    return args, commands.backend_environment(extra)


class DoctorRun:
    """One `doctor` in a child process, collected by the tick (`poll()`). Never a traceback:
    a doctor that printed no report is summed up in one line (`output` has all of it)."""

    def __init__(self, config: BackendConfig):
        self.interpreter = config.interpreter
        args, env = doctor_command(config)
        self.report: dict[str, Any] | None = None
        self.text = "Running..."
        self.output = ""
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by poll() or kill()
        self._proc: subprocess.Popen | None = None
        try:
            self._proc = subprocess.Popen(
                args,
                cwd=str(settings.EXTENSION_ROOT),
                env=env,
                stdout=self._out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            self.text = one_line(f"cannot run {self.interpreter}: {exc}")

    def poll(self) -> bool:
        """True once it has finished (then `report` or `text` says how it went)."""
        if self._proc is None:
            self._out.close()
            return True
        if self._proc.poll() is None:
            return False
        self._out.seek(0)
        self.output = self._out.read().decode("utf-8", "replace")
        self._out.close()
        start = self.output.find("{")
        try:
            report = json.loads(self.output[start:]) if start >= 0 else None
        except ValueError:
            report = None
        if not isinstance(report, dict):
            why = one_line(self.output) or f"it exited with code {self._proc.returncode}"
            self.text = one_line(f"Doctor could not run with {self.interpreter}: {why}")
            return True
        for check in report.get("checks") or []:
            if isinstance(check, dict):
                for key in ("detail", "hint", "message"):
                    if key in check:
                        check[key] = one_line(check[key], 300)
        self.report = report
        self.text = "OK" if report.get("ok") else "Problems found"
        return True

    def kill(self) -> None:
        """Stop it now (unregister, quitting): waits for the process to go."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._out.close()


class Doctor:
    """At most one doctor run at a time, and what the last one found: `text` (one line for the
    panel) and `report` (the checks, or None)."""

    def __init__(self) -> None:
        self.report: dict[str, Any] | None = None
        self.text = ""
        self._run: DoctorRun | None = None

    @property
    def running(self) -> bool:
        return self._run is not None

    def start(self, config: BackendConfig) -> None:
        """Run it in the background (returns at once); a run already going is kept."""
        if self._run is not None:
            return
        if config.remote:
            self.text = REMOTE
            return
        self._run = DoctorRun(config)
        self.text, self.report = "Running...", None

    def poll(self) -> bool:
        """True when a run has just finished (the tick redraws)."""
        run = self._run
        if run is None or not run.poll():
            return False
        self._run = None
        self.report, self.text = run.report, run.text
        if run.report is None:
            log.warning("doctor printed no report:\n%s", run.output)
        return True

    def kill(self) -> None:
        if self._run is not None:
            self._run.kill()
            self._run = None

    def forget(self) -> None:
        """No report and no line (a new test, a new session)."""
        self.report, self.text = None, ""
