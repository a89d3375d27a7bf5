"""The device-level update rules' table (docs/results.md "Device-level DP", "FedSGD vs DP-FedAvg").

Reads the study's CSV (``results/device_fedavg.csv``: runs ``fedavg-<n>dev-<arm>-eps<e>`` of
``simulations/device_fedavg_study.sh``, fleet runs with ``privacy-unit = device``) and gives one row
per run: the update rule, the server optimiser, the clip the first and the last DP-SGD round
stated, the trained aligner's EER and gap closure on the reported speakers, what the gate shipped
and the noise multiplier.

    python -m simulations.device_fedavg_table results/device_fedavg.csv
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any

from simulations.results_csv import Value, arm, eer_gap, number, read

NAME = re.compile(r"fedavg-(\d+)dev-([a-z-]+)-eps([\d.]+)$")
#: The study's arms in the order the table shows them (simulations/device_fedavg_study.sh).
ARMS = ("fedsgd", "fedavg", "fedavg-adaptive", "fedavg-adaptive-adambc")
HEADER = ("| devices | device ε (δ) | arm | device update | server optimiser (lr) | clip, first → last round "
          "| DP NESSA EER % (gap) | not updating, validation EER % | shipped | DP-SGD rounds | σ | s per round |")
ALIGN = "|---:|---|---|---|---|---|---|---:|---|---:|---:|---:|"


def rows(runs: Sequence[dict[str, Value]]) -> list[dict[str, Any]]:
    """One row per run the name pattern matches, by fleet size, epsilon (descending) and arm order."""
    out = []
    for r in runs:
        m = NAME.search(str(r["run"]))
        if not m or m.group(2) not in ARMS:
            continue
        adaptive = (number(r["clip-target-quantile"]) or 0.0) > 0
        out.append({"devices": int(m.group(1)), "epsilon": float(m.group(3)), "arm": m.group(2),
                    "delta": r["delta"], "update": r["device-update"] or "fedsgd",
                    "optimizer": f"{r['server-optimizer']} ({number(r['server-lr']):g})",
                    "clip": _clip(number(r["device-clip-norm"]), number(r["last_round_clip"]) if adaptive else None),
                    "nessa": arm(r, "dp_nessa"), "not_updating": number(r["gate_not_updating_eer"]),
                    "shipped": r["gate_shipped"], "rounds": r["dpsgd_rounds"], "sigma": number(r["dpsgd_sigma"]),
                    "seconds": number(r["seconds_per_dpsgd_round_median"])})
    return sorted(out, key=lambda x: (x["devices"], -x["epsilon"], ARMS.index(x["arm"])))


def _clip(start: float | None, last: float | None) -> str:
    """The clip cell: the adaptive clip's first and last round's C, or the fixed clip."""
    if start is None:
        return "n/a"
    return f"{start:g} (fixed)" if last is None else f"{start:g} → {last:.3g}"


def markdown(table: list[dict[str, Any]]) -> str:
    def fmt(x: float | None, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    lines = [HEADER, ALIGN]
    for r in table:
        lines.append(f"| {r['devices']} | {r['epsilon']:g} ({r['delta']:g}) | {r['arm']} | {r['update']} "
                     f"| {r['optimizer']} | {r['clip']} | {eer_gap(r['nessa'])} "
                     f"| {fmt(None if r['not_updating'] is None else 100 * r['not_updating'], '.2f')} "
                     f"| {r['shipped']} | {r['rounds']} | {fmt(r['sigma'], '.3g')} | {fmt(r['seconds'], '.2f')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.device_fedavg_table",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="the study's CSV (simulations.results_csv)")
    args = parser.parse_args(argv)
    try:
        table = rows(read(args.csv))
    except (OSError, ValueError) as exc:
        print(f"device_fedavg_table: error: {exc}", file=sys.stderr)
        return 2
    if not table:
        print(f"device_fedavg_table: error: {args.csv}: no run named fedavg-<n>dev-<arm>-eps<e> with an arm of "
              f"{', '.join(ARMS)}", file=sys.stderr)
        return 2
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
