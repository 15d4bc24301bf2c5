#!/usr/bin/env bash
# Create the virtual environment (if missing or out of date) and install lmdir-jax with the given extras.
# Usage: scripts/setup_env.sh [EXTRAS]   e.g. scripts/setup_env.sh dev,export
# Environment: PYTHON=interpreter (default python3), VENV=folder (default .venv). VENV may live outside
# the clone (CI keeps one per Python and pyproject.toml in a cache folder): the package itself is
# (re)installed in editable mode whenever the venv points at another checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
STAMP="$VENV/.lmdir-installed-${EXTRAS//,/-}"
HASH="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[setup] installing lmdir-jax${EXTRAS:+[$EXTRAS]} into $VENV (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if [ -n "$EXTRAS" ]; then
    "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  else
    "$VENV/bin/python" -m pip install -q -e .
  fi
  echo "$HASH" > "$STAMP"
fi
HERE="$(pwd -P)"
WHERE="$(cd / && "$VENV/bin/python" -c 'import pathlib, lmdir_jax; print(pathlib.Path(lmdir_jax.__file__).resolve().parents[1])' 2>/dev/null || true)"
if [ "$WHERE" != "$HERE" ]; then
  echo "[setup] pointing $VENV at this checkout ($HERE)"
  "$VENV/bin/python" -m pip install -q --no-deps -e .
fi
