"""TRELLIS.2 for Blender: the extension's entry point (the add-on lives in blender_addon/)."""

try:
    import bpy  # noqa: F401
except ImportError:  # imported outside Blender (pytest walks up to this package): no add-on
    pass
else:
    from .blender_addon import register, unregister  # noqa: F401
