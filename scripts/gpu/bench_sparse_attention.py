"""The SDPA fallback for sparse attention, measured on the GPU with TRELLIS.2's shapes.

usage: python scripts/gpu/bench_sparse_attention.py --out bench_attention.json

For each call shape TRELLIS.2 makes (self-attention over one object's tokens, cross-attention
to the DINOv3 tokens, windowed self-attention over many short windows): the largest absolute
difference from an exact float64 reference, and the time of our grouped SDPA against the
per-sequence SDPA loop (the simplest correct fallback) and against xformers where it works.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HEADS, DIM = 12, 128  # TRELLIS.2's SLat flows: 1536 channels, 12 heads


def cases(torch):
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(1, 513, (400,), generator=g).tolist()  # 8^3 windows, partly empty
    return {
        "self 2.5k tokens (512)": ([2468], [2468]),
        "self 9.7k tokens (1024 cascade)": ([9680], [9680]),
        "cross 9.7k x 4101 (DINOv3 1024)": ([9680], [4101]),
        "windowed 400 windows": (windows, windows),
    }


def per_sequence(q, k, v, lq, lk):
    import torch.nn.functional as F

    out, a, b = [], 0, 0
    for n, m in zip(lq, lk, strict=True):
        o = F.scaled_dot_product_attention(
            q[a : a + n].transpose(0, 1)[None],
            k[b : b + m].transpose(0, 1)[None],
            v[b : b + m].transpose(0, 1)[None],
        )
        out.append(o[0].transpose(0, 1))
        a, b = a + n, b + m
    return __import__("torch").cat(out)


def xformers_call(xops, q, k, v, mask):
    return xops.memory_efficient_attention(q[None], k[None], v[None], mask)[0]


def exact(q, k, v, lq, lk):
    import torch

    out, a, b = [], 0, 0
    for n, m in zip(lq, lk, strict=True):
        qi, ki, vi = (x.double() for x in (q[a : a + n], k[b : b + m], v[b : b + m]))
        w = torch.einsum("qhc,khc->hqk", qi, ki) / DIM**0.5
        out.append(torch.einsum("hqk,khc->qhc", w.softmax(-1), vi))
        a, b = a + n, b + m
    return torch.cat(out)


def timed(torch, fn, repeats=10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch

    from backend.engines import attention, sparse_attention

    xformers_problem = attention.usable("xformers")
    report: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "xformers": xformers_problem or "works",
        "cases": {},
    }
    for name, (lq, lk) in cases(torch).items():
        g = torch.Generator(device="cuda").manual_seed(1)
        q = torch.randn(sum(lq), HEADS, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
        k = torch.randn(sum(lk), HEADS, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
        v = torch.randn(sum(lk), HEADS, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
        cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32).cuda()
        cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32).cuda()
        ours = functools.partial(sparse_attention.varlen_attention, q, k, v, cu_q, cu_k)
        loop = functools.partial(per_sequence, q, k, v, lq, lk)
        reference = exact(q, k, v, lq, lk)
        entry = {
            "sequences": len(lq),
            "tokens_q": sum(lq),
            "tokens_kv": sum(lk),
            "max_abs_diff_ours_vs_exact": float((ours().double() - reference).abs().max()),
            "max_abs_diff_loop_vs_exact": float((loop().double() - reference).abs().max()),
            "ms_ours": round(timed(torch, ours), 3),
            "ms_per_sequence_loop": round(timed(torch, loop), 3),
        }
        if xformers_problem is None:
            import xformers.ops as xops

            mask = xops.fmha.BlockDiagonalMask.from_seqlens(lq, lk)
            xf = functools.partial(xformers_call, xops, q, k, v, mask)
            entry["max_abs_diff_xformers_vs_exact"] = float((xf().double() - reference).abs().max())
            entry["ms_xformers"] = round(timed(torch, xf), 3)
        report["cases"][name] = entry
        print(name, entry, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
