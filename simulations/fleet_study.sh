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
for n in $sizes; do
  q=$("$VENV/bin/python" -c "print(min(1.0, 22800 / ($n * 112)))")
  qr=$("$VENV/bin/python" -c "import math; print(min(2**22, 2 ** int(math.log2((2**32 - 1) / $n))))")
  g=$((n * 8 / 10))
  common="--engine fleet --quiet --set num-devices=$n --set clients-per-round=0 --set min-arrivals=50
          --set secagg-quantization-range=$qr --set eval-every=50 --device-set guaranteed-arrivals=$g
          --device-set min-noise-multiplier=0.2 --device-set min-suffstats-noise-multiplier=0.2"
  for eps in $epsilons; do
    echo "$(date +%T) fleet-${n}dev-linear-eps$eps"
    "$VENV/bin/fed-nessa" simulate $common --set epsilon-budget="$eps" --device-set epsilon-budget="$eps" \
      --set aligner=linear --set budget-split=0.3 --set sample-rate="$q" --set num-server-rounds=1 \
      --run-dir "$(fresh "$RUNS/fleet-${n}dev-linear-eps$eps")"
    record "fleet-${n}dev-linear-eps$eps"
    echo "$(date +%T) fleet-${n}dev-nessa-eps$eps"
    "$VENV/bin/fed-nessa" simulate $common --set epsilon-budget="$eps" --device-set epsilon-budget="$eps" \
      --set aligner=nessa --set budget-split=0.3 --set sample-rate="$q" --set num-server-rounds=$((rounds + 1)) \
      --run-dir "$(fresh "$RUNS/fleet-${n}dev-nessa-eps$eps")"
    record "fleet-${n}dev-nessa-eps$eps"
  done
done
"$VENV/bin/python" -m simulations.fleet_table "$CSV" --plot docs/fleet-study.png
