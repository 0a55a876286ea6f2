#!/usr/bin/env bash
# Emulated 8/12/16/24 GB cards with the real TRELLIS.2, on a machine with two GPUs (one device
# call; repository root, .gpukit carried). GPU 0: 8 and 12 GB, a texture job, then more of
# the memory model; GPU 1: 16 GB (with the blind ladder) and 24 GB (with game-asset).
# usage: bash scripts/gpu/cards.sh [BUDGET_SECONDS (default 570)]
set -uo pipefail
T0=$(date +%s)
BUDGET=${1:-570}
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
{
source scripts/gpu/env.sh
export PYTHONUNBUFFERED=1
nvidia-smi -L
LEFT=$(( T0 + BUDGET - 20 - $(date +%s) ))
(
  export CUDA_VISIBLE_DEVICES=0
  python3 scripts/gpu/cards.py --cards 8,12 --presets fast,balanced,high --upstream 8,12 \
    --texture --out "$OUT/cards_8_12.json" --budget $(( LEFT - 170 )) > "$OUT/gpu0.log" 2>&1
  L2=$(( T0 + BUDGET - 25 - $(date +%s) ))
  [ "$L2" -gt 60 ] && timeout "$L2" python3 scripts/gpu/memory_model.py \
    --out "$OUT/memory_model2.json" --budget $(( L2 - 5 )) \
    --only 1024_mid,1536_mid,1024_mid_band_half,1024_mid_remesh_off,1024_mid_image384,1024_mid_no_guidance,768_mid,1024_mid_steps_full \
    >> "$OUT/gpu0.log" 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=1
  python3 scripts/gpu/cards.py --cards 16 --presets fast,balanced,high --blind 16 \
    --upstream 16 --out "$OUT/cards_16.json" --budget $(( LEFT / 2 + 20 )) > "$OUT/gpu1.log" 2>&1
  L2=$(( T0 + BUDGET - 25 - $(date +%s) ))
  timeout "$L2" python3 scripts/gpu/cards.py --cards 24 --presets fast,balanced,high,game-asset \
    --upstream 24 --out "$OUT/cards_24.json" --budget $(( L2 - 5 )) >> "$OUT/gpu1.log" 2>&1
) &
wait
grep -v -E "it/s\]|s/it\]|TOO BIG" "$OUT/gpu0.log" | tail -40 > "$OUT/gpu0.tail"
grep -v -E "it/s\]|s/it\]|TOO BIG" "$OUT/gpu1.log" | tail -40 > "$OUT/gpu1.tail"
rm -f "$OUT/gpu0.log" "$OUT/gpu1.log"
cat "$OUT/gpu0.tail" "$OUT/gpu1.tail"
} 2>&1 | grep -v -E "it/s\]|s/it\]|TOO BIG" | tail -120
