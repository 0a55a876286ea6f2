# Sourced on the GPU machine by scripts/gpu_test.sh and scripts/gpu/bench.sh (repository root):
# unpack the carried kit (.gpukit) into $W once per machine, make random weights once, and
# export what the real engine and the tests need.
K=$PWD/.gpukit W=${GPU_WORK:-/tmp/t2}
mkdir -p "$W"
if [ ! -d "$W/site" ]; then
  tar -xJf "$K/site312.tar.xz" -C "$W" && mv "$W/site312" "$W/site"
  # Packages in folders of their own, so doctor can be shown an install without them.
  mkdir -p "$W/site_cumesh" "$W/site_transformers"
  mv "$W"/site/cumesh* "$W/site_cumesh/"
  mv "$W"/site/transformers* "$W"/site/tokenizers* "$W"/site/huggingface_hub* "$W/site_transformers/"
fi
[ -d "$W/src" ] || { mkdir -p "$W/src" && tar -xzf "$K/bundle.tar.gz" -C "$W/src"; }
[ -x "$W/node" ] || { xz -dc "$K/node.xz" > "$W/node" && chmod +x "$W/node"; }
[ -d "$W/validator" ] || { mkdir -p "$W/validator" && tar -xzf "$K/gltf-validator.tgz" -C "$W/validator"; }
mkdir -p ~/.flex_gemm
[ -f ~/.flex_gemm/autotune_cache.json ] || cp "$W/src/FlexGEMM/autotune_cache.json" ~/.flex_gemm/ 2>/dev/null
# A Triton cache from an earlier call saves FlexGEMM's first-use kernel compiles (about 1 min).
if [ -f "$K/triton-cache.tar.xz" ] && [ ! -d ~/.triton/cache ]; then
  mkdir -p ~/.triton && tar -xJf "$K/triton-cache.tar.xz" -C ~/.triton
fi
export GPU_SITE_CUMESH=$W/site_cumesh GPU_SITE_TRANSFORMERS=$W/site_transformers
export PYTHONPATH=$W/site:$GPU_SITE_CUMESH:$GPU_SITE_TRANSFORMERS:$PWD
export TRELLIS2_CHECKOUT=$W/src/TRELLIS.2 TRELLIS2_WEIGHTS=$W/weights
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
if [ ! -f "$W/weights/pipeline.json" ]; then
  echo "== weights"
  python3 scripts/gpu/make_weights.py --trellis "$TRELLIS2_CHECKOUT" --out "$W/weights" \
    --occupancy "${OCCUPANCY:-0.08}" --report "${OUT:-$W}/weights.json" || echo "make_weights failed"
fi
