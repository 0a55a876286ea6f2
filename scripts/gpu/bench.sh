#!/usr/bin/env bash
# GPU benchmarks of the real engine (repository root, GPU machine, .gpukit carried):
# adapter vs upstream run()+to_glb, and the SDPA sparse-attention fallback. Results in $OUT.
# usage: bash scripts/gpu/bench.sh [PRESET (default fast)] [REPEATS (default 2)]
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1
{
python3 scripts/gpu/bench_sparse_attention.py --out "$OUT/bench_attention.json"
python3 scripts/gpu/bench_upstream.py --out "$OUT/bench_upstream.json" --preset "${1:-fast}" --repeats "${2:-2}"
} 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$OUT/bench.log"
