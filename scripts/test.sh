#!/usr/bin/env bash
# The test suite: sets up .venv from nothing, then lint + pytest (8 emulated CPU devices).
# Usage: ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh dev,export,tfds
export JAX_PLATFORMS=cpu
export PYTHONHASHSEED=0
export TF_CPP_MIN_LOG_LEVEL=3
# XLA's per-step host buffers on transparent huge pages (lmdir_jax/runtime.py; `lmdir` sets it itself).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
echo "[test] ruff"
.venv/bin/ruff check lmdir_jax tests configs notebooks
echo "[test] pytest"
exec .venv/bin/python -m pytest -q -n 2 "$@"
