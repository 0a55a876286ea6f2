"""Fake DINOv3 feature extractor: needs a local model folder, returns [B, tokens, 16]."""

from __future__ import annotations

import os

import fake_control
import numpy as np
import torch
from PIL import Image

FEATURES = 16


def _load_local(model_name: str) -> None:
    # transformers' from_pretrained: a folder with config.json, or a hub id (offline: error).
    if os.path.isdir(model_name) and os.path.exists(os.path.join(model_name, "config.json")):
        return
    raise OSError(
        f"We couldn't connect to 'https://huggingface.co' to load {model_name!r} "
        "(offline mode) and it is not a local folder with a config.json file."
    )


class DinoV3FeatureExtractor:
    def __init__(self, model_name: str, image_size=512):
        _load_local(model_name)
        self.model_name = model_name
        self.image_size = image_size
        self.placement = "cpu"
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3, FEATURES, generator=g)

    def to(self, device):
        self.placement = fake_control.placement_of(device)

    def cuda(self):
        self.placement = "cuda"

    def cpu(self):
        self.placement = "cpu"

    @torch.no_grad()
    def __call__(self, image):
        fake_control.count("conditioning")
        fake_control.count(f"dinov3_{self.image_size}")
        fake_control.maybe_fail("conditioning")
        if not isinstance(image, list) or not all(isinstance(i, Image.Image) for i in image):
            raise ValueError(f"Unsupported type of image: {type(image)}")
        patches = self.image_size // 16
        out = []
        for img in image:
            small = img.convert("RGB").resize((patches, patches), Image.BILINEAR)
            arr = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255).reshape(-1, 3)
            tokens = arr @ self.proj
            extra = tokens.mean(0, keepdim=True).expand(5, FEATURES)  # CLS + 4 registers
            out.append(torch.cat([extra, tokens], 0))
        return torch.stack(out)
