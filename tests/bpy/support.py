"""Helpers for the add-on tests: a layout that records what draw() puts on screen, and a loop
that calls the add-on's timer the way Blender would (timers never fire in module mode)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from .conftest import submodule


class FakeLayout:
    """Records what a draw() puts on screen; every call returns another recorder."""

    def __init__(self, log):
        self.log = log

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.log.append((name, args, kwargs))
            return FakeLayout(self.log)

        return call

    def __setattr__(self, name, value):
        if name == "log":
            object.__setattr__(self, name, value)


def draw(panel_cls, context):
    log = []
    panel_cls.draw(SimpleNamespace(layout=FakeLayout(log)), context)
    return log


def operators_in(log):
    return [args[0] for name, args, _ in log if name == "operator"]


def props_in(log):
    return [args[1] for name, args, _ in log if name == "prop"]


def labels_in(log):
    """(text, icon) of every label drawn."""
    return [(kw.get("text", ""), kw.get("icon", "")) for name, _, kw in log if name == "label"]


def progress_in(log):
    return [kw for name, _, kw in log if name == "progress"]


def tick_until(ctrl, done, timeout=60.0, pause=0.02):
    """Call the timer (as Blender would) until done(); returns the intervals it asked for."""
    deadline = time.monotonic() + timeout
    intervals = []
    while not done():
        assert time.monotonic() < deadline, f"timed out ticking: {ctrl.status()} {ctrl.jobs}"
        intervals.append(submodule("runtime").timer())
        time.sleep(pause)
    return intervals
