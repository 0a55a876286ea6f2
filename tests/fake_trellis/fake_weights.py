"""Writes a local TRELLIS.2 weights folder (reference §9 layout) holding tiny random models."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
_NAMES = {v: k for k, v in _DTYPES.items()}


def save_file(tensors: dict[str, torch.Tensor], path) -> None:
    """A minimal safetensors writer (u64 header length, JSON header, raw little-endian data)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name, tensor in tensors.items():
        t = tensor.detach().contiguous().cpu()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def load_file(path) -> dict[str, torch.Tensor]:
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    base = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        buf = bytearray(data[base + start : base + end])
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


_FLOW = {"model_channels": 16, "cond_channels": 16, "num_blocks": 1, "num_heads": 2}
_LEVELS = {"model_channels": [16, 8, 8, 8, 8], "num_blocks": [0, 0, 0, 0, 0]}
# pipeline.json model key -> (relative path, {"name", "args"}); names and paths as released.
MODELS = {
    "sparse_structure_flow_model": (
        "ckpts/ss_flow_img_dit_1_3B_64_bf16",
        {
            "name": "SparseStructureFlowModel",
            "args": {"resolution": 16, "in_channels": 8, "out_channels": 8, **_FLOW},
        },
    ),
    "sparse_structure_decoder": (
        "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16",
        {
            "name": "SparseStructureDecoder",
            "args": {
                "out_channels": 1,
                "latent_channels": 8,
                "num_res_blocks": 1,
                "channels": [16, 8, 8],
            },
        },
    ),
    "shape_slat_flow_model_512": (
        "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16",
        {
            "name": "SLatFlowModel",
            "args": {"resolution": 32, "in_channels": 32, "out_channels": 32, **_FLOW},
        },
    ),
    "shape_slat_flow_model_1024": (
        "ckpts/slat_flow_img2shape_dit_1_3B_1024_bf16",
        {
            "name": "SLatFlowModel",
            "args": {"resolution": 64, "in_channels": 32, "out_channels": 32, **_FLOW},
        },
    ),
    "shape_slat_decoder": (
        "ckpts/shape_dec_next_dc_f16c32_fp16",
        {
            "name": "FlexiDualGridVaeDecoder",
            "args": {"resolution": 256, "latent_channels": 32, "out_channels": 7, **_LEVELS},
        },
    ),
    "tex_slat_flow_model_512": (
        "ckpts/slat_flow_imgshape2tex_dit_1_3B_512_bf16",
        {
            "name": "SLatFlowModel",
            "args": {"resolution": 32, "in_channels": 64, "out_channels": 32, **_FLOW},
        },
    ),
    "tex_slat_flow_model_1024": (
        "ckpts/slat_flow_imgshape2tex_dit_1_3B_1024_bf16",
        {
            "name": "SLatFlowModel",
            "args": {"resolution": 64, "in_channels": 64, "out_channels": 32, **_FLOW},
        },
    ),
    "tex_slat_decoder": (
        "ckpts/tex_dec_next_dc_f16c32_fp16",
        {
            "name": "SparseUnetVaeDecoder",
            "args": {
                "resolution": 256,
                "latent_channels": 32,
                "out_channels": 6,
                "pred_subdiv": False,
                **_LEVELS,
            },
        },
    ),
}
SHAPE_ENCODER = (
    "ckpts/shape_enc_next_dc_f16c32_fp16",
    {
        "name": "FlexiDualGridVaeEncoder",
        "args": {"resolution": 256, "latent_channels": 32, **_LEVELS},
    },
)


def _sampler(steps, strength, rescale, interval, rescale_t) -> dict:
    return {
        "name": "FlowEulerGuidanceIntervalSampler",
        "args": {"sigma_min": 1e-5},
        "params": {
            "steps": steps,
            "guidance_strength": strength,
            "guidance_rescale": rescale,
            "guidance_interval": interval,
            "rescale_t": rescale_t,
        },
    }


