#!/usr/bin/env bash
# Build .gpukit/ (git-ignored) on the CPU machine: what `scripts/gpu_test.sh` needs on the GPU
# machine, which has Python 3.12 and torch 2.11+cu130 but no network.
#   site312.tar.xz      TRELLIS.2's CUDA extensions (prebuilt from ../shared/trellis2-gpu/built),
#                       transformers <5 and friends, trimesh, pyzmq, xformers: one folder, xz
#   bundle.tar.gz       upstream sources (TRELLIS.2 at 5565d24, FlexGEMM's autotune cache, ...)
#   node.xz, gltf-validator.tgz   the Khronos glTF-Validator and a Node.js to run it there
# usage: bash scripts/gpu/prepare_kit.sh [KIT_DIR (default ../shared/trellis2-gpu)]
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=${1:-../shared/trellis2-gpu}
OUT=.gpukit
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
grep -qx '/.gpukit/' .git/info/exclude 2>/dev/null || echo '/.gpukit/' >> .git/info/exclude
mkdir -p "$OUT" "$TMP/wheels" "$TMP/site312"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$TMP/wheels" \
  pyzmq==27.3.0 xformers==0.0.35
for wheel in "$KIT"/built/*.whl "$KIT"/whl/*.whl "$TMP"/wheels/*.whl; do
  unzip -q -o "$wheel" -d "$TMP/site312"
done
tar -C "$TMP" -cf - site312 | xz -6 -T2 > "$OUT/site312.tar.xz"
cp "$KIT/bundle.tar.gz" "$OUT/bundle.tar.gz"
[ -f "$OUT/node.xz" ] || xz -9 -T2 -c "$(readlink -f "$(command -v node)")" > "$OUT/node.xz"
[ -d node_modules/gltf-validator ] || npm ci --no-audit --no-fund --loglevel=error
tar -czf "$OUT/gltf-validator.tgz" node_modules/gltf-validator tests/tools/gltf_validate.mjs
du -sh "$OUT"/*
