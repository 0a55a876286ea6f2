"""Fake sparse tensor: per-voxel features with [batch, x, y, z] integer coordinates."""

from __future__ import annotations

import fake_control
import torch


class SparseTensor:
    def __init__(self, feats=None, coords=None, shape=None, **kwargs):
        if feats is None or coords is None:
            raise TypeError("SparseTensor needs feats and coords")
        if feats.shape[0] != coords.shape[0]:
            raise ValueError("feats and coords disagree on the number of voxels")
        self.feats = feats
        self.coords = coords
        self._placement = kwargs.get("_placement", "cpu")

    @property
    def shape(self) -> torch.Size:
        batch = int(self.coords[:, 0].max()) + 1 if self.coords.shape[0] else 1
        return torch.Size([batch, *self.feats.shape[1:]])

    @property
    def spatial_shape(self) -> torch.Size:
        if self.coords.shape[0] == 0:
            return torch.Size([0, 0, 0])
        return torch.Size((self.coords[:, 1:].max(0).values + 1).tolist())

    @property
    def device(self):
        return self.feats.device

    @property
    def dtype(self):
        return self.feats.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def replace(self, feats, coords=None) -> SparseTensor:
        return SparseTensor(
            feats=feats,
            coords=self.coords if coords is None else coords,
            _placement=self._placement,
        )

    def to(self, *args, **kwargs) -> SparseTensor:
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                device = a
        feats = self.feats.to(dtype) if dtype is not None else self.feats
        placement = fake_control.placement_of(device) if device is not None else self._placement
        return SparseTensor(feats=feats, coords=self.coords, _placement=placement)

    def cpu(self) -> SparseTensor:
        return self.to("cpu")

    def cuda(self) -> SparseTensor:
        return self.to("cuda")

    def float(self) -> SparseTensor:
        return self.replace(self.feats.float())

    def _other(self, other):
        return other.feats if isinstance(other, SparseTensor) else other

    def __add__(self, other):
        return self.replace(self.feats + self._other(other))

    __radd__ = __add__

    def __sub__(self, other):
        return self.replace(self.feats - self._other(other))

    def __mul__(self, other):
        return self.replace(self.feats * self._other(other))

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self.replace(self.feats / self._other(other))

    def __neg__(self):
        return self.replace(-self.feats)

    def __repr__(self) -> str:
        return f"SparseTensor(n={self.feats.shape[0]}, c={self.feats.shape[1:]})"
