#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine (idempotent):
#   .venv/          Python 3.11 (or python3) with the backend, server (Celery, redis-py), test and
#                   lint dependencies (the studio-server tests also need `redis-server` on PATH)
#   node_modules/   the Khronos glTF-Validator used by the tests
#   .venv-bpy42/    Blender 4.2 LTS as a Python module (Python 3.11)   } only with --bpy
#   .venv-bpy53/    Blender 5.3 as a Python module (Python 3.13)        }
set -euo pipefail
cd "$(dirname "$0")/.."

want_bpy=0
for arg in "$@"; do
  case "$arg" in
    --bpy) want_bpy=1 ;;
    *) echo "usage: $0 [--bpy]" >&2; exit 2 ;;
  esac
done

pick_python() {
  for candidate in "${PYTHON:-}" "$(command -v pyenv >/dev/null 2>&1 && echo "$(pyenv root)/versions/3.11.7/bin/python3")" python3.11 python3; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1; then
      echo "$candidate"; return
    fi
  done
  echo "no python3 found" >&2; exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(pick_python)" -m venv .venv
fi
.venv/bin/python -m pip install -q --no-cache-dir --disable-pip-version-check --upgrade pip
# torch is pinned: the fake TRELLIS.2 tests need it, and an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q --no-cache-dir --disable-pip-version-check -e ".[test,server]" "torch==2.13.0"

if command -v npm >/dev/null 2>&1; then
  if [ ! -d node_modules/gltf-validator ]; then
    npm ci --no-audit --no-fund --loglevel=error
  fi
else
  echo "warning: npm not found; tests that use the Khronos glTF-Validator will be skipped" >&2
fi

if [ "$want_bpy" = 1 ]; then
  bash scripts/setup_bpy.sh
fi
