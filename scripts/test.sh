#!/usr/bin/env bash
# The test suite (unit + end-to-end with real Flower, SecAgg+ and Opacus). Installs first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FED_NESSA_VENV:-.venv}"
[[ -x "$VENV/bin/fed-nessa" ]] || bash scripts/setup.sh --with-extract
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr-home}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$VENV/bin/python" -m pytest "$@"
