"""Fake flexible-dual-grid conversion: voxels hit by the mesh's vertices (CPU)."""

from __future__ import annotations

import torch


def mesh_to_flexible_dual_grid(
    vertices,
    faces,
    voxel_size=None,
    grid_size=None,
    aabb=None,
    face_weight=1.0,
    boundary_weight=1.0,
    regularization_weight=0.1,
    timing=False,
):
    if timing:
        # The real build dies with SIGSEGV printing its timings (GPU runs 6-7); a fake that
        # crashed the test process would hide which test asked, so it raises instead.
        raise RuntimeError("fake o-voxel: timing=True crashes the real extension (SIGSEGV)")
    if vertices.is_cuda or faces.is_cuda:
        raise RuntimeError("mesh_to_flexible_dual_grid expects CPU tensors")
    aabb = torch.tensor(aabb, dtype=torch.float32)
    scaled = (vertices - aabb[0]) / (aabb[1] - aabb[0]) * grid_size
    idx = scaled.floor().clamp(0, grid_size - 1).int()
    voxel_indices, inverse = torch.unique(idx, dim=0, return_inverse=True)
    dual = torch.zeros(voxel_indices.shape[0], 3).index_add_(0, inverse, scaled)
    dual = dual / torch.bincount(inverse).clamp(min=1)[:, None] / grid_size
    intersected = torch.ones(voxel_indices.shape[0], 3, dtype=torch.bool)
    return voxel_indices, dual, intersected
