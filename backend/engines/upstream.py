"""What the TRELLIS.2 adapter needs from upstream: every callable it uses with the keyword
arguments it passes (doctor checks them against the installed checkout's signatures), and the
one-line fix for each module that may be missing (the engine's errors and doctor share it).
Data only; nothing here imports upstream."""

from __future__ import annotations

from dataclasses import dataclass

# One-line fixes for missing upstream modules; doctor uses the same table.
FIX_HINTS = {
    "torch": "Install PyTorch with CUDA in the TRELLIS.2 environment (setup.sh --new-env).",
    "transformers": "pip install 'transformers>=4.56,<5'",
    "trellis2": "Set TRELLIS2_CHECKOUT (or --engine-opt trellis_checkout=...) to your "
    "TRELLIS.2 clone.",
    "o_voxel": "Install o-voxel from the TRELLIS.2 clone: pip install ./o-voxel "
    "--no-build-isolation (setup.sh --o-voxel).",
    "cumesh": "Build CuMesh: git clone --recursive https://github.com/JeffreyXiang/CuMesh && "
    "pip install ./CuMesh --no-build-isolation.",
    "flex_gemm": "Build FlexGEMM: git clone --recursive https://github.com/JeffreyXiang/FlexGEMM "
    "&& pip install ./FlexGEMM --no-build-isolation.",
    "nvdiffrast": "pip install git+https://github.com/NVlabs/nvdiffrast.git@v0.4.0 "
    "--no-build-isolation",
    "safetensors": "pip install safetensors",
    "huggingface_hub": "pip install huggingface_hub",
    "easydict": "pip install easydict",
    "cv2": "pip install opencv-python-headless",
    "torchvision": "Install torchvision matching your torch build.",
    "trimesh": "pip install trimesh",
}


@dataclass(frozen=True)
class UpstreamCall:
    """One trellis2 / o_voxel callable and the keyword arguments this adapter passes it."""

    module: str
    qualname: str
    args: tuple[str, ...]
    method: bool = True  # bound method or constructor: the first parameter is self

    @property
    def target(self) -> str:
        return f"{self.module}.{self.qualname}"


_P = "trellis2.pipelines.trellis2_image_to_3d"
_PC = "Trellis2ImageTo3DPipeline"
_T = "trellis2.pipelines.trellis2_texturing"
_TC = "Trellis2TexturingPipeline"
# Every upstream call site of this module, by the argument names it uses (all calls below
# pass these as keywords), so `doctor` can check them against the installed code.
UPSTREAM_CALLS: tuple[UpstreamCall, ...] = (
    UpstreamCall("trellis2.models", "from_pretrained", ("path",), method=False),
    UpstreamCall(
        _P,
        f"{_PC}.__init__",
        (
            "models",
            "sparse_structure_sampler",
            "shape_slat_sampler",
            "tex_slat_sampler",
            "sparse_structure_sampler_params",
            "shape_slat_sampler_params",
            "tex_slat_sampler_params",
            "shape_slat_normalization",
            "tex_slat_normalization",
            "image_cond_model",
            "rembg_model",
            "low_vram",
            "default_pipeline_type",
        ),
    ),
    UpstreamCall(_P, f"{_PC}.to", ("device",)),
    UpstreamCall(_P, f"{_PC}.get_cond", ("image", "resolution", "include_neg_cond")),
    UpstreamCall(
        _P,
        f"{_PC}.sample_sparse_structure",
        ("cond", "resolution", "num_samples", "sampler_params"),
    ),
    UpstreamCall(
        _P, f"{_PC}.sample_shape_slat", ("cond", "flow_model", "coords", "sampler_params")
    ),
    UpstreamCall(
        _P,
        f"{_PC}.sample_shape_slat_cascade",
        (
            "lr_cond",
            "cond",
            "flow_model_lr",
            "flow_model",
            "lr_resolution",
            "resolution",
            "coords",
            "sampler_params",
            "max_num_tokens",
        ),
    ),
    UpstreamCall(
        _P, f"{_PC}.sample_tex_slat", ("cond", "flow_model", "shape_slat", "sampler_params")
    ),
    UpstreamCall(_P, f"{_PC}.decode_latent", ("shape_slat", "tex_slat", "resolution")),
    # Wrapped (not called) for per-step progress; the wrapper passes arguments through.
    UpstreamCall(
        "trellis2.pipelines.samplers",
        "FlowEulerSampler.sample_once",
        ("model", "x_t", "t", "t_prev", "cond"),
    ),
    UpstreamCall(
        "trellis2.pipelines.samplers", "FlowEulerGuidanceIntervalSampler.__init__", ("sigma_min",)
    ),
    UpstreamCall(
        "trellis2.modules.image_feature_extractor",
        "DinoV3FeatureExtractor.__init__",
        ("model_name",),
    ),
    UpstreamCall("trellis2.pipelines.rembg", "BiRefNet.__init__", ("model_name",)),
    UpstreamCall("trellis2.modules.sparse", "SparseTensor.__init__", ("feats", "coords")),
    UpstreamCall("trellis2.representations", "MeshWithVoxel.simplify", ("target",)),
    UpstreamCall(
        "o_voxel.postprocess",
        "to_glb",
        (
            "vertices",
            "faces",
            "attr_volume",
            "coords",
            "attr_layout",
            "aabb",
            "grid_size",
            "decimation_target",
            "texture_size",
            "remesh",
            "remesh_band",
            "remesh_project",
        ),
        method=False,
    ),
    UpstreamCall(
        _T,
        f"{_TC}.__init__",
        (
            "models",
            "tex_slat_sampler",
            "tex_slat_sampler_params",
            "shape_slat_normalization",
            "tex_slat_normalization",
            "image_cond_model",
            "rembg_model",
            "low_vram",
        ),
    ),
    UpstreamCall(_T, f"{_TC}.to", ("device",)),
    UpstreamCall(_T, f"{_TC}.preprocess_mesh", ("mesh",)),
    UpstreamCall(_T, f"{_TC}.get_cond", ("image", "resolution", "include_neg_cond")),
    UpstreamCall(_T, f"{_TC}.encode_shape_slat", ("mesh", "resolution")),
    UpstreamCall(
        _T, f"{_TC}.sample_tex_slat", ("cond", "flow_model", "shape_slat", "sampler_params")
    ),
    UpstreamCall(_T, f"{_TC}.decode_tex_slat", ("slat",)),
    UpstreamCall(
        _T, f"{_TC}.postprocess_mesh", ("mesh", "pbr_voxel", "resolution", "texture_size")
    ),
)


def missing_module_hint(exc: BaseException) -> tuple[str, str]:
    name = getattr(exc, "name", None) or ""
    text = str(exc)
    for module, hint in FIX_HINTS.items():
        if name.split(".")[0] == module or f"'{module}" in text or f"{module}." in text:
            return module, hint
    if "DINOv3" in text:
        return "transformers", FIX_HINTS["transformers"]
    return name or "?", "Run `python -m backend doctor` to see what is missing."
