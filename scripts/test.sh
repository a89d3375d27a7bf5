#!/usr/bin/env bash
# The test suite: the layer rules (import-linter), ruff, mypy, then pytest (unit + end-to-end with
# real Flower, SecAgg+ and Opacus). Installs first if needed. Arguments go to pytest
# (the fast lane: `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FED_NESSA_VENV:-.venv}"
[[ -x "$VENV/bin/fed-nessa" && -x "$VENV/bin/lint-imports" ]] || bash scripts/setup.sh --with-extract
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr-home}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "== import-linter (layer rules)"
layers=$("$VENV/bin/lint-imports" --no-cache 2>&1) || { echo "$layers"; exit 1; }
echo "$layers" | grep -E "KEPT|Contracts:"
echo "== ruff"; "$VENV/bin/ruff" check .
echo "== mypy"; "$VENV/bin/mypy"
echo "== pytest"
# --durations=15: the slowest tests, so a test that grows slow shows up in every run.
exec "$VENV/bin/python" -m pytest --durations=15 "$@"
