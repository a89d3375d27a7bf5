#!/usr/bin/env bash
# The device-level study (docs/results.md "Device-level DP"): fleet size x device-level epsilon x
# {DP linear start, DP NESSA}, every run a `fed-nessa simulate --engine fleet` with
# privacy-unit = device into runs/studies/device-* (not committed), its row added to
# results/device_level.csv (simulations/results_csv.py); then the table and the plot from the CSV.
#   bash simulations/device_level_study.sh [SIZES] [EPSILONS] [ROUNDS] [SERVER_LR]
# defaults: "10000 30000" "8 3 1" 100 0.01. Every device in every round, delta 1e-5 (< 1/devices),
# each arm its own run with the whole epsilon: the linear start alone (one statistics round, each
# device's statistics weighted to <= 100 pairs), or NESSA trained end to end (linear-start none) by
# device-level DP-SGD (each device's mean gradient over 8 of its pairs, clipped to 0.1 as one vector,
# q = 1). The pooled non-DP references come from the example-level fleet study's runs of the same
# population (their rows in results/fleet.csv; references = false here).
set -euo pipefail
cd "$(dirname "$0")/.."
# `simulate` refuses a run folder that already holds a run: a re-run of the study replaces its own folders.
fresh() { rm -rf "$1" "$1.keys"; echo "$1"; }
VENV="${FED_NESSA_VENV:-.venv}"
RUNS=runs/studies CSV=results/device_level.csv
record() { "$VENV/bin/python" -m simulations.results_csv "$CSV" "$RUNS/$1"; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
sizes=${1:-"10000 30000"}
epsilons=${2:-"8 3 1"}
rounds=${3:-100}
lr=${4:-0.01}
# The fleet-size settings (quantization range, promised g, delta < 1/devices, budget split 1, the devices'
# device-level policies) are derived by the fleet engine from num-devices, privacy-unit and epsilon
# (fed_nessa/sim/fleet_settings.py).
for n in $sizes; do
  common="--engine fleet --quiet --set num-devices=$n --set eval-every=25 --set references=false
          --set privacy-unit=device"
  for eps in $epsilons; do
    echo "$(date +%T) device-${n}dev-linear-eps$eps"
    "$VENV/bin/fed-nessa" simulate $common --set epsilon-budget="$eps" --set aligner=linear \
      --set num-server-rounds=1 --run-dir "$(fresh "$RUNS/device-${n}dev-linear-eps$eps")"
    record "device-${n}dev-linear-eps$eps"
    echo "$(date +%T) device-${n}dev-nessa-eps$eps"
    "$VENV/bin/fed-nessa" simulate $common --set epsilon-budget="$eps" --set aligner=nessa \
      --set linear-start=none --set device-batch=8 --set server-lr="$lr" --set num-server-rounds="$rounds" \
      --run-dir "$(fresh "$RUNS/device-${n}dev-nessa-eps$eps")"
    record "device-${n}dev-nessa-eps$eps"
  done
done
"$VENV/bin/python" -m simulations.device_level_table "$CSV" --example results/fleet.csv \
  --plot docs/device-level-study.png
