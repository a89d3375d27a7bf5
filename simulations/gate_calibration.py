"""Is the gate's speaker bootstrap honest? Its spread against the spread over fresh speaker draws.

The promotion gate ships a more complex candidate only where it wins ``gate-confidence`` of
paired speaker resamples of ONE validation set. This study checks that choice off the reported
population (another population seed, speakers from their own streams, never the study's test or
validation speakers): pairs of aligners are fitted once, then scored on ``--sets`` independent
validation sets of ``--speakers`` speakers each and on one large "truth" set. Per pair it writes
the paired EER difference on every set, the bootstrap's standard deviation and win share, and
prints how often each confidence level ships the challenger and how often that was harm (the
challenger worse on the truth set).

    python -m simulations.gate_calibration results/gate_calibration.csv [--sets 40] [--speakers 100]

Candidates (non-DP proxies with the study's EER range, fitted on the population's pooled pairs):
``keep`` (not updating), ``ridge-small`` (ridge on a few pairs: a noisy linear start), ``ridge``
(ridge on all), ``nessa-eN`` (NESSA, N epochs from the ridge start: from worse than the ridge
to better, so that some decisions are close).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np

from fed_nessa.data.population import Scenario
from fed_nessa.data.synthetic import SyntheticWorld, generate_eval, generate_population
from fed_nessa.evaluation.protocol import held_out_trials
from fed_nessa.evaluation.speaker_bootstrap import SortedTrials, bootstrap_eers, win_rate
from fed_nessa.model.aligners import AlignerInfo, NessaAligner, NessaConfig, RidgeAligner
from fed_nessa.model.training import TrainConfig

POPULATION_SEED = 11  # not the reported population (seed 0)
FIRST_STREAM = 10  # validation sets draw from streams 10, 11, ...; the reported ones are 1 and 2
TRUTH_STREAM = 99
#: (challenger, incumbent): the decisions the gate's climb makes.
EPOCHS = (1, 2, 3, 4, 6)
PAIRS = (("ridge-small", "keep"), ("ridge", "keep"), *((f"nessa-e{n}", "ridge") for n in EPOCHS))
LEVELS = (0.5, 0.8, 0.9, 0.95)
FIELDS = ("challenger", "incumbent", "set", "speakers", "eer_challenger", "eer_incumbent", "delta", "boot_sd",
          "win_rate", "truth_delta")


def _candidates(devices: int) -> tuple[dict[str, Any], Scenario, SyntheticWorld]:
    pop = generate_population(devices, seed=POPULATION_SEED)
    x = np.concatenate([d.enroll for d in pop.devices])
    y = np.concatenate([d.runtime for d in pop.devices])
    info = AlignerInfo(d_x=x.shape[1], d_y=y.shape[1], enroll_model=pop.enroll_model, runtime_model=pop.runtime_model)
    small = RidgeAligner(info, alpha=1e-2).fit(x[:6000], y[:6000])
    out: dict[str, Any] = {"ridge-small": small, "ridge": RidgeAligner(info, alpha=1e-3).fit(x, y)}
    for epochs in EPOCHS:
        out[f"nessa-e{epochs}"] = NessaAligner(info, NessaConfig(hidden=64, depth=1)).fit(
            x, y, train_cfg=TrainConfig(epochs=epochs, batch_size=256, lr=1e-3, seed=0))
    return out, Scenario(pop.enroll_model, pop.runtime_model), SyntheticWorld.build(pop.config.world)


def _trials(held_out: Any, scenario: Scenario, aligners: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    t = held_out_trials(held_out, scenario, aligners)
    scores = {name: t.scores[f"asym_{name}"] for name in aligners}
    scores["keep"] = t.scores["sym_before"]
    return scores, t.test_speaker


def run(out: Path, sets: int, speakers: int, truth_speakers: int, devices: int, resamples: int) -> None:
    aligners, scenario, world = _candidates(devices)
    truth_scores, truth_spk = _trials(generate_eval(world, POPULATION_SEED, truth_speakers, 30, stream=TRUTH_STREAM),
                                      scenario, aligners)
    truth = {name: SortedTrials.of(s, truth_spk).eer(np.ones(s.shape[1])) for name, s in truth_scores.items()}
    print(f"truth EER ({truth_speakers} speakers): {({k: round(100 * v, 2) for k, v in truth.items()})}")
    rows = []
    for i in range(sets):
        scores, spk = _trials(generate_eval(world, POPULATION_SEED, speakers, 30, stream=FIRST_STREAM + i),
                              scenario, aligners)
        boot = bootstrap_eers(scores, spk, resamples, seed=0)
        point = {name: SortedTrials.of(s, spk).eer(np.ones(s.shape[1])) for name, s in scores.items()}
        for ch, inc in PAIRS:
            rows.append({"challenger": ch, "incumbent": inc, "set": i, "speakers": speakers,
                         "eer_challenger": point[ch], "eer_incumbent": point[inc], "delta": point[ch] - point[inc],
                         "boot_sd": float(np.std(boot[ch] - boot[inc])), "win_rate": win_rate(boot[ch], boot[inc]),
                         "truth_delta": truth[ch] - truth[inc]})
        print(f"set {i + 1}/{sets} done", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    """Per pair: the true difference, the spread over sets against the bootstrap's, and per level how
    often the challenger ships and how often that shipped harm."""
    head = ("| challenger vs incumbent | truth Δ EER pts | mean Δ on a set | sd of Δ over sets | mean bootstrap sd | "
            + " | ".join(f"ships at {int(100 * c)} %" for c in LEVELS) + " |")
    lines = [head, "|" + "---|" * (5 + len(LEVELS))]
    for ch, inc in PAIRS:
        r = [x for x in rows if x["challenger"] == ch and x["incumbent"] == inc]
        d = np.array([float(x["delta"]) for x in r])
        sd = np.array([float(x["boot_sd"]) for x in r])
        truth = float(r[0]["truth_delta"])
        ships = []
        for c in LEVELS:
            n = sum(1 for x in r if float(x["delta"]) < 0 and float(x["win_rate"]) >= c)
            ships.append(f"{n}/{len(r)}" + (" (harm)" if truth > 0 and n else ""))
        lines.append(f"| {ch} vs {inc} | {100 * truth:+.2f} | {100 * d.mean():+.2f} | {100 * d.std(ddof=1):.2f} | "
                     f"{100 * sd.mean():.2f} | " + " | ".join(ships) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--sets", type=int, default=40)
    ap.add_argument("--speakers", type=int, default=100)
    ap.add_argument("--truth-speakers", type=int, default=1000)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--resamples", type=int, default=300)
    ap.add_argument("--table", action="store_true", help="print the table of an existing CSV and stop")
    a = ap.parse_args()
    if a.table:
        with a.out.open() as f:
            print(table(list(csv.DictReader(f))))
        return
    run(a.out, a.sets, a.speakers, a.truth_speakers, a.devices, a.resamples)


if __name__ == "__main__":
    main()
