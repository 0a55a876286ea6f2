"""Fake Trellis2TexturingPipeline: normalises the mesh into the unit cube (Y/Z swapped),
encodes it, samples and decodes a texture latent, bakes a texture; output stays normalised."""

from __future__ import annotations

from collections.abc import Callable

import fake_control
import numpy as np
import o_voxel
import torch
import trimesh
from PIL import Image

from ..modules.sparse import SparseTensor
from . import samplers
from .base import Pipeline
from .trellis2_image_to_3d import Trellis2ImageTo3DPipeline


class Trellis2TexturingPipeline(Pipeline):
    model_names_to_load = [
        "shape_slat_encoder",
        "tex_slat_decoder",
        "tex_slat_flow_model_512",
        "tex_slat_flow_model_1024",
    ]

    def __init__(
        self,
        models: dict = None,
        tex_slat_sampler: samplers.Sampler = None,
        tex_slat_sampler_params: dict = None,
        shape_slat_normalization: dict = None,
        tex_slat_normalization: dict = None,
        image_cond_model: Callable = None,
        rembg_model: Callable = None,
        low_vram: bool = True,
    ):
        if models is None:
            return
        super().__init__(models)
        self.tex_slat_sampler = tex_slat_sampler
        self.tex_slat_sampler_params = tex_slat_sampler_params
        self.shape_slat_normalization = shape_slat_normalization
        self.tex_slat_normalization = tex_slat_normalization
        self.image_cond_model = image_cond_model
        self.rembg_model = rembg_model
        self.low_vram = low_vram
        self.pbr_attr_layout = {
            "base_color": slice(0, 3),
            "metallic": slice(3, 4),
            "roughness": slice(4, 5),
            "alpha": slice(5, 6),
        }
        self._device = "cpu"

    def to(self, device) -> None:
        self._device = device
        if not self.low_vram:
            super().to(device)
            self.image_cond_model.to(device)
            if self.rembg_model is not None:
                self.rembg_model.to(device)

    preprocess_image = Trellis2ImageTo3DPipeline.preprocess_image
    get_cond = Trellis2ImageTo3DPipeline.get_cond
    sample_tex_slat = Trellis2ImageTo3DPipeline.sample_tex_slat
    _denormalize = Trellis2ImageTo3DPipeline._denormalize

    def preprocess_mesh(self, mesh: trimesh.Trimesh) -> trimesh.Trimesh:
        vertices = np.array(mesh.vertices, dtype=np.float64)
        low, high = vertices.min(0), vertices.max(0)
        vertices = (vertices - (low + high) / 2) * (0.99999 / (high - low).max())
        vertices = np.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], 1)
        if not (np.all(vertices >= -0.5) and np.all(vertices <= 0.5)):
            raise AssertionError("vertices out of range")
        return trimesh.Trimesh(vertices=vertices, faces=mesh.faces, process=False)

    def encode_shape_slat(self, mesh: trimesh.Trimesh, resolution: int = 1024) -> SparseTensor:
        vertices = torch.from_numpy(mesh.vertices).float()
        faces = torch.from_numpy(mesh.faces).long()
        voxel_indices, dual_vertices, intersected = o_voxel.convert.mesh_to_flexible_dual_grid(
            vertices.cpu(),
            faces.cpu(),
            grid_size=resolution,
            aabb=[[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]],
            face_weight=1.0,
            boundary_weight=0.2,
            regularization_weight=1e-2,
            timing=True,
        )
        coords = torch.cat([torch.zeros_like(voxel_indices[:, :1]), voxel_indices], -1)
        dual = SparseTensor(feats=dual_vertices * resolution - voxel_indices, coords=coords)
        dual = dual.to(self.device)
        inter = dual.replace(intersected.float()).to(self.device)
        encoder = self.models["shape_slat_encoder"]
        if self.low_vram:
            encoder.to(self.device)
        shape_slat = encoder(dual, inter)
        if self.low_vram:
            encoder.cpu()
        return shape_slat

    def decode_tex_slat(self, slat: SparseTensor) -> SparseTensor:
        decoder = self.models["tex_slat_decoder"]
        if self.low_vram:
            decoder.to(self.device)
        ret = decoder(slat) * 0.5 + 0.5
        if self.low_vram:
            decoder.cpu()
        return ret

    def postprocess_mesh(
        self,
        mesh: trimesh.Trimesh,
        pbr_voxel: SparseTensor,
        resolution: int = 1024,
        texture_size: int = 1024,
    ) -> trimesh.Trimesh:
        fake_control.count("bake")
        fake_control.maybe_fail("bake")
        faces = np.array(mesh.faces)
        if hasattr(mesh, "visual") and getattr(mesh.visual, "uv", None) is not None:
            # As upstream: the mesh's own arrays are used and turned over in place below
            # (trimesh's cached normals are read-only, so a trimesh fails there).
            vertices, normals = mesh.vertices, mesh.vertex_normals
            uv = np.array(mesh.visual.uv)  # UVs the mesh has are baked into
        else:
            # "UV unwrap": a planar projection; the real one runs CuMesh + xatlas (copies).
            vertices, normals = np.array(mesh.vertices), np.array(mesh.vertex_normals)
            uv = (vertices[:, :2] + 0.5).clip(0, 1)
        color = (pbr_voxel.feats.mean(0).clamp(0, 1) * 255).to(torch.uint8).numpy()
        base = Image.new("RGBA", (texture_size, texture_size), (*color[:3].tolist(), 255))
        mr = Image.new("RGB", (texture_size, texture_size), (0, int(color[4]), int(color[3])))
        material = trimesh.visual.material.PBRMaterial(
            baseColorTexture=base,
            metallicRoughnessTexture=mr,
            metallicFactor=1.0,
            roughnessFactor=1.0,
            alphaMode="OPAQUE",
            doubleSided=True,
        )
        vertices[:, 1], vertices[:, 2] = vertices[:, 2], -vertices[:, 1]
        normals[:, 1], normals[:, 2] = normals[:, 2], -normals[:, 1]
        return trimesh.Trimesh(
            vertices=vertices,
            faces=faces,
            vertex_normals=normals,
            process=False,
            visual=trimesh.visual.TextureVisuals(uv=uv, material=material),
        )
