from .base import Sampler
from .flow_euler import FlowEulerCfgSampler, FlowEulerGuidanceIntervalSampler, FlowEulerSampler

__all__ = ["Sampler", "FlowEulerSampler", "FlowEulerCfgSampler", "FlowEulerGuidanceIntervalSampler"]
