"""Fake o_voxel: `convert.mesh_to_flexible_dual_grid` and `postprocess.to_glb`."""

from . import convert, postprocess  # noqa: F401
