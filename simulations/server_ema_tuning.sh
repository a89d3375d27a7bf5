#!/usr/bin/env bash
# Tuning the server's weight average (`server-ema`) off the reported population (docs/results.md "How the
# self-set protocol was chosen"): population seed 1 (its own validation and held-out speakers), the fleet
# rule's schedule, `aligner = nessa` (DP-SGD rounds always run), one run per decay. Every evaluated round
# records the average's EER and the last iterate's (`eer_last_iterate`) under the SAME noise, so each run
# is a paired comparison. Rows in results/tuning.csv (+ _rounds.csv); run folders in runs/tuning (not
# committed). Resumable: a run whose row is in the CSV is skipped. Runs in parallel, PARALLEL at a time.
#   bash simulations/server_ema_tuning.sh [SIZE] [EPSILON] [DECAYS] [PARALLEL] [SERVER_LR] [SERVER_OPTIMIZER] [HIDDEN] [WARMUP] [LR_DECAY] [DRAW] [LOWPASS]
# defaults: 10000 3 "0.99 0.997" 2 (the rule's lr and optimiser, Adam; the default residual width; no lr warmup;
# the rule's lr decay; DRAW k > 1 names another noise draw of the same arm, "-draw<k>"; LOWPASS "B/A" sets
# server-lowpass-b = B and server-lowpass-a = A, e.g. "0.1/-0.9", named "-lpB_A", commas as colons;
# env BUDGET_SPLIT sets the statistics round's share of epsilon instead of the rule's, named "-split<S>";
# env LOSS_CENTRE=enrollment-mean takes the devices' loss about the released mean enrollment embedding, "-meanfree")
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FED_NESSA_VENV:-.venv}"
RUNS=runs/tuning CSV=results/tuning.csv
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
n=${1:-10000}
eps=${2:-3}
decays=${3:-"0.99 0.997"}
parallel=${4:-2}
lr=${5:-}
opt=${6:-}
hidden=${7:-}
warmup=${8:-}
lrdecay=${9:-}
draw=${10:-}
lowpass=${11:-}
split=${BUDGET_SPLIT:-}
centre=${LOSS_CENTRE:-}
[ "$centre" != none ] || centre=""
lp_b=${lowpass%%/*} lp_a=${lowpass#*/}
mkdir -p "$RUNS"
# the rule's DP-SGD rate for this fleet and epsilon (it depends on the mechanism), named in the run
q=$("$VENV/bin/python" -c "from fed_nessa.sim.fleet_settings import derive; \
print(derive({'num-devices': $n, 'epsilon-budget': $eps${split:+, 'budget-split': $split}}, {}).run['sample-rate'])")
one() {
  local d=$1 name="t${n::-3}k-e$eps-ema$d${lr:+-lr$lr}${opt:+-$opt}${hidden:+-h$hidden}${warmup:+-w$warmup}${lrdecay:+-$lrdecay}${lowpass:+-lp${lp_b//,/:}_${lp_a//,/:}}${split:+-split$split}${centre:+-meanfree}-q$q${draw:+-draw$draw}"
  if [ -f "$CSV" ] && grep -q "^$name," "$CSV"; then echo "$(date +%T) $name: in $CSV, skipped"; return; fi
  echo "$(date +%T) $name"
  rm -rf "${RUNS:?}/$name" "$RUNS/$name.keys"
  "$VENV/bin/fed-nessa" simulate --engine fleet --quiet --set seed=1 --set num-devices="$n" \
    --set epsilon-budget="$eps" --set aligner=nessa --set server-ema="$d" ${lr:+--set server-lr="$lr"} ${opt:+--set server-optimizer="$opt"} \
    ${hidden:+--set hidden="$hidden"} ${warmup:+--set server-lr-warmup="$warmup"} ${lrdecay:+--set server-lr-decay="$lrdecay"} \
    ${lowpass:+--set server-lowpass-b="$lp_b" --set server-lowpass-a="$lp_a"} ${split:+--set budget-split="$split"} \
    ${centre:+--set loss-centre="$centre"} --set ledger-layout=sqlite --set references=false --set eval-every=50 --run-dir "$RUNS/$name"
  flock "$RUNS/.csv.lock" "$VENV/bin/python" -m simulations.results_csv "$CSV" "$RUNS/$name"
}
running=0
for d in $decays; do
  one "$d" &
  running=$((running + 1))
  if [ "$running" -ge "$parallel" ]; then wait -n; running=$((running - 1)); fi
done
wait
