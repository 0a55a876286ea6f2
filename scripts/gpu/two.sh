#!/usr/bin/env bash
# Two jobs on a machine with two GPUs in one device call: the kit is unpacked and the weights
# made once, then command A runs on GPU 0 and command B on GPU 1, each with the time left.
# Logs and small results come back packed in one file (the device returns at most 8 files);
# GLBs under $OUT/glb come back in pieces (scripts/gpu/bring_back.py; join_pieces.py here).
# usage (repository root, .gpukit carried):
#   bash scripts/gpu/two.sh BUDGET_SECONDS 'COMMAND A' 'COMMAND B'
# COMMAND sees $LEFT (seconds it may take) and $OUT; e.g.
#   bash scripts/gpu/two.sh 580 'bash scripts/gpu_test.sh $LEFT tests/test_gpu_trellis2.py' \
#     'python3 scripts/gpu/cards.py --cards 16 --batch fast:mid --out $OUT/c16.json --budget $LEFT'
set -uo pipefail
T0=$(date +%s)
BUDGET=$1 A=$2 B=$3
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
source scripts/gpu/env.sh > "$OUT/setup.log" 2>&1
export PYTHONUNBUFFERED=1
NOISE="it/s\]|s/it\]|TOO BIG|xFormers|XFORMERS|Python  3|PyTorch 2|Please re|Memory-eff|SyntaxWarn|^  \"\"\"|torch.cross|normals0|default value"
for i in 0 1; do
  CMD=$A; [ $i = 1 ] && CMD=$B
  (
    export CUDA_VISIBLE_DEVICES=$i OUT=$OUT/gpu$i BRING_BACK=0
    mkdir -p "$OUT"
    LEFT=$(( T0 + BUDGET - 25 - $(date +%s) )); export LEFT
    timeout "$LEFT" bash -c "$CMD" 2>&1 | grep -v -E "$NOISE" > "$OUT/../gpu$i.log"
  ) &
done
wait
mkdir -p "$OUT/glb"
for i in 0 1; do
  for f in "$OUT"/gpu$i/glb/*.glb*; do [ -f "$f" ] && mv "$f" "$OUT/glb/gpu${i}_$(basename "$f")"; done
done
tail -25 "$OUT/gpu0.log"; echo ----; tail -25 "$OUT/gpu1.log"
(cd "$OUT" && tar --exclude=glb --exclude=results.tar.xz -cJf results.tar.xz setup.log gpu0.log gpu1.log gpu0 gpu1 \
  && rm -rf setup.log gpu0.log gpu1.log gpu0 gpu1)
python3 scripts/gpu/bring_back.py "$OUT" "$W/pending"
ls -la "$OUT" "$OUT/glb"
