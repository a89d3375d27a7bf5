"""Issue 19's side-by-side table: the integer (Skellam) mechanism against the continuous Gaussian shares.

``results/mechanism.csv`` holds the runs of ``simulations/mechanism_study.sh``: the main job (1k devices,
epsilon 8, one example-level statistics round) under each ``distributed-mechanism`` at the noise multiplier
that costs the same epsilon under its own accountant, several noise draws each on the same population, and
the 10k-device, epsilon-8 self-set fleet cell under Skellam (``selfset-10000dev-eps8-skellam-draw<k>``). The
10k cell's Gaussian rows are the self-set study's (``--fleet results/fleet_selfset.csv``, same population,
same derived schedule). Per (cell, mechanism): mean +- sd over the draws of the shipped EER on the held-out
speakers, what the gate shipped, the largest device epsilon, seconds per round and the SecAgg+ field width.

    python -m simulations.mechanism_table results/mechanism.csv --fleet results/fleet_selfset.csv
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from simulations.results_csv import Value, number, read

#: Run names: the main job's draws, and the 10k epsilon-8 fleet cell (the self-set study's Gaussian draws
#: carry no mechanism in their name: they ran before the integer mechanism was the default).
MAIN = re.compile(r"^mech-main-(gaussian|skellam)-draw\d+$")
FLEET = re.compile(r"^selfset-10000dev-eps8(?:-(skellam))?-draw\d+$")
HEADER = ("| cell | mechanism | draws | σ statistics / DP-SGD | gate shipped | shipped EER % (held-out speakers) "
          "| DP linear start EER % | ε max | s per statistics round | s per DP-SGD round (median) | field bits |")
ALIGN = "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|"


def cells(runs: Sequence[dict[str, Value]]) -> dict[tuple[str, str], list[dict[str, Value]]]:
    """The rows by (cell, mechanism); a row's mechanism is its recorded ``distributed-mechanism`` (the self-set
    Gaussian rows predate the column and name none: they ran under the then default, ``gaussian``)."""
    out: dict[tuple[str, str], list[dict[str, Value]]] = {}
    seen: set[str] = set()
    for r in runs:
        name = str(r["run"])
        cell = "main job (1k devices, ε 8)" if MAIN.match(name) else "10k devices, ε 8" if FLEET.match(name) else None
        if cell is None or name in seen:  # a run recorded in both CSVs (self-set skellam draws) is one draw
            continue
        seen.add(name)
        mech = str(r["distributed-mechanism"] or "gaussian")
        out.setdefault((cell, mech), []).append(r)
    return out


def _mean_sd(values: Sequence[float | None], scale: float = 1.0, digits: int = 2) -> str:
    xs = [scale * v for v in values if v is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def row(cell: str, mech: str, rows: Sequence[dict[str, Value]]) -> str:
    """One table line: the cell's draws under one mechanism."""
    shipped = Counter(str(r["gate_shipped"] or "n/a") for r in rows)
    bits = sorted({int(b) for r in rows if (b := number(r["field_bits_max"])) is not None})
    sigmas = f"{_mean_sd([number(r['suffstats_sigma']) for r in rows], digits=3)} / " \
             f"{_mean_sd([number(r['dpsgd_sigma']) for r in rows if r['dpsgd_rounds']], digits=3)}"
    return (f"| {cell} | {mech} | {len(rows)} | {sigmas} "
            f"| {', '.join(f'{k} x{v}' for k, v in sorted(shipped.items()))} "
            f"| {_mean_sd([number(r['final_eer']) for r in rows], 100)} "
            f"| {_mean_sd([number(r['linear_start_eer']) for r in rows], 100)} "
            f"| {_mean_sd([number(r['epsilon_max']) for r in rows], digits=3)} "
            f"| {_mean_sd([number(r['first_round_seconds']) for r in rows], digits=1)} "
            f"| {_mean_sd([number(r['seconds_per_dpsgd_round_median']) for r in rows], digits=2)} "
            f"| {', '.join(map(str, bits)) if bits else 'n/a'} |")


def table(runs: Sequence[dict[str, Value]]) -> str:
    """The markdown table, Gaussian before Skellam within each cell."""
    lines = [HEADER, ALIGN]
    for (cell, mech), rows in sorted(cells(runs).items(), key=lambda kv: (kv[0][0], kv[0][1])):
        lines.append(row(cell, mech, rows))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.mechanism_table", description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="results/mechanism.csv")
    parser.add_argument("--fleet", type=Path, default=None, help="results/fleet_selfset.csv (the 10k Gaussian draws)")
    args = parser.parse_args(argv)
    try:
        runs = read(args.csv) + (read(args.fleet) if args.fleet is not None else [])
    except (OSError, ValueError) as exc:
        print(f"mechanism_table: error: {exc}", file=sys.stderr)
        return 2
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
