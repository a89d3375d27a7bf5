"""The fleet study's table and plot from its CSV (``results/fleet.csv``, one row per run).

Per fleet size and epsilon: the DP linear start (all of epsilon on the statistics round), DP NESSA
(30 % on the statistics round, the rest on DP-SGD), and what ``aligner = auto`` ships: the linear
start where the auto rule says so, else the promotion gate's choice among not updating, that run's
linear start and its DP NESSA (scored on the server's own validation speakers, never on the reported
ones; runs from before the gate weighed not updating never say ``none``).

    python -m simulations.fleet_table results/fleet.csv [--plot docs/fleet-study.png]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.results_csv import Cells, Value, arm, eer_gap, metrics, number, read, study_cells

NAME = re.compile(r"fleet-(\d+)dev-(linear|nessa)-eps([\d.]+)$")
HEADER = ("| devices | pairs | ε | DP linear start EER % (gap) | DP NESSA EER % (gap) | auto rule "
          "| shipped EER % (gap) | non-DP NESSA EER % (gap) | shipped / non-DP gap | rounds | s per DP-SGD round "
          "| peak RSS GiB |")
ALIGN = "|---:|---:|---:|---|---|---|---|---|---:|---:|---:|---:|"


def cells(runs: Sequence[dict[str, Value]]) -> Cells:
    """The study's rows by (devices, epsilon) and arm, from the run names (``fleet-<n>dev-<arm>-eps<e>``)."""
    return study_cells(runs, NAME)


#: The auto rule's threshold this study's "shipped" column applies: the one set on it (in-sample).
#: The product's threshold has since been re-set off the reported population
#: (``fed_nessa.federated.mechanism.AUTO_SIGNAL_THRESHOLD``; the self-set study, fleet_selfset_table).
STUDY_THRESHOLD = 25_000.0


def shipped(linear: dict[str, Value], nessa: dict[str, Value]) -> tuple[str, dict[str, float | None] | None]:
    """What aligner = auto ships for this cell (see the module doc)."""
    signal = number(nessa["auto_signal"]) or 0.0
    if signal < STUDY_THRESHOLD:
        return f"linear ({signal:.0f})", metrics(linear, "final")
    if nessa["gate_shipped"] == "dp-nessa":
        return f"NESSA ({signal:.0f}), gate: NESSA", arm(nessa, "dp_nessa")
    if nessa["gate_shipped"] == "none":  # final holds what the operator gets: not updating
        return f"NESSA ({signal:.0f}), gate: none", metrics(nessa, "final")
    return f"NESSA ({signal:.0f}), gate: start", metrics(nessa, "linear_start")


def rows(by_cell: Cells) -> list[dict[str, Any]]:
    out = []
    for (n, eps), runs in sorted(by_cell.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if "linear" not in runs or "nessa" not in runs:
            continue
        lin, nes = runs["linear"], runs["nessa"]
        rule, ship = shipped(lin, nes)
        ref = metrics(nes, "centralised_nessa") or {}
        shipped_gap, ref_gap = (ship or {}).get("gap_closure"), ref.get("gap_closure")
        share = shipped_gap / ref_gap if shipped_gap is not None and ref_gap else None
        out.append({"devices": n, "pairs": nes["pairs"], "epsilon": eps, "linear": arm(lin, "linear_start"),
                    "nessa": arm(nes, "dp_nessa"), "rule": rule, "shipped": ship, "reference": ref, "share": share,
                    "rounds": nes["dpsgd_rounds"], "seconds": nes["seconds_per_dpsgd_round_median"],
                    "rss_gib": (number(nes["peak_rss_mib"]) or 0.0) / 1024})
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [HEADER, ALIGN]
    for r in table:
        share = "n/a" if r["share"] is None else f"{r['share']:.2f}"
        secs = "n/a" if r["seconds"] is None else f"{r['seconds']:.2f}"
        lines.append(f"| {r['devices']} | {r['pairs']} | {r['epsilon']:g} | {eer_gap(r['linear'])} "
                     f"| {eer_gap(r['nessa'])} "
                     f"| {r['rule']} | {eer_gap(r['shipped'])} | {eer_gap(r['reference'])} | {share} | {r['rounds']} "
                     f"| {secs} | {r['rss_gib']:.1f} |")
    return "\n".join(lines)


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, title in ((axes[0], "linear", "DP linear start"), (axes[1], "nessa", "DP NESSA")):
        for eps in sorted({r["epsilon"] for r in table}, reverse=True):
            pts = [(r["devices"], r[key]["gap_closure"]) for r in table if r["epsilon"] == eps]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"ε = {eps:g}")
        refs = sorted({(r["devices"], r["reference"]["gap_closure"]) for r in table})
        ax.plot([p[0] for p in refs], [p[1] for p in refs], "k--", label="non-DP NESSA")
        ax.set_xscale("log")
        ax.set_xlabel("devices (every device in every round)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gap closure (held-out speakers)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.fleet_table", description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="the study's CSV (simulations.results_csv)")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    try:
        table = rows(cells(read(args.csv)))
    except (OSError, ValueError) as exc:
        print(f"fleet_table: error: {exc}", file=sys.stderr)
        return 2
    if not table:
        print(f"fleet_table: error: {args.csv}: no complete (linear, nessa) pair of fleet runs", file=sys.stderr)
        return 2
    print(markdown(table))
    if args.plot:
        plot(table, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
