"""TRELLIS.2 for Blender: the extension's entry point (the add-on lives in blender_addon/)."""

import sys

if "bpy" in sys.modules:  # inside Blender; pytest may import this folder as a plain package
    from .blender_addon import register, unregister  # noqa: F401
