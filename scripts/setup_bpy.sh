#!/usr/bin/env bash
# Create the two Blender-as-a-module venvs the add-on tests run in:
#   .venv-bpy42  pyenv Python 3.11 + bpy 4.2.23 (oldest supported LTS)
#   .venv-bpy53  pyenv Python 3.13.0 + bpy 5.3.0 (newest)
# Each also gets pytest, pyzmq, Pillow, trimesh and numpy. Idempotent: an existing venv whose
# bpy version matches is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYENV_ROOT="${PYENV_ROOT:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")}"

make_venv() {
  local dir="$1" python="$2" bpy_version="$3"
  if [ -x "$dir/bin/python" ] && "$dir/bin/python" -m pip show bpy 2>/dev/null | grep -qx "Version: $bpy_version"; then
    echo "$dir: bpy $bpy_version already installed"
    return
  fi
  if [ ! -x "$python" ]; then
    echo "missing interpreter $python (pyenv install it first)" >&2
    exit 1
  fi
  "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --no-cache-dir --upgrade pip
  "$dir/bin/python" -m pip install -q --no-cache-dir "bpy==$bpy_version" pytest pytest-timeout pyzmq Pillow trimesh numpy
  echo "$dir: $("$dir/bin/python" -c 'import sys; print(sys.version.split()[0])') with bpy $bpy_version"
}

# One after the other, without pip's cache: each venv is about 1.1 GB unpacked, and a CI machine's
# disk can be nearly full (one run ran out installing both at once).
make_venv .venv-bpy42 "$PYENV_ROOT/versions/3.11.7/bin/python3" 4.2.23
make_venv .venv-bpy53 "$PYENV_ROOT/versions/3.13.0/bin/python3" 5.3.0
