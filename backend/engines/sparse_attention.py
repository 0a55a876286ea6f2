"""Variable-length attention on torch's scaled_dot_product_attention: TRELLIS.2's sparse
attention when neither flash-attn nor xformers is installed.

Upstream's sparse attention (`trellis2.modules.sparse.attention`, modules `full_attn` and
`windowed_attn`) accepts only xformers, flash_attn or flash_attn_3 (any other value silently
stays flash_attn) and, for flash_attn, calls three of flash-attn's varlen entry points. No
library offers those calls on plain torch, so they are written here: sequences are grouped by
padded length (powers of two, so padding at most doubles the work), each group is one batched
SDPA call with a key-padding mask. `install()` makes them what upstream's `import flash_attn`
finds. Torch is imported lazily.
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

NAME = "sdpa"


def _pow2_ceil(lengths: Any) -> Any:
    import torch

    return torch.pow(2, torch.ceil(torch.log2(lengths.clamp(min=1).double()))).long()


def _layout(cu_seqlens: Any, members: Any) -> tuple[Any, Any, Any, int]:
    """For the sequences `members`: each token's source row, its sequence's row in the batch,
    its position in the sequence, and the padded width."""
    import torch

    starts = cu_seqlens[:-1].long()[members]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()[members]
    row = torch.repeat_interleave(torch.arange(len(members), device=lengths.device), lengths)
    first = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    pos = torch.arange(int(lengths.sum()), device=lengths.device) - first
    return torch.repeat_interleave(starts, lengths) + pos, row, pos, int(lengths.max())


def varlen_attention(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    softmax_scale: float | None = None,
) -> Any:
    """softmax(q k^T) v for each sequence i of q against sequence i of k/v.
    q: [Tq, H, C], k: [Tk, H, C], v: [Tk, H, Cv] -> [Tq, H, Cv]."""
    import torch
    import torch.nn.functional as F

    cu_q = cu_seqlens_q.to(q.device).long()
    cu_k = cu_seqlens_k.to(q.device).long()
    if cu_q.shape != cu_k.shape:
        raise ValueError("query and key sequence counts differ")
    if cu_q.shape[0] == 2:  # one object per job: the common case, no padding at all
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            scale=softmax_scale,
        )
        return o[0].transpose(0, 1)
    lq, lk = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    # Group sequences whose lengths round up to the same powers of two: padding to the
    # group's longest at most doubles the work, and each group is one batched call.
    key = _pow2_ceil(lq) * (1 << 32) + _pow2_ceil(lk)
    key = torch.where((lq > 0) & (lk > 0), key, torch.full_like(key, -1))
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
    for group in torch.unique(key).tolist():
        if group < 0:
            continue  # an empty sequence on either side contributes zeros
        members = torch.nonzero(key == group).flatten()
        src_q, row_q, pos_q, width_q = _layout(cu_q, members)
        src_k, row_k, pos_k, width_k = _layout(cu_k, members)
        qb = q.new_zeros((len(members), width_q, *q.shape[1:]))
        kb = k.new_zeros((len(members), width_k, *k.shape[1:]))
        vb = v.new_zeros((len(members), width_k, *v.shape[1:]))
        qb[row_q, pos_q] = q[src_q]
        kb[row_k, pos_k] = k[src_k]
        vb[row_k, pos_k] = v[src_k]
        mask = None
        if int(lk[members].min()) != width_k:
            keys = torch.arange(width_k, device=q.device)
            mask = (keys[None, :] < lk[members][:, None])[:, None, None, :]
        ob = F.scaled_dot_product_attention(
            qb.transpose(1, 2),
            kb.transpose(1, 2),
            vb.transpose(1, 2),
            attn_mask=mask,
            scale=softmax_scale,
        ).transpose(1, 2)
        out[src_q] = ob[row_q, pos_q]
    return out


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    **unused,
):
    _refuse(dropout_p, causal)
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    **unused,
):
    _refuse(dropout_p, causal)
    k, v = kv.unbind(dim=1)
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)


def flash_attn_varlen_qkvpacked_func(
    qkv, cu_seqlens, max_seqlen=None, dropout_p=0.0, softmax_scale=None, causal=False, **unused
):
    _refuse(dropout_p, causal)
    q, k, v = qkv.unbind(dim=1)
    return varlen_attention(q, k, v, cu_seqlens, cu_seqlens, softmax_scale)


def _refuse(dropout_p: float, causal: bool) -> None:
    # TRELLIS.2 never asks for either at inference; say so rather than compute something else.
    if dropout_p or causal:
        raise NotImplementedError("the SDPA varlen fallback supports no dropout and no causal mask")


MODULE_NAME = "flash_attn"
VERSION = "0+sdpa-fallback"


def fallback_module() -> ModuleType:
    """A module with the three varlen entry points, under flash-attn's import name."""
    module = ModuleType(MODULE_NAME, "TRELLIS.2 for Blender: flash-attn varlen calls on SDPA")
    module.__spec__ = ModuleSpec(MODULE_NAME, loader=None)
    module.__version__ = VERSION
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.flash_attn_varlen_kvpacked_func = flash_attn_varlen_kvpacked_func
    module.flash_attn_varlen_qkvpacked_func = flash_attn_varlen_qkvpacked_func
    return module


def install() -> None:
    """Route upstream's sparse attention through `varlen_attention`: it must run with
    SPARSE_ATTN_BACKEND=flash_attn, and its dispatchers do `import flash_attn` inside the
    function (a local name, so the module has to come from sys.modules). Only used when the
    real flash-attn cannot be imported; its distribution metadata stays absent, so libraries
    that check for flash-attn (transformers) still see it as not installed."""
    sys.modules[MODULE_NAME] = fallback_module()
    try:
        from trellis2.modules.sparse import config  # type: ignore[import-not-found]
    except ImportError:
        return
    config.ATTN = "flash_attn"  # the branch that calls the varlen entry points


def installed() -> bool:
    return getattr(sys.modules.get(MODULE_NAME), "__version__", None) == VERSION
