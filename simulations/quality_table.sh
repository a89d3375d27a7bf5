#!/usr/bin/env bash
# Every run of the README's federated quality table (synthetic 1000/300 devices and real-dev, each
# mode at epsilon 8/3/1), one `fed-nessa simulate` each, into runs/studies/fed-* (not committed), its
# row added to results/federated.csv (simulations/results_csv.py); then the table from the CSV.
# About 45 min on a 2-core machine (the 1000-device statistics rounds dominate).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FED_NESSA_VENV:-.venv}"
export OMP_NUM_THREADS=1 FLWR_HOME="${FLWR_HOME:-$PWD/.flwr-home}" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
common="--set secagg-num-shares=11 --set secagg-reconstruction-threshold=6 --set min-arrival-fraction=0.8
        --set batch-size=64 --set hidden=64 --set depth=1 --set server-lr=0.05 --set server-optimizer=sgd
        --set aligner=nessa"
RUNS=runs/studies CSV=results/federated.csv
# `simulate` refuses a run folder that already holds a run: a re-run of the study replaces its own folders.
fresh() { rm -rf "$1" "$1.keys"; echo "$1"; }
run() {
  local name=$1; shift; echo "$(date +%T) $name"
  "$VENV/bin/fed-nessa" simulate --quiet $common "$@" --run-dir "$(fresh "$RUNS/$name")"
  "$VENV/bin/python" -m simulations.results_csv "$CSV" "$RUNS/$name"
}
min_arrivals() { [ "$1" = 1000 ] && echo 50 || echo 15; }
cohort() { [ "$1" = 1000 ] && echo 100 || echo 30; }
# Each device's own policy (--device-set): its budget and the g its noise share is sized for, which
# must not exceed any round's promised g = max(min-arrivals, ceil(0.8 x sampled cohort)).
g_all() { [ "$1" = 1000 ] && echo 800 || echo 240; }
g_cohort() { [ "$1" = 1000 ] && echo 80 || echo 24; }
# "eps sigma_stats_alone sigma_stats_split sigma_dpsgd"
specs=("8 0.64 1.0 1.5" "3 1.5 2.0 2.5" "1 4.05 5.0 5.0")
for nd in 1000 300; do
  for spec in "${specs[@]}"; do
    read -r eps s_all s_split s_sgd <<< "$spec"
    run "fed-synth-${nd}dev-linear-eps$eps" --set num-devices="$nd" --set clients-per-round="$nd" \
      --set min-arrivals="$(min_arrivals "$nd")" --set epsilon-budget="$eps" --set dp-mode=distributed \
      --set suffstats-noise-multiplier="$s_all" --set num-server-rounds=1 \
      --device-set epsilon-budget="$eps" --device-set guaranteed-arrivals="$(g_all "$nd")"
    run "fed-synth-${nd}dev-distributed-eps$eps" --set num-devices="$nd" --set clients-per-round="$(cohort "$nd")" \
      --set min-arrivals="$(min_arrivals "$nd")" --set epsilon-budget="$eps" --set dp-mode=distributed \
      --set suffstats-noise-multiplier="$s_split" --set noise-multiplier="$s_sgd" --set num-server-rounds=6 \
      --device-set epsilon-budget="$eps" --device-set guaranteed-arrivals="$(g_cohort "$nd")"
    run "fed-synth-${nd}dev-local-eps$eps" --set num-devices="$nd" --set clients-per-round="$(cohort "$nd")" \
      --set min-arrivals="$(min_arrivals "$nd")" --set epsilon-budget="$eps" --set dp-mode=local \
      --set suffstats-noise-multiplier="$s_split" --set noise-multiplier="$s_sgd" --set num-server-rounds=4 --set lr=0.05 \
      --device-set epsilon-budget="$eps" --device-set guaranteed-arrivals="$(g_cohort "$nd")"
  done
done
# Real dev data: 8 households built from its 35 train voices, evaluated on 15 held-out voices.
real="--set data-source=real-dev --set enroll-model=resemblyzer --set runtime-model=campp --set num-devices=8
      --set clients-per-round=8 --set min-arrivals=4 --set min-arrival-fraction=0.5 --set secagg-num-shares=5
      --set secagg-reconstruction-threshold=3 --set batch-size=16 --device-set guaranteed-arrivals=4"
run fed-real-dev-nodp $real --set dp-mode=none --set num-server-rounds=1 --device-set allow-non-dp=true
for spec in "${specs[@]}"; do
  read -r eps s_all s_split s_sgd <<< "$spec"
  run "fed-real-dev-linear-eps$eps" $real --set epsilon-budget="$eps" --set dp-mode=distributed \
    --set suffstats-noise-multiplier="$s_all" --set num-server-rounds=1 --device-set epsilon-budget="$eps"
  run "fed-real-dev-distributed-eps$eps" $real --set epsilon-budget="$eps" --set dp-mode=distributed \
    --set suffstats-noise-multiplier="$s_split" --set noise-multiplier="$s_sgd" --set num-server-rounds=6 --device-set epsilon-budget="$eps"
  run "fed-real-dev-local-eps$eps" $real --set epsilon-budget="$eps" --set dp-mode=local \
    --set suffstats-noise-multiplier="$s_split" --set noise-multiplier="$s_sgd" --set num-server-rounds=4 --set lr=0.05 --device-set epsilon-budget="$eps"
done
"$VENV/bin/python" -m simulations.results_table "$CSV"
