"""The SDPA fallback for TRELLIS.2's sparse attention against a plain per-sequence reference."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from backend.engines import sparse_attention as sa  # noqa: E402


def reference(q, k, v, lq, lk):
    out, a, b = [], 0, 0
    for n, m in zip(lq, lk, strict=True):
        qi, ki, vi = q[a : a + n], k[b : b + m], v[b : b + m]
        if n and m:
            w = torch.einsum("qhc,khc->hqk", qi.double(), ki.double()) / math.sqrt(q.shape[-1])
            out.append(torch.einsum("hqk,khc->qhc", w.softmax(-1), vi.double()))
        else:
            out.append(torch.zeros(n, q.shape[1], v.shape[2], dtype=torch.float64))
        a, b = a + n, b + m
    return torch.cat(out)


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize(
    "lq, lk",
    [
        ([37], [37]),  # one object: the single-call path
        ([5, 64, 1, 17, 64, 33], [5, 64, 1, 17, 64, 33]),  # windows of mixed sizes
        ([3, 9, 40], [1029, 1029, 1029]),  # sparse queries against dense image tokens
        ([4, 0, 6], [2, 3, 0]),  # empty sequences on either side give zeros
    ],
)
def test_varlen_matches_per_sequence_attention(lq, lk):
    g = torch.Generator().manual_seed(0)
    h, c = 3, 8
    q = torch.randn(sum(lq), h, c, generator=g)
    k = torch.randn(sum(lk), h, c, generator=g)
    v = torch.randn(sum(lk), h, c + 2, generator=g)
    got = sa.varlen_attention(q, k, v, cu(lq), cu(lk))
    assert got.shape == (sum(lq), h, c + 2)
    assert torch.allclose(got.double(), reference(q, k, v, lq, lk), atol=1e-5)


def test_packed_entry_points_unpack_like_flash_attn():
    g = torch.Generator().manual_seed(1)
    lengths = [7, 12, 12, 3]
    qkv = torch.randn(sum(lengths), 3, 2, 4, generator=g)
    q, k, v = qkv.unbind(1)
    expected = reference(q, k, v, lengths, lengths)
    got = sa.flash_attn_varlen_qkvpacked_func(qkv, cu(lengths), max(lengths))
    assert torch.allclose(got.double(), expected, atol=1e-5)
    kv = torch.stack([k, v], 1)
    got = sa.flash_attn_varlen_kvpacked_func(q, kv, cu(lengths), cu(lengths), 12, 12)
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_what_it_cannot_do_is_refused():
    x = torch.zeros(4, 1, 2)
    with pytest.raises(NotImplementedError):
        sa.flash_attn_varlen_func(x, x, x, cu([4]), cu([4]), 4, 4, causal=True)
