"""Fake to_glb: same signature and return type (a textured trimesh.Trimesh, Y-up, PBR with an
RGBA base colour and OPAQUE alpha mode); CuMesh's OOM is a RuntimeError, as in the real one."""

from __future__ import annotations

import fake_control
import numpy as np
import torch
import trimesh
import trimesh.visual
from PIL import Image


def to_glb(
    vertices,
    faces,
    attr_volume,
    coords,
    attr_layout,
    aabb,
    voxel_size=None,
    grid_size=None,
    decimation_target=1000000,
    texture_size=2048,
    remesh=False,
    remesh_band=1,
    remesh_project=0.9,
    mesh_cluster_threshold_cone_half_angle_rad=np.radians(90.0),
    mesh_cluster_refine_iterations=0,
    mesh_cluster_global_iterations=1,
    mesh_cluster_smooth_strength=1,
    verbose=False,
    use_tqdm=False,
):
    if voxel_size is None and grid_size is None:
        raise AssertionError("Either voxel_size or grid_size must be provided")
    fake_control.CALLS.append(
        (
            "to_glb",
            {
                "decimation_target": decimation_target,
                "texture_size": texture_size,
                "remesh": remesh,
                "remesh_band": remesh_band,
                "grid_size": grid_size,
                "voxel_size": voxel_size,
                "remesh_project": remesh_project,
            },
        )
    )
    fake_control.count("export")
    fake_control.maybe_fail("export")
    v = vertices.detach().cpu().numpy().astype(np.float64)
    f = faces.detach().cpu().numpy().astype(np.int64)
    if f.shape[0] > decimation_target:
        f = f[:decimation_target]
    uv = np.stack(
        [np.arctan2(v[:, 1], v[:, 0]) / (2 * np.pi) + 0.5, v[:, 2].clip(-0.5, 0.5) + 0.5], 1
    )
    attrs = attr_volume.detach().float().cpu().clamp(0, 1)
    mean = (attrs.mean(0) * 255).to(torch.uint8).numpy() if attrs.shape[0] else np.zeros(6)
    ramp = np.linspace(0, 255, texture_size, dtype=np.uint8)
    base = np.empty((texture_size, texture_size, 4), np.uint8)
    base[..., 0] = mean[attr_layout["base_color"]][0]
    base[..., 1] = ramp[None, :]
    base[..., 2] = mean[attr_layout["base_color"]][2]
    base[..., 3] = mean[attr_layout["alpha"]][0]
    mr = np.zeros((texture_size, texture_size, 3), np.uint8)
    mr[..., 1] = mean[attr_layout["roughness"]][0]
    mr[..., 2] = mean[attr_layout["metallic"]][0]
    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=Image.fromarray(base),
        baseColorFactor=np.array([255] * 4, np.uint8),
        metallicRoughnessTexture=Image.fromarray(mr),
        metallicFactor=1.0,
        roughnessFactor=1.0,
        alphaMode="OPAQUE",
        doubleSided=not remesh,
    )
    v = np.stack([v[:, 0], v[:, 2], -v[:, 1]], 1)  # Z-up -> glTF Y-up
    normals = v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-9)
    # The real export gives vertices used only by degenerate faces a zero normal.
    normals[: fake_control.ZERO_NORMALS] = 0.0
    return trimesh.Trimesh(
        vertices=v,
        faces=f,
        vertex_normals=normals,
        process=False,
        visual=trimesh.visual.TextureVisuals(uv=uv, material=material),
    )
