"""Issue 22's tuning table: device-level DP-FedAvg arms on a population that is never reported.

Reads ``results/device_fedavg_tuning.csv`` (runs ``tune-<n>dev-seed<s>-eps<e>-<optimizer>-<server lr>-<local
lr>-e<epochs>[-r<rounds>][-w<device weight>][-fedsgd]`` of ``simulations/device_fedavg_tuning.sh``, ``<e>`` a
number or ``none``) and its rounds CSV, and
gives one row per arm: the EER of the DP linear start (round 1), at the first evaluated DP-FedAvg round and after
the last, the best evaluated DP-FedAvg round, and the gate's validation EERs and choice. The point of the table is
whether any DP-FedAvg round beats its own start; the arms' held-out EERs are on population seed 1 (the reported runs
use seed 0).

    python -m simulations.fedavg_tuning_table results/device_fedavg_tuning.csv
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from fed_nessa.config import DeviceUpdate, DeviceWeight, LossCentre
from simulations.results_csv import ROUND_COLUMNS, Value, number, pct, read, rounds_path

NAME = re.compile(r"tune-(\d+)dev-seed(\d+)-eps([\d.]+|none)-([a-z-]+)-([\d.]+)-([\d.]+)-e(\d+)(?:-r\d+)?(?:-w[a-z]+)?"
                  r"(?:-fedsgd)?(?:-meanfree)?(?:-draw\d+)?$")
HEADER = ("| devices | seed | device ε | server optimiser (lr) | device update: local lr, epochs, device weight "
          "| σ statistics / rounds | DP linear start EER % | first evaluated DP-FedAvg round "
          "| best DP-FedAvg round | last round | validation EER %: not updating / start / DP NESSA | shipped |")
ALIGN = "|---:|---:|---:|---|---|---|---:|---|---|---:|---|---|"


def _curve(rounds: Sequence[dict[str, Value]], run: str) -> list[tuple[int, float]]:
    """The run's evaluated (round, EER) pairs in round order."""
    pts = [(int(r["round"]), number(r["eer"])) for r in rounds if r["run"] == run]  # type: ignore[arg-type]
    return sorted((k, v) for k, v in pts if v is not None)


def _epsilon(eps: str) -> str:
    """The arm's device ε, or "none (no DP)" for the noise-free arms (``EPS=none``)."""
    return "none (no DP)" if eps == "none" else f"{float(eps):g}"


def _update(run: dict[str, Value], llr: str, epochs: str) -> str:
    """The device update: DP-FedAvg's local steps and weighting, or FedSGD's all-pairs mean gradient; and the
    loss's centre where it is not the origin (runs before the key took the plain cosine loss)."""
    centre = run.get("loss-centre") or LossCentre.NONE
    about = "" if centre == LossCentre.NONE else f"; loss-centre {centre}"
    if run["device-update"] == DeviceUpdate.FEDSGD:
        return f"fedsgd: mean gradient over all its pairs{about}"
    weight = run["device-weight"] or DeviceWeight.EQUAL  # runs before the key weighed every device the same
    return f"fedavg: {llr}, {epochs}, {weight}{about}"


def line(run: dict[str, Value], rounds: Sequence[dict[str, Value]]) -> str | None:
    """One arm's row (None for a run name the tuning script does not write)."""
    m = NAME.search(str(run["run"]))
    if not m:
        return None
    n, seed, eps, opt, slr, llr, epochs = m.groups()
    curve = _curve(rounds, str(run["run"]))
    start = next((v for k, v in curve if k == 1), None)
    later = [(k, v) for k, v in curve if k > 1]
    best = min(later, key=lambda kv: kv[1]) if later else None
    last = f"{pct(later[-1][1])} (round {later[-1][0]})" if later else "n/a"
    ss, ds = number(run["suffstats_sigma"]), number(run["dpsgd_sigma"])
    sig = "n/a" if ss is None or ds is None or eps == "none" else f"{ss:.3g} / {ds:.3g}"  # no DP: no noise
    best_s, first_s = ("n/a" if kv is None else f"{100 * kv[1]:.2f} (round {kv[0]})"
                       for kv in (best, later[0] if later else None))
    val = " / ".join(pct(run[k]) for k in ("gate_not_updating_eer", "gate_linear_start_eer", "gate_dp_nessa_eer"))
    return (f"| {n} | {seed} | {_epsilon(eps)} | {opt} ({slr}) | {_update(run, llr, epochs)} | {sig} | {pct(start)} "
            f"| {first_s} | {best_s} | {last} | {val} | {run['gate_shipped']} |")


def markdown(runs: Sequence[dict[str, Value]], rounds: Sequence[dict[str, Value]]) -> str:
    lines = [text for text in (line(r, rounds) for r in sorted(runs, key=lambda r: str(r["run"]))) if text]
    if not lines:
        raise ValueError("no run named tune-<n>dev-seed<s>-eps<e>-<optimizer>-<server lr>-<local lr>-e<epochs>")
    return "\n".join([HEADER, ALIGN, *lines])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.fedavg_tuning_table",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="the tuning CSV (simulations.results_csv)")
    args = parser.parse_args(argv)
    try:
        text = markdown(read(args.csv), read(rounds_path(args.csv), ROUND_COLUMNS))
    except (OSError, ValueError) as exc:
        print(f"fedavg_tuning_table: error: {args.csv}: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
