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

# iproute2 (`ss`, `ip netns`) for the tests that check what the local stack listens on and that run
# several hosts in network namespaces; installed only when missing and only as root.
if ! command -v ss >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
  else
    echo "note: ss/ip are missing; as root run: apt-get install -y --no-install-recommends iproute2" >&2
  fi
fi

# Prometheus and promtool (Debian package) for the alert-rule tests and the real-Prometheus e2e test.
# Installed only when missing and only as root; otherwise say what to run, and the tests say so too.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package enables a system service; the tests run their own Prometheus on a free port instead.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  else
    echo "note: prometheus/promtool are missing; as root run: apt-get install -y --no-install-recommends prometheus" >&2
  fi
fi
echo "headshots is set up in $VENV (activate with: . $VENV/bin/activate)"
