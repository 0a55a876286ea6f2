"""Fake model classes (tiny, CPU) and `from_pretrained` with the real loader's semantics:
local if `<path>.json` and `<path>.safetensors` exist, weights loaded with strict=False."""

from __future__ import annotations

import json
import os

import fake_control
import torch
import torch.nn.functional as F
import trimesh
from torch import nn

from ..modules.sparse import SparseTensor


class _Placed(nn.Module):
    """Records the device a move asks for; the tensors stay on the CPU."""

    placement = "cpu"

    def to(self, *args, **kwargs):
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                device = a
        if device is not None:
            self.placement = fake_control.placement_of(device)
        if dtype is not None:
            super().to(dtype=dtype)
        return self

    def cpu(self):
        self.placement = "cpu"
        return self

    def cuda(self, device=None):
        self.placement = "cuda"
        return self

    @property
    def device(self):
        return torch.device("cpu")


class SparseStructureFlowModel(_Placed):
    def __init__(
        self,
        resolution,
        in_channels,
        out_channels,
        model_channels,
        cond_channels,
        num_blocks=1,
        num_heads=2,
        **kwargs,
    ):
        super().__init__()
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.cond_proj = nn.Linear(cond_channels, model_channels)
        self.out_layer = nn.Linear(model_channels, out_channels)
        # Like the real one: a buffer computed here, which released checkpoints need not hold.
        self.register_buffer("rope_phases", torch.arange(resolution**3, dtype=torch.float32))

    # Like the real model: no **kwargs, so an unknown sampler key raises TypeError here.
    def forward(self, x, t, cond):
        fake_control.count("sparse_structure")
        fake_control.maybe_fail("sparse_structure")
        if cond.shape[0] != x.shape[0]:
            raise AssertionError("batch sizes of x and cond differ")
        h = (
            self.input_layer(x.permute(0, 2, 3, 4, 1))
            + self.cond_proj(cond.mean(1))[:, None, None, None]
        )
        return self.out_layer(torch.tanh(h)).permute(0, 4, 1, 2, 3) * 0.1


class SparseStructureDecoder(_Placed):
    def __init__(self, out_channels, latent_channels, num_res_blocks, channels, **kwargs):
        super().__init__()
        self.upsample = 2 ** (len(channels) - 1)
        self.input_layer = nn.Linear(latent_channels, channels[0])
        self.out_layer = nn.Linear(channels[-1], out_channels)

    def forward(self, z):
        fake_control.count("ss_decoder")
        res = z.shape[-1] * self.upsample
        axis = torch.arange(res, dtype=torch.float32) - (res - 1) / 2
        gx, gy, gz = torch.meshgrid(axis, axis, axis, indexing="ij")
        dist = torch.sqrt(gx**2 + gy**2 + gz**2)
        radius = res * 0.14 + torch.tanh(z.float().mean())
        logits = 1.5 - (dist - radius).abs()
        if fake_control.EMPTY_STRUCTURE:
            logits = torch.full_like(logits, -1.0)
        return logits[None, None].expand(z.shape[0], 1, res, res, res)