def _norm(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "mean": (torch.randn(32, generator=g) * 0.1).tolist(),
        "std": (torch.rand(32, generator=g) + 0.5).tolist(),
    }


def _write_model(root: Path, rel: str, config: dict, seed: int, drop_key: bool = False) -> None:
    import trellis2.models as models

    torch.manual_seed(seed)
    model = getattr(models, config["name"])(**config["args"])
    # Parameters only: buffers the model computes itself (rope_phases) are left out, which
    # upstream's strict=False load tolerates.
    parameters = {name for name, _ in model.named_parameters()}
    state = {k: v for k, v in model.state_dict().items() if k in parameters}
    if drop_key:  # a checkpoint from another architecture revision
        state.pop(sorted(state)[0])
        state["legacy.extra.weight"] = torch.zeros(2)
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(config, indent=4))
    save_file(state, path.with_suffix(".safetensors"))


def _hf_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "fake"}))
    save_file({"weight": torch.zeros(4)}, path / "model.safetensors")
    return path


def make_weights_dir(
    root,
    *,
    texturing: bool = True,
    aux: bool = True,
    mismatch: str | None = None,
    skip: tuple[str, ...] = (),
) -> Path:
    """Write pipeline.json (+ texturing_pipeline.json), ckpts/ and, with `aux`, DINOv3 and
    BiRefNet folders at the conventional places inside the folder. `mismatch` names a model
    whose checkpoint gets a missing and an unexpected key; `skip` names models left out."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for seed, (key, (rel, config)) in enumerate(MODELS.items()):
        if key not in skip:
            _write_model(root, rel, config, seed, drop_key=(key == mismatch))
    common = {
        "shape_slat_normalization": _norm(1),
        "tex_slat_normalization": _norm(2),
        "image_cond_model": {
            "name": "DinoV3FeatureExtractor",
            "args": {"model_name": "facebook/dinov3-vitl16-pretrain-lvd1689m"},
        },
        "rembg_model": {"name": "BiRefNet", "args": {"model_name": "briaai/RMBG-2.0"}},
    }
    pipeline = {
        "name": "Trellis2ImageTo3DPipeline",
        "args": {
            "models": {key: rel for key, (rel, _) in MODELS.items()},
            "sparse_structure_sampler": _sampler(12, 7.5, 0.7, [0.6, 1.0], 5.0),
            "shape_slat_sampler": _sampler(12, 7.5, 0.5, [0.6, 1.0], 3.0),
            "tex_slat_sampler": _sampler(12, 1.0, 0.0, [0.6, 0.9], 3.0),
            **common,
            "default_pipeline_type": "1024_cascade",
        },
    }
    (root / "pipeline.json").write_text(json.dumps(pipeline, indent=2))
    if texturing:
        _write_model(
            root,
            SHAPE_ENCODER[0],
            SHAPE_ENCODER[1],
            99,
            drop_key=(mismatch == "shape_slat_encoder"),
        )
        tex = {
            "name": "Trellis2TexturingPipeline",
            "args": {
                "models": {
                    "shape_slat_encoder": SHAPE_ENCODER[0],
                    "tex_slat_decoder": MODELS["tex_slat_decoder"][0],
                    "tex_slat_flow_model_512": MODELS["tex_slat_flow_model_512"][0],
                    "tex_slat_flow_model_1024": MODELS["tex_slat_flow_model_1024"][0],
                },
                "tex_slat_sampler": _sampler(12, 1.0, 0.0, [0.6, 0.9], 3.0),
                **common,
            },
        }
        (root / "texturing_pipeline.json").write_text(json.dumps(tex, indent=2))
    if aux:
        _hf_folder(root / "facebook" / "dinov3-vitl16-pretrain-lvd1689m")
        _hf_folder(root / "ZhengPeng7" / "BiRefNet")
    return root
