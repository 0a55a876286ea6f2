"""Write a complete TRELLIS.2 weights folder with random, seeded weights (GPU test equipment).

usage: python scripts/gpu/make_weights.py --trellis TRELLIS2_CHECKOUT --out WEIGHTS_DIR
           [--occupancy 0.08] [--seed 0] [--keep-buffers] [--report weights.json]

The folder has the layout docs/TRELLIS2.md documents for the released weights, so the product
finds everything the way it finds a user's download: pipeline.json, texturing_pipeline.json,
ckpts/*.{json,safetensors}, the sparse-structure decoder under
microsoft/TRELLIS-image-large/ckpts/, DINOv3 under facebook/dinov3-vitl16-pretrain-lvd1689m/.
No background-removal folder: it is optional, and its absence is one of the cases tested.

Every model is built by its upstream class from upstream's own configs (configs/gen for the
flows, configs/scvae for the shape/texture decoders and the shape encoder, TRELLIS v1's
ss_vae_conv3d_16l8_fp16 arguments for the sparse-structure decoder) on the GPU, seeded per
model. Upstream initialises the DiTs' modulation and output layers to zero, which would make
every flow predict zero; those all-zero matrices are refilled with N(0, 0.02).

Occupancy is a logit shift: the random sparse-structure decoder marks almost every cell of the
32^3 grid occupied. Its output bias is shifted by one scalar, calibrated here on the structures
the real flow model and sampler produce (two seeds), so that the requested fraction of cells
is occupied. Why a shift and not a voxelised reference mesh: with random weights nothing in
the flow or the decoder can carry a shape, so a mesh's occupancy could only enter through a
hook in the pipeline, and the product path would no longer be upstream's. The shift lives in
the weights, costs nothing at run time, and gives token counts in the range real objects give
(8 % of 32^3 = about 2.6k voxels, about 10k tokens at the 1024 cascade). Its structures are
scattered rather than one closed surface, so remeshing sees more surface than a real object
would: export figures are on the pessimistic side.

By default the files hold parameters only, not the buffers models compute themselves
(`rope_phases`, `pos_emb`), which upstream's strict=False load tolerates; --keep-buffers
writes them too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

# Before trellis2 is imported (its configs read these once).
os.environ.setdefault("ATTN_BACKEND", "sdpa")
os.environ.setdefault("SPARSE_ATTN_BACKEND", "xformers")
os.environ.setdefault("SPARSE_CONV_BACKEND", "flex_gemm")

SS_DECODER = "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16"
DINOV3 = "facebook/dinov3-vitl16-pretrain-lvd1689m"
SHAPE_ENCODER = "ckpts/shape_enc_next_dc_f16c32_fp16"
BF16 = {"dtype": "bfloat16"}  # the released flows are bf16 (their file names say so)

# pipeline.json key -> (path in the weights folder, upstream config, part, extra arguments)
MODELS: dict[str, tuple[str, str, str, dict]] = {
    "sparse_structure_flow_model": (
        "ckpts/ss_flow_img_dit_1_3B_64_bf16",
        "configs/gen/ss_flow_img_dit_1_3B_64_bf16.json",
        "denoiser",
        BF16,
    ),
    "sparse_structure_decoder": (SS_DECODER, "", "", {}),
    "shape_slat_flow_model_512": (
        "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16",
        "configs/gen/slat_flow_img2shape_dit_1_3B_512_bf16.json",
        "denoiser",
        BF16,
    ),
    "shape_slat_flow_model_1024": (
        "ckpts/slat_flow_img2shape_dit_1_3B_1024_bf16",
        "configs/gen/slat_flow_img2shape_dit_1_3B_512_bf16_ft1024.json",
        "denoiser",
        BF16,
    ),
    "shape_slat_decoder": (
        "ckpts/shape_dec_next_dc_f16c32_fp16",
        "configs/scvae/shape_vae_next_dc_f16c32_fp16_ft_512.json",
        "decoder",
        {},
    ),
    "tex_slat_flow_model_512": (
        "ckpts/slat_flow_imgshape2tex_dit_1_3B_512_bf16",
        "configs/gen/slat_flow_imgshape2tex_dit_1_3B_512_bf16.json",
        "denoiser",
        BF16,
    ),
    "tex_slat_flow_model_1024": (
        "ckpts/slat_flow_imgshape2tex_dit_1_3B_1024_bf16",
        "configs/gen/slat_flow_imgshape2tex_dit_1_3B_512_bf16_ft1024.json",
        "denoiser",
        BF16,
    ),
    "tex_slat_decoder": (
        "ckpts/tex_dec_next_dc_f16c32_fp16",
        "configs/scvae/tex_vae_next_dc_f16c32_fp16_ft_512.json",
        "decoder",
        {},
    ),
    "shape_slat_encoder": (
        SHAPE_ENCODER,
        "configs/scvae/shape_vae_next_dc_f16c32_fp16_ft_512.json",
        "encoder",
        {},
    ),
}
# Not in TRELLIS.2's configs: TRELLIS (v1) configs/vae/ss_vae_conv3d_16l8_fp16.json, decoder.
SS_DECODER_CONFIG = {
    "name": "SparseStructureDecoder",
    "args": {
        "out_channels": 1,
        "latent_channels": 8,
        "num_res_blocks": 2,
        "num_res_blocks_middle": 2,
        "channels": [512, 128, 32],
        "use_fp16": True,
    },
}
# Sampler settings of the released pipeline.json (reference/trellis2.md §1.2).
SAMPLERS = {
    "sparse_structure_sampler": (7.5, 0.7, [0.6, 1.0], 5.0),
    "shape_slat_sampler": (7.5, 0.5, [0.6, 1.0], 3.0),
    "tex_slat_sampler": (1.0, 0.0, [0.6, 0.9], 3.0),
}
DINOV3_CONFIG = {  # ViT-L/16 with 4 registers: 1024-wide features, 1029 tokens at 512 px
    "patch_size": 16,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_register_tokens": 4,
    "layerscale_value": 1.0,
    "use_gated_mlp": False,
    "rope_theta": 100.0,
    "image_size": 224,
}


def sampler(name: str) -> dict:
    strength, rescale, interval, rescale_t = SAMPLERS[name]
    return {
        "name": "FlowEulerGuidanceIntervalSampler",
        "args": {"sigma_min": 1e-5},
        "params": {
            "steps": 12,
            "guidance_strength": strength,
            "guidance_rescale": rescale,
            "guidance_interval": interval,
            "rescale_t": rescale_t,
        },
    }


def model_config(checkout: Path, key: str) -> tuple[dict, str]:
    rel, config_file, part, extra = MODELS[key]
    if not config_file:
        return SS_DECODER_CONFIG, "TRELLIS v1 configs/vae/ss_vae_conv3d_16l8_fp16.json:decoder"
    spec = json.loads((checkout / config_file).read_text())["models"][part]
    return {"name": spec["name"], "args": {**spec["args"], **extra}}, f"{config_file}:{part}"


def build(models_module, config: dict, seed: int, device):
    """The upstream class from its config, seeded; all-zero matrices refilled."""
    import torch

    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(models_module, config["name"])(**config["args"])
    refilled = 0
    generator = torch.Generator(device=device).manual_seed(seed + 1000)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not bool(param.any()):
                param.copy_(
                    torch.randn(param.shape, generator=generator, device=device).to(param.dtype)
                    * 0.02
                )
                refilled += 1
    return model.eval(), refilled


def calibrate_occupancy(flow, decoder, fraction: float, seeds=(0, 1)) -> dict:
    """Shift the decoder's output bias so that `fraction` of the 32^3 cells are occupied for
    structures sampled by the real flow and sampler (random DINOv3-like conditions)."""
    import torch
    import torch.nn.functional as F
    from trellis2.pipelines import samplers

    sampling = samplers.FlowEulerGuidanceIntervalSampler(sigma_min=1e-5)
    params = sampler("sparse_structure_sampler")["params"]
    pooled = []
    device = next(decoder.parameters()).device
    for seed in seeds:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        cond = F.layer_norm(torch.randn(1, 1029, 1024, generator=generator), (1024,)).to(device)
        noise = torch.randn(
            1,
            flow.in_channels,
            flow.resolution,
            flow.resolution,
            flow.resolution,
            generator=generator,
        ).to(device)
        with torch.no_grad():
            z = sampling.sample(
                flow, noise, cond=cond, neg_cond=torch.zeros_like(cond), verbose=False, **params
            ).samples
            logits = decoder(z).float()
        # The pipeline keeps a 32^3 cell if any of its 2^3 children has a positive logit.
        pooled.append(F.max_pool3d(logits, 2, 2).flatten())
    values = torch.cat(pooled)
    before = float((values > 0).float().mean())
    shift = -float(torch.quantile(values.double().cpu(), 1.0 - fraction))
    conv = decoder.out_layer[-1]
    with torch.no_grad():
        conv.bias += shift
    after = float((values + shift > 0).float().mean())
    return {
        "target": fraction,
        "shift": shift,
        "occupied_before": round(before, 4),
        "occupied_after": round(after, 4),
        "calibration_seeds": list(seeds),
    }


def save(model, stem: Path, config: dict, keep_buffers: bool) -> dict:
    from safetensors.torch import save_file

    parameters = {name for name, _ in model.named_parameters()}
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if keep_buffers or k in parameters
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(config, indent=2))
    digest = hashlib.blake2b(digest_size=8)
    for key in sorted(state):  # a cheap fingerprint: names, shapes and each tensor's start
        tensor = state[key]
        digest.update(f"{key}{tuple(tensor.shape)}".encode())
        digest.update(tensor.flatten()[:256].float().numpy().tobytes())
    return {
        "tensors": len(state),
        "dropped_buffers": sorted(set(model.state_dict()) - set(state)),
        "elements": sum(t.numel() for t in state.values()),
        "bytes": stem.with_suffix(".safetensors").stat().st_size,
        "fingerprint": digest.hexdigest(),
    }


def write_dinov3(folder: Path, seed: int, device) -> dict:
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = DINOv3ViTModel(DINOv3ViTConfig(**DINOV3_CONFIG))
    model.save_pretrained(str(folder))
    return {"parameters": sum(p.numel() for p in model.parameters())}


def pipeline_files(checkout: Path, out: Path) -> None:
    gen = json.loads(
        (checkout / "configs/gen/slat_flow_imgshape2tex_dit_1_3B_512_bf16.json").read_text()
    )
    shape_norm = gen["dataset"]["args"]["shape_slat_normalization"]
    tex_norm = gen["dataset"]["args"]["pbr_slat_normalization"]
    common = {
        "shape_slat_normalization": shape_norm,
        "tex_slat_normalization": tex_norm,
        # Hub ids, as in the released file: the backend finds the local copies in the folder.
        "image_cond_model": {"name": "DinoV3FeatureExtractor", "args": {"model_name": DINOV3}},
        "rembg_model": {"name": "BiRefNet", "args": {"model_name": "briaai/RMBG-2.0"}},
    }
    models = {key: MODELS[key][0] for key in MODELS if key != "shape_slat_encoder"}
    pipeline = {
        "name": "Trellis2ImageTo3DPipeline",
        "args": {
            "models": models,
            **{name: sampler(name) for name in SAMPLERS},
            **common,
            "default_pipeline_type": "1024_cascade",
        },
    }
    (out / "pipeline.json").write_text(json.dumps(pipeline, indent=2))
    texturing = {
        "name": "Trellis2TexturingPipeline",
        "args": {
            "models": {
                "shape_slat_encoder": SHAPE_ENCODER,
                "tex_slat_decoder": models["tex_slat_decoder"],
                "tex_slat_flow_model_512": models["tex_slat_flow_model_512"],
                "tex_slat_flow_model_1024": models["tex_slat_flow_model_1024"],
            },
            "tex_slat_sampler": sampler("tex_slat_sampler"),
            **common,
        },
    }
    (out / "texturing_pipeline.json").write_text(json.dumps(texturing, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trellis", required=True, help="TRELLIS.2 checkout (configs/, trellis2/)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--occupancy", type=float, default=0.08, help="fraction of 32^3 cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-buffers", action="store_true")
    parser.add_argument("--report", help="write what was made as JSON here")
    args = parser.parse_args(argv)

    checkout, out = Path(args.trellis).resolve(), Path(args.out)
    sys.path.insert(0, str(checkout))
    import torch
    from trellis2 import models as upstream_models

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    report: dict = {"seed": args.seed, "device": str(device), "models": {}}
    out.mkdir(parents=True, exist_ok=True)
    flow = None
    for index, key in enumerate(MODELS):
        began = time.time()
        config, source = model_config(checkout, key)
        model, refilled = build(upstream_models, config, args.seed * 100 + index, device)
        entry = {"class": config["name"], "config": source, "zero_matrices_refilled": refilled}
        if key == "sparse_structure_flow_model":
            flow = model  # kept on the GPU to calibrate the decoder's occupancy
        if key == "sparse_structure_decoder" and args.occupancy > 0:
            entry["occupancy"] = calibrate_occupancy(flow, model, args.occupancy)
            flow = None
        entry.update(save(model, out / MODELS[key][0], config, args.keep_buffers))
        entry["seconds"] = round(time.time() - began, 1)
        report["models"][key] = entry
        print(
            f"[weights] {key}: {entry['class']} {entry['elements'] / 1e6:.0f}M in "
            f"{entry['seconds']} s",
            flush=True,
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["dinov3"] = write_dinov3(out / DINOV3, args.seed, device)
    pipeline_files(checkout, out)
    report["seconds"] = round(time.time() - started, 1)
    report["bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[weights] {report['bytes'] / 2**30:.1f} GiB in {report['seconds']} s", flush=True)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
