#!/usr/bin/env bash
# Device-level update rules compared on one fleet (docs/results.md "Device-level DP", "FedSGD vs DP-FedAvg"):
# FedSGD vs DP-FedAvg vs DP-FedAvg with adaptive clipping vs the same with server Adam's DP bias correction,
# every run a `fed-nessa simulate --engine fleet` (fast numerics) with privacy-unit = device into
# runs/studies/fedavg-* (not committed), its row added to results/device_fedavg.csv (simulations/results_csv.py).
#   bash simulations/device_fedavg_study.sh [DEVICES] [EPSILON] [ROUNDS] [ARMS]
# defaults: 3000 8 20 "fedsgd fedavg fedavg-adaptive fedavg-adaptive-adambc" (ARMS: a subset, e.g. to run
# two arms side by side). Every device in every round (q = 1); NESSA trained end to end (linear-start none, as
# the device-level study's NESSA arm) by ROUNDS device-level rounds calibrated to the whole epsilon
# (delta derived below 1 / devices). Arms:
#   fedsgd                  each device's mean gradient over 8 of its pairs clipped to 0.1, server Adam lr 0.01;
#   fedavg                  one local epoch of SGD (minibatches of 16, lr 0.01), the delta clipped to 0.1,
#                           server SGD lr 0.1 with momentum 0.9 (a steady step of ~1 x the mean delta);
#   fedavg-adaptive         the same, the clip following the private median of the update norms (clip-lr 0.2,
#                           the bit count's noise 0.05 x the fleet);
#   fedavg-adaptive-adambc  the same, server Adam with the DP bias correction (adam-bc), lr 0.01.
set -euo pipefail
cd "$(dirname "$0")/.."
fresh() { rm -rf "$1" "$1.keys"; echo "$1"; }
VENV="${FED_NESSA_VENV:-.venv}"
RUNS=runs/studies CSV=results/device_fedavg.csv
record() { "$VENV/bin/python" -m simulations.results_csv "$CSV" "$RUNS/$1"; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
n=${1:-3000}
eps=${2:-8}
rounds=${3:-20}
chosen=${4:-"fedsgd fedavg fedavg-adaptive fedavg-adaptive-adambc"}
common="--engine fleet --quiet --set num-devices=$n --set eval-every=5 --set references=false
        --set privacy-unit=device --set epsilon-budget=$eps --set aligner=nessa --set linear-start=none
        --set num-server-rounds=$rounds"
fedavg="--set device-update=fedavg --set local-epochs=1 --set local-batch=16 --set local-lr=0.01"
declare -A arms=(
  [fedsgd]="--set device-update=fedsgd --set device-batch=8 --set server-optimizer=adam --set server-lr=0.01"
  [fedavg]="$fedavg --set server-optimizer=sgd --set server-lr=0.1"
  [fedavg-adaptive]="$fedavg --set server-optimizer=sgd --set server-lr=0.1 --set clip-target-quantile=0.5"
  [fedavg-adaptive-adambc]="$fedavg --set server-optimizer=adam-bc --set server-lr=0.01 --set clip-target-quantile=0.5"
)
for arm in $chosen; do
  run="fedavg-${n}dev-${arm}-eps$eps"
  echo "$(date +%T) $run"
  "$VENV/bin/python" -m fed_nessa.cli simulate $common ${arms[$arm]} --run-dir "$(fresh "$RUNS/$run")"
  record "$run"
done
"$VENV/bin/python" -m simulations.device_fedavg_table "$CSV"
