#!/usr/bin/env bash
# The self-set fleet study (docs/results.md "Fleet runs that set themselves"): fleet size x epsilon x noise
# draws, every run a `fed-nessa simulate --engine fleet` given only the fleet size and epsilon (q, rounds,
# budget split, server lr and the rest derived by fed_nessa/sim/fleet_settings.py; aligner = auto; the
# promotion gate choosing what ships), into runs/studies/selfset-* (not committed); its row added to
# results/fleet_selfset.csv. Each draw is a separate run with fresh OS noise on the same population.
# Resumable: a run whose row is already in the CSV is skipped. Then the table and the plot from the CSV.
#   bash simulations/fleet_selfset_study.sh [SIZES] [EPSILONS] [DRAWS]
#   VALIDATION_SPEAKERS=V bash simulations/fleet_selfset_study.sh ...   the server holds V validation speakers
#   for the gate (unset: the config's default, 400 since session 15). Run names gain -val<V> unless V is 100, the
#   default of every earlier row (which carry no suffix).
# Run names: selfset-<n>dev-eps<e>-skellam-sym-draw<k> (the default mechanism under the symmetric subsampling
# expansion, session 14 on; "-skellam" rows were calibrated under Zhu & Wang's bound; the Gaussian rows have no tag).
# defaults: "10000 1000 3000" "3 8 1" 3 (the targets' fleet size first; one draw of every epsilon before
# the next draw). The runs skip the pooled non-DP references: the table takes them from results/fleet.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
# `simulate` refuses a run folder that already holds a run: an unfinished run's folder is replaced.
fresh() { rm -rf "$1" "$1.keys"; echo "$1"; }
VENV="${FED_NESSA_VENV:-.venv}"
RUNS=runs/studies CSV=results/fleet_selfset.csv
# two instances may share the CSV (one per core): each write holds the lock (kept under runs/, not committed)
record() { mkdir -p "$RUNS"; flock "$RUNS/.csv.lock" "$VENV/bin/python" -m simulations.results_csv "$CSV" "$RUNS/$1"; }
recorded() { [ -f "$CSV" ] && grep -q "^$1," "$CSV"; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
sizes=${1:-"10000 1000 3000"}
epsilons=${2:-"3 8 1"}
draws=${3:-3}
# The runs use the default distributed mechanism, the integer one (skellam), named in each run: the study's
# first rows (sessions 4-5, before it became the default) ran the Gaussian and carry no mechanism in their name.
tag=-skellam-sym
validation_speakers=${VALIDATION_SPEAKERS:-$("$VENV/bin/python" -c \
  'from fed_nessa.config import FederationConfig; print(FederationConfig().validation_speakers)')}
[ "$validation_speakers" = 100 ] || tag="$tag-val$validation_speakers"
validation=(--set validation-speakers="$validation_speakers")
# LOSS_CENTRE=enrollment-mean: the devices' loss about the released mean enrollment embedding, named "-meanfree"
centre=${LOSS_CENTRE:-none}
[ "$centre" = none ] || tag="$tag-meanfree"
for n in $sizes; do
  for d in $(seq 1 "$draws"); do
    for eps in $epsilons; do
      name="selfset-${n}dev-eps${eps}${tag}-draw$d"
      if recorded "$name"; then echo "$(date +%T) $name: in $CSV, skipped"; continue; fi
      echo "$(date +%T) $name"
      "$VENV/bin/fed-nessa" simulate --engine fleet --quiet --set num-devices="$n" --set epsilon-budget="$eps" \
        --set ledger-layout=sqlite --set references=false --set eval-every=50 "${validation[@]}" --set loss-centre="$centre" --run-dir "$(fresh "$RUNS/$name")"
      record "$name"
    done
  done
done
"$VENV/bin/python" -m simulations.fleet_selfset_table "$CSV" --reference results/fleet.csv --plot docs/fleet-selfset.png
