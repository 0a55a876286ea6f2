"""Pipelines, loaded lazily like the real package."""

import importlib

_ATTRIBUTES = {
    "Trellis2ImageTo3DPipeline": "trellis2_image_to_3d",
    "Trellis2TexturingPipeline": "trellis2_texturing",
}
_SUBMODULES = ("samplers", "rembg")


def __getattr__(name):
    if name in _ATTRIBUTES:
        module = importlib.import_module(f".{_ATTRIBUTES[name]}", __name__)
        value = getattr(module, name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__} has no attribute {name}")
    globals()[name] = value
    return value
