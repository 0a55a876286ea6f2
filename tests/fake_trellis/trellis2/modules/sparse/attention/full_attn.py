"""Fake of the real dispatcher, with its scoping: `import flash_attn` inside the function makes
the name local, so the `globals()` check never helps and the module must be importable."""

import fake_control
import torch

from .. import config


def sparse_scaled_dot_product_attention(qkv):
    """qkv: [T, 3, H, C] for one sequence -> [T, H, C]."""
    fake_control.count(f"sparse_attention_{config.ATTN}")
    cu = torch.tensor([0, qkv.shape[0]], dtype=torch.int32)
    if config.ATTN == "xformers":
        import xformers.ops as xops

        q, k, v = qkv.unbind(dim=1)
        return xops.memory_efficient_attention(q[None], k[None], v[None])[0]
    if config.ATTN == "flash_attn":
        if "flash_attn" not in globals():
            import flash_attn
        return flash_attn.flash_attn_varlen_qkvpacked_func(qkv, cu, qkv.shape[0])
    raise ValueError(f"Unknown attention module: {config.ATTN}")
