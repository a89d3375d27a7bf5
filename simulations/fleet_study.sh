#!/usr/bin/env bash
# The fleet study (docs/results.md "Fleet scale"): fleet size x epsilon x {DP linear start, DP NESSA},
# every run a `fed-nessa simulate --engine fleet` into runs/studies/fleet-* (not committed), its row
# added to results/fleet.csv (simulations/results_csv.py); then the table and the plot from the CSV.
#   bash simulations/fleet_study.sh [SIZES] [EPSILONS] [ROUNDS]
# defaults: "1000 3000 10000" "8 3 1" 500. Full participation, every round's expected sample ~22.8k
# pairs (q = 0.02 at 10k devices), Adam lr 1e-3, 30 % of epsilon on the statistics round.
set -euo pipefail
cd "$(dirname "$0")/.."
# `simulate` refuses a run folder that already holds a run: a re-run of the study replaces its own folders.
fresh() { rm -rf "$1" "$1.keys"; echo "$1"; }
VENV="${FED_NESSA_VENV:-.venv}"
RUNS=runs/studies CSV=results/fleet.csv
record() { "$VENV/bin/python" -m simulations.results_csv "$CSV" "$RUNS/$1"; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
sizes=${1:-"1000 3000 10000"}
epsilons=${2:-"8 3 1"}
rounds=${3:-500}
# The fleet-size settings (quantization range, promised g, q, budget split, the devices' policies) are
# derived by the fleet engine from num-devices and epsilon (fed_nessa/sim/fleet_settings.py).
for n in $sizes; do
  common="--engine fleet --quiet --set num-devices=$n --set eval-every=50"
  for eps in $epsilons; do
    echo "$(date +%T) fleet-${n}dev-linear-eps$eps"
    "$VENV/bin/fed-nessa" simulate $common --set epsilon-budget="$eps" --set aligner=linear \
      --set num-server-rounds=1 --run-dir "$(fresh "$RUNS/fleet-${n}dev-linear-eps$eps")"
    record "fleet-${n}dev-linear-eps$eps"
    echo "$(date +%T) fleet-${n}dev-nessa-eps$eps"
    "$VENV/bin/fed-nessa" simulate $common --set epsilon-budget="$eps" --set aligner=nessa \
      --set num-server-rounds=$((rounds + 1)) --run-dir "$(fresh "$RUNS/fleet-${n}dev-nessa-eps$eps")"
    record "fleet-${n}dev-nessa-eps$eps"
  done
done
"$VENV/bin/python" -m simulations.fleet_table "$CSV" --plot docs/fleet-study.png
