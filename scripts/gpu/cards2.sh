#!/usr/bin/env bash
# A shorter follow-up of cards.sh on one GPU: the real texturing pipeline first, then 24 GB
# (high and game-asset against upstream alone) and 12 GB, with the fitted export model.
# usage: bash scripts/gpu/cards2.sh [BUDGET_SECONDS (default 420)]
set -uo pipefail
T0=$(date +%s)
BUDGET=${1:-420}
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
{
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1
LEFT=$(( T0 + BUDGET - 15 - $(date +%s) ))
timeout "$LEFT" python3 scripts/gpu/cards.py --texture --cards 24,12 --presets high,balanced \
  --upstream 24,12 --out "$OUT/cards2.json" --budget $(( LEFT - 5 ))
} 2>&1 | grep -v -E "it/s\]|s/it\]|TOO BIG|xFormers|XFORMERS|Python  3|PyTorch 2|Please re|Memory-eff|SyntaxWarn|^  \"\"\"|torch.cross|normals0|default value" | tee "$OUT/run.log" | tail -60
