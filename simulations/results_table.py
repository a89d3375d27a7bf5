"""One markdown table from many run folders (the README's and BENCHMARKS.md's federated tables).

``python -m simulations.results_table results/fed-synth-* [--sort devices,mode,eps]``

Every figure is read from each folder's ``summary.json``; nothing is recomputed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.results_csv import Value, metrics, pct, read

HEADER = ("| data | devices | mode | noise | ε budget | σ stats / σ DP-SGD | rounds | EER after start % "
          "| final EER % | gap closure | share of centralised NESSA's | centralised NESSA EER % (gap) "
          "| centralised ridge EER % (gap) "
          "| ε max / median | declined | s: stats round / later rounds |")
ALIGN = "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"


def _mode(cfg: dict[str, Value]) -> str:
    if cfg["linear-start"] == "suffstats" and cfg["num-server-rounds"] == (cfg["suffstats-rounds"] or 1):
        return "linear start only"
    if cfg.get("linear-start") == "suffstats":
        return "linear start + DP-SGD"
    return "DP-SGD"


def _final_eer(r: dict[str, Value]) -> str:
    """What the run ships; where its gate shipped nothing, that is not updating (and the cell says so)."""
    if r["gate_shipped"] == "none":
        return f"{pct(r['final_eer'])} (nothing shipped: not updating)"
    return pct(r["final_eer"])


def _row(r: dict[str, Value]) -> tuple[tuple[Any, ...], str]:
    cfg = r  # the config keys are columns of their own
    cen, ridge = metrics(r, "centralised_nessa") or {}, metrics(r, "ridge") or {}
    share = r["share_of_centralised_gap_closure"]
    later = r["later_rounds_seconds_mean"]
    noise, mode = cfg["dp-mode"], _mode(cfg)
    sgd_sigma = "–" if mode == "linear start only" else f"{cfg['noise-multiplier']:g}"
    sigmas = "–" if noise == "none" else f"{cfg['suffstats-noise-multiplier']:g} / {sgd_sigma}"
    eps = "∞" if noise == "none" else f"{cfg['epsilon-budget']:g}"
    data = "synthetic" if cfg["data-source"] == "synthetic" else cfg["data-source"]
    cells = [data, cfg["num-devices"], mode, noise, eps, sigmas, r["rounds"], pct(r["first_round_eer"]),
             _final_eer(r), f"{r['final_gap_closure']:.2f}",
             "n/a" if share is None else f"{100 * float(share):.0f} %",
             f"{pct(cen.get('eer'))} ({_or_nan(cen.get('gap_closure')):.2f})",
             f"{pct(ridge.get('eer'))} ({_or_nan(ridge.get('gap_closure')):.2f})",
             f"{_or_zero(r['epsilon_max']):.2f} / {_or_zero(r['epsilon_median']):.2f}",
             r["declined"],
             f"{r['first_round_seconds']:.0f} / " + (f"{later:.1f}" if later is not None else "–")]
    key = (data, -int(cfg["num-devices"] or 0), mode, noise, -_or_zero(cfg["epsilon-budget"]))
    return key, "| " + " | ".join(str(c) for c in cells) + " |"


def _or_nan(x: Value) -> float:
    return float("nan") if x is None else float(x)


def _or_zero(x: Value) -> float:
    return 0.0 if x is None else float(x)


def table(runs: Sequence[dict[str, Value]], where: str = "the CSV") -> str:
    """The table of the federated study's rows; a run without a final evaluation is an error."""
    lines = []
    for r in runs:
        if r["final_eer"] is None or r["final_gap_closure"] is None:
            raise ValueError(f"{where}: run {r['run']} has no final evaluation yet")
        lines.append(_row(r))
    return "\n".join([HEADER, ALIGN, *(line for _, line in sorted(lines))])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.results_table", description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="the study's CSV (simulations.results_csv)")
    args = parser.parse_args(argv)
    try:
        print(table(read(args.csv), str(args.csv)))
    except (OSError, ValueError) as exc:
        print(f"results_table: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
