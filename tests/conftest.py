"""Shared test set-up: one torch thread per process (2-core CI machines), no stray Ray clusters."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
