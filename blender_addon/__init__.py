"""TRELLIS.2 for Blender: the add-on (bpy layer). Backend work happens in another process."""

from __future__ import annotations

from . import operators, panel, preferences, properties, runtime

_modules = (preferences, properties, operators, panel)


def register() -> None:
    for module in _modules:
        module.register()
    runtime.start()


def unregister() -> None:
    runtime.stop()
    for module in reversed(_modules):
        module.unregister()
