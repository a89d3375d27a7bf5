#!/usr/bin/env bash
# The Kokoro-voices study (docs/results.md "Real-model population (Kokoro voices)"), everything from the
# corpus folder data/kokoro-voices/ in one command:
#   1. the federated population (fed_nessa/data/population.py corpus_federation: one device per training
#      voice, VALIDATION training voices withheld for the server's gate, the corpus's held-out voices
#      evaluated) through both engines at epsilon 8 for two model pairs (old -> new: vfl_dvec ->
#      resemblyzer and resemblyzer -> CAM++, the runtime upgrade: enrollment = old, runtime = new), each
#      run a `fed-nessa simulate` into runs/studies/kokoro<V>v-* (V = the corpus's voice count; not
#      committed), its row added to results/kokoro_federated.csv (simulations/results_csv.py);
#   2. the centralised evaluate tables of data/kokoro-voices/README.md (results/kokoro-*/);
#   3. the table (python -m simulations.kokoro_table results/kokoro_federated.csv).
#   bash simulations/kokoro_study.sh [VALIDATION] [ROUNDS]      defaults: 30 100
# Resumable: a finished step leaves a marker under runs/studies/kokoro<V>v-done/ and is skipped when the
# script is run again on the same corpus; a corpus with another voice count redoes every step.
# Runs (all epsilon 8 per device, delta 1e-5, every device in every round; the non-DP references, pooled
# NESSA and ridge fitted in each run on the devices' pairs, are in every row):
#   fleet engine:  example level, DP linear start alone | 30 % of epsilon on the start + ROUNDS DP-SGD rounds
#                  (q = 1, Adam lr 1e-3); device level, DP linear start alone (a device's statistics weigh
#                  its 16 pairs) | NESSA end to end by ROUNDS device-level DP-SGD rounds (8 pairs a round,
#                  clip 0.1, Adam lr 0.01); non-DP linear start (dp-mode none)
#   Flower engine: the three one-round runs (example- and device-level DP linear start, non-DP linear start)
# Every DP run is then audited (fed-nessa audit; a failed audit stops the study).
# Time on 2 shared cores, 140 devices: ~15 min in all; it grows about linearly with the devices.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FED_NESSA_VENV:-.venv}"
PY="$VENV/bin/python"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" FLWR_HOME="${FLWR_HOME:-$PWD/.flwr-home}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
validation=${1:-30}
rounds=${2:-100}
CSV=results/kokoro_federated.csv
# The corpus's sizes: voices, training voices, devices (training voices less the validation voices) and
# utterances per voice (a device-level statistics weight: one device holds one voice's utterances).
read -r voices train_voices devices utts < <("$PY" -c "
from fed_nessa.data.population import corpus_device_count, corpus_population
p = corpus_population($validation, 0)
val = p.validation.num_voices if p.validation is not None else 0
print(p.devices.num_voices + val + p.held_out.num_voices, p.devices.num_voices + val,
      corpus_device_count($validation, 0), int(max(p.devices.utterance) + 1))")
RUNS=runs/studies DONE="runs/studies/kokoro${voices}v-done"
mkdir -p "$DONE"
echo "kokoro-voices: $voices voices ($train_voices training, $devices devices, $validation validation), $utts utterances each"
done_already() { [ -f "$DONE/$1" ] && echo "$(date +%T) $1: done, skipped"; }

# 1. The federated runs.
g=$(( (8 * devices + 9) / 10 )); g=$(( g > 50 ? g : 50 ))  # the promised arrivals of a full round (Flower devices' policy)
simulate() {
  local name=$1; shift
  done_already "$name" && return 0
  echo "$(date +%T) $name"
  rm -rf "${RUNS:?}/$name" "$RUNS/$name.keys" "$RUNS/$name.audit.txt"
  nice -n 5 "$VENV/bin/fed-nessa" simulate --quiet --set data-source=kokoro-voices --set num-devices="$devices" \
    --set validation-speakers="$validation" --set epsilon-budget=8 --set expected-pairs-per-device="$utts" \
    --set eval-every=25 "$@" --run-dir "$RUNS/$name"
  "$PY" -m simulations.results_csv "$CSV" "$RUNS/$name"
  # Every DP run's ledgers re-checked by the auditor (signatures, chains, epsilon by two accountants).
  case "$name" in *-eps*)
    nice -n 5 "$VENV/bin/fed-nessa" audit "$RUNS/$name" > "$RUNS/$name.audit.txt" || { cat "$RUNS/$name.audit.txt"; exit 1; }
    head -n 1 "$RUNS/$name.audit.txt" ;;
  esac
  touch "$DONE/$name"
}
example="--set privacy-unit=example --set sample-rate=1.0"
device="--set privacy-unit=device --set device-stats-pairs=$utts"
flower="--device-set guaranteed-arrivals=$g --device-set epsilon-budget=8"
for pair in "vfl_dvec resemblyzer" "resemblyzer campp"; do
  read -r old new <<< "$pair"
  models="--set enroll-model=$old --set runtime-model=$new"
  tag="kokoro${voices}v-$old-$new"
  simulate "$tag-fleet-example-linear-eps8" --engine fleet $models $example --set aligner=linear --set num-server-rounds=1
  simulate "$tag-fleet-example-nessa-eps8" --engine fleet $models $example --set aligner=nessa --set budget-split=0.3 \
    --set num-server-rounds=$((rounds + 1))
  simulate "$tag-fleet-device-linear-eps8" --engine fleet $models $device --set aligner=linear --set num-server-rounds=1
  simulate "$tag-fleet-device-nessa-eps8" --engine fleet $models $device --set aligner=nessa --set linear-start=none \
    --set device-batch=8 --set server-lr=0.01 --set num-server-rounds="$rounds"
  simulate "$tag-fleet-example-linear-nodp" --engine fleet $models $example --set aligner=linear --set dp-mode=none --set budget-split=0 \
    --set num-server-rounds=1 --device-set allow-non-dp=true
  simulate "$tag-flower-example-linear-eps8" $models $example --set aligner=linear --set budget-split=1 \
    --set num-server-rounds=1 $flower
  simulate "$tag-flower-device-linear-eps8" $models $device --set aligner=linear --set budget-split=1 \
    --set num-server-rounds=1 $flower --device-set privacy-unit=device
  simulate "$tag-flower-example-linear-nodp" $models $example --set aligner=linear --set dp-mode=none --set budget-split=0 \
    --set num-server-rounds=1 $flower --device-set allow-non-dp=true
done

# 2. The centralised tables (held-out voices; the data-hunger curve at doubling voice counts up to all).
hunger=$("$PY" -c "n = $train_voices; c = [10 * 2 ** k for k in range(12) if 10 * 2 ** k < n]; print(','.join(map(str, c + [n])))")
evaluate() {
  local out=$1; shift
  done_already "$(basename "$out")" && return 0
  echo "$(date +%T) $out"
  "$VENV/bin/fed-nessa" evaluate --data kokoro-voices "$@" --out "$out"
  touch "$DONE/$(basename "$out")"
}
evaluate results/kokoro-campp-resemblyzer --old-model resemblyzer --new-model campp --hunger "$hunger"
evaluate results/kokoro-campp-vfl --old-model vfl_dvec --new-model campp
evaluate results/kokoro-resemblyzer-vfl --old-model vfl_dvec --new-model resemblyzer

# 3. The table (docs/results.md), from the CSV.
"$PY" -m simulations.kokoro_table "$CSV" --docs docs/results.md --docs data/kokoro-voices/README.md
