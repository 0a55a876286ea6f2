"""Fake meshes: Mesh (vertices, faces) and MeshWithVoxel (plus the PBR attribute volume)."""

from __future__ import annotations

import fake_control
import torch


class Mesh:
    def __init__(self, vertices, faces, vertex_attrs=None):
        self.vertices = vertices.float()
        self.faces = faces.int()
        self.vertex_attrs = vertex_attrs

    @property
    def device(self):
        return self.vertices.device

    def fill_holes(self, max_hole_perimeter=3e-2):
        fake_control.maybe_fail("fill_holes")

    def simplify(self, target=1000000, verbose: bool = False, options: dict = {}):  # noqa: B006
        if self.faces.shape[0] > target:
            self.faces = self.faces[:target]


class MeshWithVoxel(Mesh):
    def __init__(self, vertices, faces, origin, voxel_size, coords, attrs, voxel_shape, layout={}):  # noqa: B006
        self.vertices = vertices.float()
        self.faces = faces.int()
        self.origin = torch.tensor(origin, dtype=torch.float32)
        self.voxel_size = voxel_size
        self.coords = coords
        self.attrs = attrs
        self.voxel_shape = voxel_shape
        self.layout = layout

    def to(self, device, non_blocking=False):
        return MeshWithVoxel(
            self.vertices.to(device),
            self.faces.to(device),
            self.origin.tolist(),
            self.voxel_size,
            self.coords.to(device),
            self.attrs.to(device),
            self.voxel_shape,
            self.layout,
        )