class SLatFlowModel(_Placed):
    def __init__(
        self,
        resolution,
        in_channels,
        out_channels,
        model_channels,
        cond_channels,
        num_blocks=1,
        num_heads=2,
        **kwargs,
    ):
        super().__init__()
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.role = "texture" if in_channels != out_channels else "shape"
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.cond_proj = nn.Linear(cond_channels, model_channels)
        self.out_layer = nn.Linear(model_channels, out_channels)

    # Like the real SLatFlowModel: extra keyword arguments are accepted and ignored.
    def forward(self, x, t, cond, concat_cond=None, **kwargs):
        fake_control.count(self.role)
        fake_control.maybe_fail(self.role)
        feats = x.feats
        if concat_cond is not None:
            feats = torch.cat([feats, concat_cond.feats], dim=1)
        h = self.input_layer(feats) + self.cond_proj(cond.mean(1))[x.coords[:, 0].long()]
        h = h + self._attend(h)
        return x.replace(self.out_layer(torch.tanh(h)) * 0.1)

    def _attend(self, h):
        """Self-attention over the voxels through the real dispatch path (two heads)."""
        from ..modules.sparse.attention import sparse_scaled_dot_product_attention

        t, c = h.shape
        qkv = h.reshape(t, 1, 2, c // 2).expand(t, 3, 2, c // 2).contiguous()
        return sparse_scaled_dot_product_attention(qkv).reshape(t, c)


ElasticSLatFlowModel = SLatFlowModel


def _levels_ok(model_channels) -> bool:
    return isinstance(model_channels, (list, tuple)) and len(model_channels) >= 2


class FlexiDualGridVaeDecoder(_Placed):
    def __init__(
        self, resolution, model_channels, latent_channels, out_channels, num_blocks, **kwargs
    ):
        if "pred_subdiv" in kwargs:
            raise TypeError("FlexiDualGridVaeDecoder got an unexpected keyword 'pred_subdiv'")
        super().__init__()
        self.resolution = resolution
        self.levels = len(model_channels)
        self.low_vram = False
        self.from_latent = nn.Linear(latent_channels, model_channels[0])
        self.output_layer = nn.Linear(model_channels[-1], out_channels)

    def set_resolution(self, resolution: int) -> None:
        self.resolution = resolution

    def upsample(self, x, upsample_times: int):
        """Coordinates after `upsample_times` x2 subdivisions (None if the net is too shallow)."""
        if upsample_times > self.levels - 1:
            return None
        factor = 2**upsample_times
        step = max(1, factor // 4)
        offsets = torch.stack(
            torch.meshgrid(*[torch.arange(0, factor, step)] * 3, indexing="ij"), -1
        ).reshape(-1, 3)
        coords = x.coords
        children = coords[:, None, 1:] * factor + offsets[None]
        batch = coords[:, None, :1].expand(-1, offsets.shape[0], 1)
        return torch.cat([batch, children], -1).reshape(-1, 4)

    def forward(self, x, return_subs: bool = False):
        fake_control.count("decode")
        fake_control.maybe_fail("decode")
        grid = x.coords[:, 1:].float()
        extent = float(grid.max() - grid.min() + 1) if grid.shape[0] else 1.0
        # Like the real decoder, positions are in units of the resolution it was set to: a
        # latent decoded at the wrong resolution comes out at the wrong place and size.
        spatial = self.resolution / 16
        center = ((grid.min(0).values + grid.max(0).values + 1) / 2 / spatial - 0.5).tolist()
        sphere = trimesh.creation.icosphere(subdivisions=2, radius=min(0.45, extent / spatial / 2))
        vertices = torch.tensor(sphere.vertices, dtype=torch.float32) + torch.tensor(center)
        faces = torch.tensor(sphere.faces, dtype=torch.int32)
        from ..representations import Mesh

        meshes = [Mesh(vertices, faces)]
        subs = [x.replace(x.feats, coords=x.coords.clone())]
        return (meshes, subs) if return_subs else meshes


class SparseUnetVaeDecoder(_Placed):
    def __init__(
        self,
        resolution,
        model_channels,
        latent_channels,
        out_channels,
        num_blocks,
        pred_subdiv=True,
        **kwargs,
    ):
        super().__init__()
        self.pred_subdiv = pred_subdiv
        self.from_latent = nn.Linear(latent_channels, model_channels[0])
        self.output_layer = nn.Linear(model_channels[0], out_channels)

    def forward(self, x, guide_subs=None):
        fake_control.count("tex_decode")
        h = torch.tanh(self.output_layer(torch.tanh(self.from_latent(x.feats))))
        return x.replace(h)


class FlexiDualGridVaeEncoder(_Placed):
    def __init__(self, resolution, model_channels, latent_channels, num_blocks, **kwargs):
        super().__init__()
        self.input_layer = nn.Linear(6, model_channels[0])
        self.to_latent = nn.Linear(model_channels[0], latent_channels)

    def forward(self, vertices, intersected):
        if vertices._placement != self.placement:  # what torch says about mixed devices
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two "
                f"devices, {vertices._placement} and {self.placement}!"
            )
        fake_control.count("encode")
        fake_control.maybe_fail("encode")
        coarse = vertices.coords.clone()
        coarse[:, 1:] = coarse[:, 1:] // 16
        unique, inverse = torch.unique(coarse, dim=0, return_inverse=True)
        feats = torch.cat([vertices.feats.float(), intersected.feats.float()], 1)
        pooled = torch.zeros(unique.shape[0], 6).index_add_(0, inverse, feats)
        pooled = pooled / torch.bincount(inverse).clamp(min=1)[:, None]
        return SparseTensor(feats=self.to_latent(F.silu(self.input_layer(pooled))), coords=unique)


def from_pretrained(path: str, **kwargs):
    from fake_weights import load_file

    if os.path.exists(f"{path}.json") and os.path.exists(f"{path}.safetensors"):
        config_file, model_file = f"{path}.json", f"{path}.safetensors"
    else:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise OSError(f"offline mode: cannot download {path!r} from the Hugging Face Hub")
        raise OSError(f"{path!r} is not a local checkpoint and the fake cannot download")
    with open(config_file) as f:
        config = json.load(f)
    model = globals()[config["name"]](**config["args"], **kwargs)
    model.load_state_dict(load_file(model_file), strict=False)
    return model
