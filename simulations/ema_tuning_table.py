"""The weight-average tuning runs' table (``simulations/server_ema_tuning.sh``; population seed 1, never reported).

Each run records, at every evaluated round, the held-out EER of the server's weight average (``eer``) and of the
optimiser's last iterate (``eer_last_iterate``) under the same noise: a paired comparison per run. The DP linear
start's EER (round 1) is the bar DP NESSA has to beat.

    python -m simulations.ema_tuning_table results/tuning.csv
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from simulations.results_csv import ROUND_COLUMNS, Value, number, pct, read, rounds_path

NAME = re.compile(r"^t\d+k-e[\d.]+-ema[\d.]+")
CHECKPOINTS = (250, 500, 750, 1000)
HEADER = ("| run | q | σ statistics / DP-SGD | server optimiser, lr (warmup steps, decay) | low-pass b / a "
          "| residual width | EMA decay "
          "| DP linear start | "
          + " | ".join(f"round {r}: average / last" for r in CHECKPOINTS)
          + " | last evaluated round: average / last | gate (validation speakers) |")


def markdown(runs: Sequence[dict[str, Value]], rounds: Sequence[dict[str, Value]]) -> str:
    lines = [HEADER, "|" + "---|" * (8 + len(CHECKPOINTS) + 2)]
    for r in sorted((r for r in runs if NAME.match(str(r["run"]))), key=lambda r: str(r["run"])):
        curve = {int(x["round"]): x for x in rounds if x["run"] == r["run"] and isinstance(x["round"], int)}
        cells = []
        for c in CHECKPOINTS:
            x = curve.get(c)
            cells.append("n/a" if x is None else _pair(x))
        last = max(curve, default=None)
        cells.append("n/a" if last is None else f"{last}: {_pair(curve[last])}")
        sigma = f"{number(r['suffstats_sigma']) or 0:.2f} / {number(r['dpsgd_sigma']) or 0:.2f}"
        gate = (f"start {pct(number(r['gate_linear_start_eer']))}, DP NESSA {pct(number(r['gate_dp_nessa_eer']))}, "
                f"not updating {pct(number(r['gate_not_updating_eer']))}")
        decay = r.get("server-lr-decay") or "none"
        step = f"{r['server-optimizer']}, {r['server-lr']} ({r.get('server-lr-warmup') or 0}, {decay})"
        b, a = r.get("server-lowpass-b"), r.get("server-lowpass-a")
        lowpass = f"{b} / {a or '-'}" if b else "none"
        lines.append(f"| {r['run']} | {number(r['sample-rate']):.3g} | {sigma} | {step} | {lowpass} | {r['hidden']} "
                     f"| {r['server-ema']} | {pct(number(r['linear_start_eer']))} | " + " | ".join(cells)
                     + f" | {gate} |")
    return "\n".join(lines)


def _pair(x: dict[str, Value]) -> str:
    """The weight average's and the last iterate's EER at one evaluated round."""
    return f"{pct(number(x['eer']))} / {pct(number(x['eer_last_iterate']))}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.ema_tuning_table", description=__doc__.splitlines()[0])
    p.add_argument("csv", type=Path, help="results/tuning.csv")
    args = p.parse_args(argv)
    try:
        print(markdown(read(args.csv), read(rounds_path(args.csv), ROUND_COLUMNS)))
    except (OSError, ValueError) as exc:
        print(f"ema_tuning_table: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
