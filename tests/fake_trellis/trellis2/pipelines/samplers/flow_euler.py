"""Fake flow-matching Euler samplers with the real structure: `sample` walks a rescaled time
grid and calls `sample_once` per step; CFG and guidance-interval mixins wrap the model call."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from .base import Sampler


class FlowEulerSampler(Sampler):
    def __init__(self, sigma_min: float):
        self.sigma_min = sigma_min

    def _inference_model(self, model, x_t, t, cond=None, **kwargs):
        batch = x_t.shape[0]
        t = torch.full((batch,), 1000.0 * t)
        return model(x_t, t, cond, **kwargs)

    def _pred_to_xstart(self, x_t, t, pred):
        return (1 - self.sigma_min) * x_t - (self.sigma_min + (1 - self.sigma_min) * t) * pred

    @torch.no_grad()
    def sample_once(self, model, x_t, t: float, t_prev: float, cond=None, **kwargs):
        pred_v = self._inference_model(model, x_t, t, cond, **kwargs)
        return SimpleNamespace(
            pred_x_prev=x_t - (t - t_prev) * pred_v,
            pred_x_0=self._pred_to_xstart(x_t, t, pred_v),
        )

    @torch.no_grad()
    def sample(
        self,
        model,
        noise,
        cond=None,
        steps: int = 50,
        rescale_t: float = 1.0,
        verbose: bool = True,
        tqdm_desc: str = "Sampling",
        **kwargs,
    ):
        grid = np.linspace(1, 0, steps + 1)
        grid = rescale_t * grid / (1 + (rescale_t - 1) * grid)
        pairs = list(zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True))
        sample = noise
        ret = SimpleNamespace(samples=None, pred_x_t=[], pred_x_0=[])
        for t, t_prev in pairs:
            out = self.sample_once(model, sample, t, t_prev, cond, **kwargs)
            sample = out.pred_x_prev
            ret.pred_x_t.append(out.pred_x_prev)
            ret.pred_x_0.append(out.pred_x_0)
        ret.samples = sample
        return ret


class ClassifierFreeGuidanceSamplerMixin:
    def _inference_model(
        self, model, x_t, t, cond, neg_cond, guidance_strength, guidance_rescale=0.0, **kwargs
    ):
        if guidance_strength == 1:
            return super()._inference_model(model, x_t, t, cond, **kwargs)
        if guidance_strength == 0:
            return super()._inference_model(model, x_t, t, neg_cond, **kwargs)
        pos = super()._inference_model(model, x_t, t, cond, **kwargs)
        neg = super()._inference_model(model, x_t, t, neg_cond, **kwargs)
        return pos * guidance_strength + neg * (1 - guidance_strength)


class GuidanceIntervalSamplerMixin:
    def _inference_model(self, model, x_t, t, cond, guidance_strength, guidance_interval, **kwargs):
        inside = guidance_interval[0] <= t <= guidance_interval[1]
        return super()._inference_model(
            model, x_t, t, cond, guidance_strength=guidance_strength if inside else 1, **kwargs
        )


class FlowEulerCfgSampler(ClassifierFreeGuidanceSamplerMixin, FlowEulerSampler):
    @torch.no_grad()
    def sample(
        self,
        model,
        noise,
        cond,
        neg_cond,
        steps: int = 50,
        rescale_t: float = 1.0,
        guidance_strength: float = 3.0,
        verbose: bool = True,
        **kwargs,
    ):
        return super().sample(
            model,
            noise,
            cond,
            steps,
            rescale_t,
            verbose,
            neg_cond=neg_cond,
            guidance_strength=guidance_strength,
            **kwargs,
        )


class FlowEulerGuidanceIntervalSampler(
    GuidanceIntervalSamplerMixin, ClassifierFreeGuidanceSamplerMixin, FlowEulerSampler
):
    @torch.no_grad()
    def sample(
        self,
        model,
        noise,
        cond,
        neg_cond,
        steps: int = 50,
        rescale_t: float = 1.0,
        guidance_strength: float = 3.0,
        guidance_interval=(0.0, 1.0),
        verbose: bool = True,
        **kwargs,
    ):
        return super().sample(
            model,
            noise,
            cond,
            steps,
            rescale_t,
            verbose,
            neg_cond=neg_cond,
            guidance_strength=guidance_strength,
            guidance_interval=guidance_interval,
            **kwargs,
        )
