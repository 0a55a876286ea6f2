"""TRELLIS.2 for Blender: the backend process (no bpy here)."""

__version__ = "0.1.0"
