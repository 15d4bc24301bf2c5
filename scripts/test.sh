#!/usr/bin/env bash
# The test suite: sets up .venv from nothing, then lint + pytest (8 emulated CPU devices).
# Usage: ./scripts/test.sh [pytest args]
# Environment: PYTHON=interpreter and VENV=folder select another Python, EXTRAS the extras to install
# (the default extras, dev,export,tfds,verify, include torch and the reference libraries of `lmdir priors verify`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export VENV
scripts/setup_env.sh "${EXTRAS:-dev,export,tfds,verify}"
export JAX_PLATFORMS=cpu
export PYTHONHASHSEED=0
export TF_CPP_MIN_LOG_LEVEL=3
# XLA's per-step host buffers on transparent huge pages (lmdir_jax/runtime.py; `lmdir` sets it itself).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
echo "[test] ruff"
"$VENV/bin/ruff" check lmdir_jax tests configs notebooks
echo "[test] pytest on $("$VENV/bin/python" --version), jax $("$VENV/bin/python" -c 'import jax; print(jax.__version__)')"
exec "$VENV/bin/python" -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
