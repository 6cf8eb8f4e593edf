#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit, integration (real S3 server + local Ray),
# e2e (the CLI). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${HEADSHOTS_VENV:-.venv}"
# Tests start and stop their own servers; keep them off the user's real stack.
export HEADSHOTS_HOME="${HEADSHOTS_TEST_HOME:-$(mktemp -d)/headshots-home}"
export PATH="$PWD/$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
