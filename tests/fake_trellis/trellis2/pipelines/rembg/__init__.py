"""Fake BiRefNet: a local model folder; marks pixels unlike the corner colour as foreground."""

from __future__ import annotations

import fake_control
import numpy as np
from PIL import Image

from ...modules.image_feature_extractor import _load_local


class BiRefNet:
    def __init__(self, model_name: str = "ZhengPeng7/BiRefNet"):
        _load_local(model_name)
        self.placement = "cpu"

    def to(self, device: str):
        self.placement = fake_control.placement_of(device)

    def cuda(self):
        self.placement = "cuda"

    def cpu(self):
        self.placement = "cpu"

    def __call__(self, image: Image.Image) -> Image.Image:
        fake_control.count("rembg")
        fake_control.maybe_fail("rembg")
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
        background = rgb[0, 0]
        mask = (np.abs(rgb - background).sum(-1) > 30).astype(np.uint8) * 255
        image.putalpha(Image.fromarray(mask))  # like the real one: modifies its input
        return image
