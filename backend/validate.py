"""The checks of what enters and leaves the backend, under their old names: images
(`images.py`), generated meshes (`meshcheck.py`) and GLB files (`glbcheck.py`). New code imports
those modules; this one stays for the runner, which imports `validate` by this name."""

from __future__ import annotations

from .glbcheck import validate_glb, validate_glb_file
from .images import ImageLimits, has_usable_alpha, load_image
from .meshcheck import validate_mesh

__all__ = [
    "ImageLimits",
    "has_usable_alpha",
    "load_image",
    "validate_glb",
    "validate_glb_file",
    "validate_mesh",
]
