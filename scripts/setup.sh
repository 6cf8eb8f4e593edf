#!/usr/bin/env bash
# Set up a virtual environment with headshots and its test tools, on a fresh Debian/Ubuntu machine
# with Python >= 3.11. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV="${HEADSHOTS_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
# Without torch present, resolving the project's torch range would pull a multi-GB CUDA build:
# install the CPU release first (machines that already have a torch, e.g. GPU nodes, keep theirs).
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[test]"
echo "headshots is set up in $VENV (activate with: . $VENV/bin/activate)"
