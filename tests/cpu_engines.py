"""Small CPU engines for server, client and supervisor tests (registered by import path)."""

from __future__ import annotations

import io
import os
import time
from typing import Any

import numpy as np
import trimesh
from PIL import Image

from backend.engines.base import Engine, Stage, StageContext
from backend.engines.preview import PreviewEngine
from backend.params import GenerationParams


def write_textured_box(path, texture_size: int = 64) -> dict[str, Any]:
    """A small valid textured GLB (PNG texture) and the stats the runner expects."""
    box = trimesh.creation.box(extents=(0.8, 1.0, 0.6))
    uv = np.stack([box.vertices[:, 0] + 0.5, box.vertices[:, 1] + 0.5], axis=1).clip(0, 1)
    texture = Image.new("RGBA", (texture_size, texture_size), (200, 120, 40, 255))
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=texture, metallicFactor=0.0)
    box.visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    data = box.export(file_type="glb")
    with open(path, "wb") as f:
        f.write(data)
    return {
        "glb_path": path,
        "mesh_stats": {
            "vertices": len(box.vertices),
            "faces": len(box.faces),
            "texture_size": texture_size,
        },
        "mesh_arrays": (np.asarray(box.vertices), np.asarray(box.faces)),
    }


class SlowEngine(Engine):
    """Three stages of `steps` checkpoints each, `step_seconds` apart; env knobs let
    subprocess tests make it crash (SLOW_ENGINE_EXIT_AT=<stage>) or hang."""

    name = "slow"
    label = "Slow test engine"
    capabilities = frozenset({"resolution", "texture_size"})
    stages = (
        Stage("prepare", "Preparing", frozenset()),
        Stage("shape", "Shaping", frozenset({"resolution"})),
        Stage("export", "Exporting", frozenset({"texture_size"})),
    )
    thread_safe = True

    def __init__(
        self,
        steps: str | int = 5,
        step_seconds: str | float = 0.05,
        load_seconds: str | float = 0.0,
        **_: Any,
    ):
        self.steps = int(steps)
        self.step_seconds = float(step_seconds)
        self.load_seconds = float(load_seconds)
        self.calls: dict[str, int] = {}

    def load(self, progress=None) -> None:
        time.sleep(self.load_seconds)
        if os.environ.get("SLOW_ENGINE_LOAD_ERROR"):
            raise RuntimeError(os.environ["SLOW_ENGINE_LOAD_ERROR"])

    def run_stage(
        self, stage: str, state: dict[str, Any], params: GenerationParams, ctx: StageContext
    ) -> None:
        self.calls[stage] = self.calls.get(stage, 0) + 1
        if os.environ.get("SLOW_ENGINE_EXIT_AT") == stage:
            os._exit(int(os.environ.get("SLOW_ENGINE_EXIT_CODE", "9")))
        if os.environ.get("SLOW_ENGINE_HANG_AT") == stage:
            time.sleep(3600)
        if os.environ.get("SLOW_ENGINE_PRINT"):  # a chatty library writing to stdout
            print(os.environ["SLOW_ENGINE_PRINT"], flush=True)
        for step in range(1, self.steps + 1):
            time.sleep(self.step_seconds)
            ctx.progress(step, self.steps)
        if stage == "prepare":
            buf = io.BytesIO()
            state["image"].save(buf, format="PNG")
            state["prepared"] = buf.getvalue()
        elif stage == "export":
            state.update(write_textured_box(state["output_path"]))


class PacedPreview(PreviewEngine):
    """The preview engine with a pause of `pause` seconds before its first stage, in 0.05 s
    steps that are cancel checkpoints: time to cancel a job (through a gateway too)."""

    def __init__(self, pause: str = "0", **options: Any):
        super().__init__(**options)
        self.pause = float(pause)

    def run_stage(
        self, stage: str, state: dict[str, Any], params: GenerationParams, ctx: StageContext
    ) -> None:
        if stage == "mask":  # the first stage of a generate and of a texture job
            steps = int(self.pause / 0.05)
            for step in range(1, steps + 1):
                time.sleep(0.05)
                ctx.progress(step, steps)
        super().run_stage(stage, state, params, ctx)
