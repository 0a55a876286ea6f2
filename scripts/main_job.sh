#!/usr/bin/env bash
# The README's main job on a fresh machine: set up the venvs, then in real Blender 5.3 as a
# Python module enable the extension, start the backend (preview engine) through the
# supervisor, generate from an example image, import the model and render a PNG with Cycles.
# Arguments go to scripts/main_job.py (e.g. --image examples/robot.png --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --bpy
.venv-bpy53/bin/python scripts/main_job.py --out out/main_job "$@"
