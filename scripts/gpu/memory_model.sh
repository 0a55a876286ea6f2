#!/usr/bin/env bash
# The memory model in one device call (repository root, GPU machine, .gpukit carried):
# unpack the kit, make the random weights, probe upstream's mesh voxelisation, then measure.
# usage: bash scripts/gpu/memory_model.sh [BUDGET_SECONDS (default 560)] [CASES (comma list)]
set -uo pipefail
T0=$(date +%s)
BUDGET=${1:-560}
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
{
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1
date; date -u
python3 scripts/gpu/probe_voxelise.py --out "$OUT/voxelise_probe.json"
LEFT=$(( T0 + BUDGET - 15 - $(date +%s) ))
timeout "$LEFT" python3 scripts/gpu/memory_model.py --out "$OUT/memory_model.json" \
  --budget $(( LEFT - 10 )) --only "${2:-}"
echo "memory_model rc=$?"
} 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$OUT/run.log"
