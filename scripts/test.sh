#!/usr/bin/env bash
# Run every test: lint, the backend suite (.venv), then the add-on suite inside real
# Blender-as-a-module on the oldest supported LTS (4.2, Python 3.11) and the newest (5.3, 3.13).
# Extra arguments go to the backend pytest run (e.g. -k server).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --bpy

.venv/bin/ruff check .
.venv/bin/ruff format --check .

status=0
.venv/bin/python -m pytest tests --ignore=tests/bpy -q -p no:randomly "$@" || status=$?

for venv in .venv-bpy42 .venv-bpy53; do
  if [ -x "$venv/bin/python" ]; then
    echo "== add-on tests in $venv"
    "$venv/bin/python" -m pytest tests/bpy -q || status=$?
  else
    echo "== $venv missing: add-on tests not run" >&2
    status=1
  fi
done
exit $status
