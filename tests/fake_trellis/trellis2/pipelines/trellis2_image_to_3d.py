"""Fake Trellis2ImageTo3DPipeline: the real staging API, signatures and low-VRAM moves (with
the real code's lack of try/finally: a stage that raises leaves its model on the device)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..modules.sparse import SparseTensor
from ..representations import MeshWithVoxel
from . import samplers
from .base import Pipeline


class Trellis2ImageTo3DPipeline(Pipeline):
    model_names_to_load = [
        "sparse_structure_flow_model",
        "sparse_structure_decoder",
        "shape_slat_flow_model_512",
        "shape_slat_flow_model_1024",
        "shape_slat_decoder",
        "tex_slat_flow_model_512",
        "tex_slat_flow_model_1024",
        "tex_slat_decoder",
    ]

    def __init__(
        self,
        models: dict = None,
        sparse_structure_sampler: samplers.Sampler = None,
        shape_slat_sampler: samplers.Sampler = None,
        tex_slat_sampler: samplers.Sampler = None,
        sparse_structure_sampler_params: dict = None,
        shape_slat_sampler_params: dict = None,
        tex_slat_sampler_params: dict = None,
        shape_slat_normalization: dict = None,
        tex_slat_normalization: dict = None,
        image_cond_model: Callable = None,
        rembg_model: Callable = None,
        low_vram: bool = True,
        default_pipeline_type: str = "1024_cascade",
    ):
        if models is None:
            return
        super().__init__(models)
        self.sparse_structure_sampler = sparse_structure_sampler
        self.shape_slat_sampler = shape_slat_sampler
        self.tex_slat_sampler = tex_slat_sampler
        self.sparse_structure_sampler_params = sparse_structure_sampler_params
        self.shape_slat_sampler_params = shape_slat_sampler_params
        self.tex_slat_sampler_params = tex_slat_sampler_params
        self.shape_slat_normalization = shape_slat_normalization
        self.tex_slat_normalization = tex_slat_normalization
        self.image_cond_model = image_cond_model
        self.rembg_model = rembg_model
        self.low_vram = low_vram
        self.default_pipeline_type = default_pipeline_type
        self.pbr_attr_layout = {
            "base_color": slice(0, 3),
            "metallic": slice(3, 4),
            "roughness": slice(4, 5),
            "alpha": slice(5, 6),
        }
        self._device = "cpu"

    @classmethod
    def from_pretrained(cls, path: str, config_file: str = "pipeline.json"):
        from ..modules import image_feature_extractor
        from . import rembg

        pipeline = super().from_pretrained(path, config_file)
        args = pipeline._pretrained_args
        for key in ("sparse_structure", "shape_slat", "tex_slat"):
            cfg = args[f"{key}_sampler"]
            setattr(pipeline, f"{key}_sampler", getattr(samplers, cfg["name"])(**cfg["args"]))
            setattr(pipeline, f"{key}_sampler_params", cfg["params"])
        pipeline.shape_slat_normalization = args["shape_slat_normalization"]
        pipeline.tex_slat_normalization = args["tex_slat_normalization"]
        icm = args["image_cond_model"]
        pipeline.image_cond_model = getattr(image_feature_extractor, icm["name"])(**icm["args"])
        rb = args["rembg_model"]
        pipeline.rembg_model = getattr(rembg, rb["name"])(**rb["args"])
        pipeline.low_vram = args.get("low_vram", True)
        pipeline.default_pipeline_type = args.get("default_pipeline_type", "1024_cascade")
        pipeline.pbr_attr_layout = {
            "base_color": slice(0, 3),
            "metallic": slice(3, 4),
            "roughness": slice(4, 5),
            "alpha": slice(5, 6),
        }
        pipeline._device = "cpu"
        return pipeline

    def to(self, device) -> None:
        self._device = device
        if not self.low_vram:
            super().to(device)
            self.image_cond_model.to(device)
            if self.rembg_model is not None:
                self.rembg_model.to(device)

    def preprocess_image(self, input: Image.Image) -> Image.Image:
        has_alpha = input.mode == "RGBA" and not np.all(np.asarray(input)[:, :, 3] == 255)
        scale = min(1, 1024 / max(input.size))
        if scale < 1:
            input = input.resize(
                (int(input.width * scale), int(input.height * scale)), Image.Resampling.LANCZOS
            )
        if has_alpha:
            output = input
        else:
            if self.low_vram:
                self.rembg_model.to(self.device)
            output = self.rembg_model(input.convert("RGB"))
            if self.low_vram:
                self.rembg_model.cpu()
        alpha = np.asarray(output)[:, :, 3]
        found = np.argwhere(alpha > 0.8 * 255)
        # Like the real code: an empty mask makes np.min raise ValueError here.
        x0, y0, x1, y1 = found[:, 1].min(), found[:, 0].min(), found[:, 1].max(), found[:, 0].max()
        cx, cy, size = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
        output = output.crop((cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2))
        arr = np.asarray(output).astype(np.float32) / 255
        return Image.fromarray((arr[:, :, :3] * arr[:, :, 3:4] * 255).astype(np.uint8))

    def get_cond(self, image, resolution: int, include_neg_cond: bool = True) -> dict:
        self.image_cond_model.image_size = resolution
        if self.low_vram:
            self.image_cond_model.to(self.device)
        cond = self.image_cond_model(image)
        if self.low_vram:
            self.image_cond_model.cpu()
        if not include_neg_cond:
            return {"cond": cond}
        return {"cond": cond, "neg_cond": torch.zeros_like(cond)}

    def sample_sparse_structure(
        self,
        cond: dict,
        resolution: int,
        num_samples: int = 1,
        sampler_params: dict = {},  # noqa: B006 - as upstream
    ) -> torch.Tensor:
        flow_model = self.models["sparse_structure_flow_model"]
        reso = flow_model.resolution
        noise = torch.randn(num_samples, flow_model.in_channels, reso, reso, reso).to(self.device)
        sampler_params = {**self.sparse_structure_sampler_params, **sampler_params}
        if self.low_vram:
            flow_model.to(self.device)
        z_s = self.sparse_structure_sampler.sample(
            flow_model,
            noise,
            **cond,
            **sampler_params,
            verbose=True,
            tqdm_desc="Sampling sparse structure",
        ).samples
        if self.low_vram:
            flow_model.cpu()
        decoder = self.models["sparse_structure_decoder"]
        if self.low_vram:
            decoder.to(self.device)
        decoded = decoder(z_s) > 0
        if self.low_vram:
            decoder.cpu()
        if resolution != decoded.shape[2]:
            ratio = decoded.shape[2] // resolution
            decoded = torch.nn.functional.max_pool3d(decoded.float(), ratio, ratio, 0) > 0.5
        return torch.argwhere(decoded)[:, [0, 2, 3, 4]].int()

    def _denormalize(self, slat, norm):
        std = torch.tensor(norm["std"])[None].to(slat.device)
        mean = torch.tensor(norm["mean"])[None].to(slat.device)
        return slat * std + mean

    def _sample_slat(self, flow_model, noise, cond, sampler_params):
        if self.low_vram:
            flow_model.to(self.device)
        slat = self.shape_slat_sampler.sample(
            flow_model,
            noise,
            **cond,
            **sampler_params,
            verbose=True,
            tqdm_desc="Sampling shape SLat",
        ).samples
        if self.low_vram:
            flow_model.cpu()
        return self._denormalize(slat, self.shape_slat_normalization)

    def sample_shape_slat(
        self,
        cond: dict,
        flow_model,
        coords: torch.Tensor,
        sampler_params: dict = {},  # noqa: B006 - as upstream
    ) -> SparseTensor:
        noise = SparseTensor(
            feats=torch.randn(coords.shape[0], flow_model.in_channels).to(self.device),
            coords=coords,
        )
        sampler_params = {**self.shape_slat_sampler_params, **sampler_params}
        return self._sample_slat(flow_model, noise, cond, sampler_params)

    def sample_shape_slat_cascade(
        self,
        lr_cond: dict,
        cond: dict,
        flow_model_lr,
        flow_model,
        lr_resolution: int,
        resolution: int,
        coords: torch.Tensor,
        sampler_params: dict = {},  # noqa: B006
        max_num_tokens: int = 49152,
    ):
        sampler_params = {**self.shape_slat_sampler_params, **sampler_params}
        noise = SparseTensor(
            feats=torch.randn(coords.shape[0], flow_model_lr.in_channels).to(self.device),
            coords=coords,
        )
        slat = self._sample_slat(flow_model_lr, noise, lr_cond, sampler_params)
        decoder = self.models["shape_slat_decoder"]
        if self.low_vram:
            decoder.to(self.device)
            decoder.low_vram = True
        hr_coords = decoder.upsample(slat, upsample_times=4)
        if self.low_vram:
            decoder.cpu()
            decoder.low_vram = False
        hr_resolution = resolution
        while True:
            quant = torch.cat(
                [
                    hr_coords[:, :1],
                    ((hr_coords[:, 1:] + 0.5) / lr_resolution * (hr_resolution // 16)).int(),
                ],
                dim=1,
            )
            coords = quant.unique(dim=0)
            if coords.shape[0] < max_num_tokens or hr_resolution == 1024:
                if hr_resolution != resolution:
                    print(
                        f"Due to the limited number of tokens, the resolution is reduced "
                        f"to {hr_resolution}."
                    )
                break
            hr_resolution -= 128
        noise = SparseTensor(
            feats=torch.randn(coords.shape[0], flow_model.in_channels).to(self.device),
            coords=coords,
        )
        slat = self._sample_slat(flow_model, noise, cond, sampler_params)
        return slat, hr_resolution

    def decode_shape_slat(self, slat: SparseTensor, resolution: int):
        decoder = self.models["shape_slat_decoder"]
        decoder.set_resolution(resolution)
        if self.low_vram:
            decoder.to(self.device)
            decoder.low_vram = True
        ret = decoder(slat, return_subs=True)
        if self.low_vram:
            decoder.cpu()
            decoder.low_vram = False
        return ret

    def sample_tex_slat(
        self,
        cond: dict,
        flow_model,
        shape_slat: SparseTensor,
        sampler_params: dict = {},  # noqa: B006 - as upstream
    ) -> SparseTensor:
        std = torch.tensor(self.shape_slat_normalization["std"])[None].to(shape_slat.device)
        mean = torch.tensor(self.shape_slat_normalization["mean"])[None].to(shape_slat.device)
        shape_slat = (shape_slat - mean) / std
        in_channels = flow_model.in_channels
        noise = shape_slat.replace(
            feats=torch.randn(
                shape_slat.coords.shape[0], in_channels - shape_slat.feats.shape[1]
            ).to(self.device)
        )
        sampler_params = {**self.tex_slat_sampler_params, **sampler_params}
        if self.low_vram:
            flow_model.to(self.device)
        slat = self.tex_slat_sampler.sample(
            flow_model,
            noise,
            concat_cond=shape_slat,
            **cond,
            **sampler_params,
            verbose=True,
            tqdm_desc="Sampling texture SLat",
        ).samples
        if self.low_vram:
            flow_model.cpu()
        return self._denormalize(slat, self.tex_slat_normalization)

    def decode_tex_slat(self, slat: SparseTensor, subs: list) -> SparseTensor:
        decoder = self.models["tex_slat_decoder"]
        if self.low_vram:
            decoder.to(self.device)
        ret = decoder(slat, guide_subs=subs) * 0.5 + 0.5
        if self.low_vram:
            decoder.cpu()
        return ret

    @torch.no_grad()
    def decode_latent(
        self, shape_slat: SparseTensor, tex_slat: SparseTensor, resolution: int
    ) -> list:
        meshes, subs = self.decode_shape_slat(shape_slat, resolution)
        tex_voxels = self.decode_tex_slat(tex_slat, subs)
        out = []
        for m in meshes:
            m.fill_holes()
            out.append(
                MeshWithVoxel(
                    m.vertices,
                    m.faces,
                    origin=[-0.5, -0.5, -0.5],
                    voxel_size=1 / resolution,
                    coords=tex_voxels.coords[:, 1:],
                    attrs=tex_voxels.feats,
                    voxel_shape=torch.Size([*tex_voxels.shape, *tex_voxels.spatial_shape]),
                    layout=self.pbr_attr_layout,
                )
            )
        return out

    @torch.no_grad()
    def run(
        self,
        image: Image.Image,
        num_samples: int = 1,
        seed: int = 42,
        sparse_structure_sampler_params: dict = {},  # noqa: B006 - as upstream
        shape_slat_sampler_params: dict = {},  # noqa: B006
        tex_slat_sampler_params: dict = {},  # noqa: B006
        preprocess_image: bool = True,
        return_latent: bool = False,
        pipeline_type: Optional[str] = None,  # noqa: UP045 - as upstream
        max_num_tokens: int = 49152,
    ) -> list:
        """Upstream's run(), step for step: the reference the staged adapter must match."""
        pipeline_type = pipeline_type or self.default_pipeline_type
        if pipeline_type not in ("512", "1024", "1024_cascade", "1536_cascade"):
            raise ValueError(f"Invalid pipeline type: {pipeline_type}")
        if preprocess_image:
            image = self.preprocess_image(image)
        torch.manual_seed(seed)
        cond_512 = self.get_cond([image], 512)
        cond_1024 = self.get_cond([image], 1024) if pipeline_type != "512" else None
        ss_res = {"512": 32, "1024": 64, "1024_cascade": 32, "1536_cascade": 32}[pipeline_type]
        coords = self.sample_sparse_structure(
            cond_512, ss_res, num_samples, sparse_structure_sampler_params
        )
        if pipeline_type == "512":
            shape_slat = self.sample_shape_slat(
                cond_512,
                self.models["shape_slat_flow_model_512"],
                coords,
                shape_slat_sampler_params,
            )
            tex_slat = self.sample_tex_slat(
                cond_512,
                self.models["tex_slat_flow_model_512"],
                shape_slat,
                tex_slat_sampler_params,
            )
            res = 512
        elif pipeline_type == "1024":
            shape_slat = self.sample_shape_slat(
                cond_1024,
                self.models["shape_slat_flow_model_1024"],
                coords,
                shape_slat_sampler_params,
            )
            tex_slat = self.sample_tex_slat(
                cond_1024,
                self.models["tex_slat_flow_model_1024"],
                shape_slat,
                tex_slat_sampler_params,
            )
            res = 1024
        else:
            target = 1024 if pipeline_type == "1024_cascade" else 1536
            shape_slat, res = self.sample_shape_slat_cascade(
                cond_512,
                cond_1024,
                self.models["shape_slat_flow_model_512"],
                self.models["shape_slat_flow_model_1024"],
                512,
                target,
                coords,
                shape_slat_sampler_params,
                max_num_tokens,
            )
            tex_slat = self.sample_tex_slat(
                cond_1024,
                self.models["tex_slat_flow_model_1024"],
                shape_slat,
                tex_slat_sampler_params,
            )
        torch.cuda.empty_cache()
        out_mesh = self.decode_latent(shape_slat, tex_slat, res)
        if return_latent:
            return out_mesh, (shape_slat, tex_slat, res)
        return out_mesh
