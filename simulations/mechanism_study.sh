#!/usr/bin/env bash
# Issue 19's side-by-side (docs/results.md "The integer mechanism against the continuous Gaussian"): the
# main job (1k devices, epsilon 8) under dp-mode distributed with the continuous Gaussian shares and with
# the Skellam integer mechanism, DRAWS noise draws each on the same population (same seeds; only the OS
# noise differs), into runs/studies/mech-* (not committed); a row each in results/mechanism.csv. Resumable:
# a run whose row is already in the CSV is skipped. Then the table from the CSV (with the 10k-device rows
# of results/fleet_selfset.csv and results/mechanism.csv, when there).
# The 10k-device, epsilon-8 self-set fleet cell runs under skellam FLEET_DRAWS times, as
# simulations/fleet_selfset_study.sh runs it (its Gaussian draws are that study's rows).
#   bash simulations/mechanism_study.sh [DRAWS] [FLEET_DRAWS]
set -euo pipefail
cd "$(dirname "$0")/.."
fresh() { rm -rf "$1" "$1.keys"; echo "$1"; }
VENV="${FED_NESSA_VENV:-.venv}"
RUNS=runs/studies CSV=results/mechanism.csv
record() { "$VENV/bin/python" -m simulations.results_csv "$CSV" "$RUNS/$1"; }
recorded() { [ -f "$CSV" ] && grep -q "^$1," "$CSV"; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
draws=${1:-3}
# Each mechanism at the statistics noise multiplier that costs the main job's epsilon 7.965 under its own
# accountant (the Skellam's rounding and discretisation cost a little more: 0.6454 against 0.64).
sigma() { case "$1" in gaussian) echo 0.64;; skellam) echo 0.6454;; esac; }
for d in $(seq 1 "$draws"); do
  for mech in gaussian skellam; do
    name="mech-main-${mech}-draw$d"
    if recorded "$name"; then echo "$(date +%T) $name: in $CSV, skipped"; continue; fi
    echo "$(date +%T) $name"
    "$VENV/bin/fed-nessa" simulate --quiet --set distributed-mechanism="$mech" \
      --set suffstats-noise-multiplier="$(sigma "$mech")" --run-dir "$(fresh "$RUNS/$name")"
    record "$name"
  done
done
for d in $(seq 1 "${2:-0}"); do
  name="selfset-10000dev-eps8-skellam-draw$d"
  if recorded "$name"; then echo "$(date +%T) $name: in $CSV, skipped"; continue; fi
  echo "$(date +%T) $name"
  "$VENV/bin/fed-nessa" simulate --engine fleet --quiet --set num-devices=10000 --set epsilon-budget=8 \
    --set distributed-mechanism=skellam --set ledger-layout=sqlite --set references=false --set eval-every=50 \
    --run-dir "$(fresh "$RUNS/$name")"
  record "$name"
done
"$VENV/bin/python" -m simulations.mechanism_table "$CSV" --fleet results/fleet_selfset.csv
