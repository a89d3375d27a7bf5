#!/usr/bin/env bash
# The main job: a federated DP + SecAgg+ simulation on the embedded synthetic population.
# Writes its run folder (summary.json, report.md, plots, ledgers, aligner) to runs/latest unless
# --run-dir is given. Extra arguments go to `fed-nessa simulate` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FED_NESSA_VENV:-.venv}"
[[ -x "$VENV/bin/fed-nessa" ]] || bash scripts/setup.sh
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr-home}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# One BLAS thread, as the committed runs used: the generated data (and so each device's noise
# seed) is then bit-identical to theirs.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# runs/latest is the latest run: an earlier run in the run folder is replaced (ledgers and key store
# included), unless the run is resumed.
replace=(--replace)
for arg in "$@"; do [[ "$arg" == "--resume" ]] && replace=(); done
exec "$VENV/bin/fed-nessa" simulate "${replace[@]}" "$@"
