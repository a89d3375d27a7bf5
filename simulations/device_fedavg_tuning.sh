#!/usr/bin/env bash
# Issue 22's tuning of device-level DP-FedAvg, on a population that is never reported (population seed 1, 10^4
# devices, delta 1e-5): each ARM is "server-optimizer server-lr local-lr local-epochs"; the rest is
# simulations/device_fedavg_scale_study.sh's protocol (the DP linear start on half of epsilon, then ROUNDS
# DP-FedAvg rounds with an adaptive median clip, aligner = auto so the gate weighs all three candidates).
# Rows in results/device_fedavg_tuning.csv (+ _rounds.csv: the EER curve); run folders in
# runs/tuning/<name> (not committed). Resumable (a recorded arm is skipped); PARALLEL arms at a time.
# EPS 60 at 10^4 devices gives about the noise per coordinate of the mean (sigma C / N) of epsilon 8 at 10^5
# devices (statistics 2.2e-5 C vs 1.3e-5 C; 10 rounds 5.8e-5 C vs 2.6e-5 C), the 10^5 study's signal-to-noise
# at a tenth of its cost. EPS 8 tunes the noise-dominated 10^4 cell itself.
# ENGINE (default blocks) picks the engine (fleet: the pairs held in memory, no regeneration per round, faster at
# 10^4 devices) and EVAL_EVERY (default 2) the evaluation cadence; a run of more than 20 rounds is named "-r<ROUNDS>".
# DEVICE_WEIGHT (default equal) is device-weight; "pairs" weighs each clipped delta by its capped pairs ("-wpairs").
# DEVICE_UPDATE (default fedavg) is device-update; "fedsgd" sends each device's mean gradient over all its pairs
# (device-batch 0) clipped to the fixed device-clip-norm (adaptive clipping is DP-FedAvg's only), named "-fedsgd";
# an arm's local lr and epochs are then unused.
# EPS "none" runs the arm without DP (dp-mode none, the non-DP ridge start, the devices' policy allowing it, named
# "-epsnone"): the same rounds and clipping noise-free, to tell what the noise does from what the update rule does.
# LOSS_CENTRE (default none) is loss-centre; "enrollment-mean" takes the devices' cosine loss about the mean
# enrollment embedding of the released statistics (named "-meanfree").
#   bash simulations/device_fedavg_tuning.sh [ROUNDS] [PARALLEL] [EPS] [ARM ...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FED_NESSA_VENV:-.venv}"
RUNS=runs/tuning CSV=results/device_fedavg_tuning.csv
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
rounds=${1:-20}
parallel=${2:-2}
eps=${3:-60}
engine=${ENGINE:-blocks}
eval_every=${EVAL_EVERY:-2}
long=""
[ "$rounds" -le 20 ] || long="-r$rounds"
weight=${DEVICE_WEIGHT:-equal}
[ "$weight" = equal ] || long="$long-w$weight"
update=${DEVICE_UPDATE:-fedavg}
update_sets=(--set device-update=fedavg --set clip-target-quantile=0.5)
if [ "$update" = fedsgd ]; then
  long="$long-fedsgd"
  update_sets=(--set device-update=fedsgd --set device-batch=0)
fi
centre=${LOSS_CENTRE:-none}
[ "$centre" = none ] || long="$long-meanfree"
shift 3 || true
arms=("$@")
[ ${#arms[@]} -gt 0 ] || arms=("sgd 0.5 0.05 1" "adam 0.003 0.05 1" "sgd 0.1 0.05 1" "adam 0.01 0.05 1"
                               "adam 0.03 0.05 1" "adam-bc 0.01 0.05 1")
recorded() { [ -f "$CSV" ] && grep -q "^$1," "$CSV"; }
run_arm() {
  local opt=$1 slr=$2 llr=$3 ep=$4 name="tune-10000dev-seed1-eps$eps-$1-$2-$3-e$4$long"
  if recorded "$name"; then echo "$(date +%T) $name: in $CSV, skipped"; return; fi
  rm -rf "$RUNS/$name" "$RUNS/$name.keys"
  local privacy=(--set epsilon-budget="$eps" --set budget-split=0.5)
  [ "$eps" != none ] || privacy=(--set dp-mode=none --set budget-split=0 --device-set allow-non-dp=true)
  echo "$(date +%T) $name"
  "$VENV/bin/fed-nessa" simulate --engine "$engine" --quiet --set seed=1 --set num-devices=10000 \
    --set privacy-unit=device "${privacy[@]}" --set aligner=auto --set linear-start=suffstats \
    "${update_sets[@]}" --set device-weight="$weight" --set loss-centre="$centre" \
    --set server-optimizer="$opt" --set server-lr="$slr" --set local-lr="$llr" --set local-epochs="$ep" \
    --set num-server-rounds=$((rounds + 1)) --set references=false --set eval-every="$eval_every" \
    --set ledger-layout=sqlite --run-dir "$RUNS/$name" > "$RUNS/$name.log" 2>&1
  flock "$RUNS/.csv.lock" "$VENV/bin/python" -m simulations.results_csv "$CSV" "$RUNS/$name"
  echo "$(date +%T) $name done"
}
mkdir -p "$RUNS" results
for arm in "${arms[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n; done
  # shellcheck disable=SC2086
  run_arm $arm &
done
wait
