"""The fleet study's table and plot from its run folders (``results/fleet-*``).

Per fleet size and epsilon: the DP linear start (all of epsilon on the statistics round), DP NESSA
(30 % on the statistics round, the rest on DP-SGD), and what ``aligner = auto`` ships: the linear
start where the auto rule says so, else the promotion gate's choice among not updating, that run's
linear start and its DP NESSA (scored on the server's own validation speakers, never on the reported
ones; run folders from before the gate weighed not updating never say ``none``).

    python -m simulations.fleet_table results/fleet-* [--plot docs/fleet-study.png]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NAME = re.compile(r"fleet-(\d+)dev-(linear|nessa)-eps([\d.]+)$")
HEADER = ("| devices | pairs | ε | DP linear start EER % (gap) | DP NESSA EER % (gap) | auto rule "
          "| shipped EER % (gap) | non-DP NESSA EER % (gap) | shipped / non-DP gap | rounds | s per DP-SGD round "
          "| peak RSS GiB |")
ALIGN = "|---:|---:|---:|---|---|---|---|---|---:|---:|---:|---:|"


def _load(paths: Sequence[Path]) -> dict[tuple[int, float], dict[str, dict[str, Any]]]:
    cells: dict[tuple[int, float], dict[str, dict[str, Any]]] = {}
    for p in paths:
        m = NAME.search(p.name)
        if not m or not (p / "summary.json").is_file():
            continue
        cells.setdefault((int(m.group(1)), float(m.group(3))), {})[m.group(2)] = json.loads(
            (p / "summary.json").read_text())
    return cells


def _cell(row: dict[str, Any] | None) -> str:
    if not row or row.get("eer") is None:
        return "n/a"
    return f"{100 * row['eer']:.2f} ({row['gap_closure']:.2f})"


def shipped(linear: dict[str, Any], nessa: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What aligner = auto ships for this cell (see the module doc)."""
    plan = nessa.get("noise_plan") or nessa["engine"]["noise_plan"]  # studies before the top-level key
    from fed_nessa.federated.noise_plan import AUTO_SIGNAL_THRESHOLD

    if plan["signal"] < AUTO_SIGNAL_THRESHOLD:
        return f"linear ({plan['signal']:.0f})", linear["final"]  # the shipped figures (gate included)
    gate = nessa["final"].get("gate", {})
    if gate.get("shipped") == "dp-nessa":
        return f"NESSA ({plan['signal']:.0f}), gate: NESSA", arm(nessa, "dp_nessa")
    if gate.get("shipped") == "none":  # final holds what the operator gets: not updating
        return f"NESSA ({plan['signal']:.0f}), gate: none", nessa["final"]
    return f"NESSA ({plan['signal']:.0f}), gate: start", nessa["final"]["linear_start"]


def arm(summary: dict[str, Any], key: str) -> dict[str, Any]:
    """One arm's own figures (``final.linear_start`` / ``final.dp_nessa``), whatever the gate shipped;
    ``final`` itself is the shipped aligner's (not updating's when the gate shipped nothing)."""
    return summary["final"].get(key) or summary["final"]


def rows(cells: dict[tuple[int, float], dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for (n, eps), runs in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if "linear" not in runs or "nessa" not in runs:
            continue
        lin, nes = runs["linear"], runs["nessa"]
        rule, ship = shipped(lin, nes)
        ref = nes["final"]["centralised_nessa"]
        share = (ship["gap_closure"] / ref["gap_closure"]) if ref.get("gap_closure") else None
        eng = nes["engine"]
        out.append({"devices": n, "pairs": eng["pairs"], "epsilon": eps, "linear": arm(lin, "linear_start"),
                    "nessa": arm(nes, "dp_nessa"), "rule": rule, "shipped": ship, "reference": ref, "share": share,
                    "rounds": sum(1 for r in nes["rounds"] if r["phase"] == "dpsgd"),
                    "seconds": eng.get("seconds_per_dpsgd_round_median"),
                    "rss_gib": eng["peak_rss_mib"] / 1024})
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [HEADER, ALIGN]
    for r in table:
        share = "n/a" if r["share"] is None else f"{r['share']:.2f}"
        secs = "n/a" if r["seconds"] is None else f"{r['seconds']:.2f}"
        lines.append(f"| {r['devices']} | {r['pairs']} | {r['epsilon']:g} | {_cell(r['linear'])} | {_cell(r['nessa'])} "
                     f"| {r['rule']} | {_cell(r['shipped'])} | {_cell(r['reference'])} | {share} | {r['rounds']} "
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
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    table = rows(_load(args.runs))
    if not table:
        print("no complete (linear, nessa) pair of fleet runs found", file=sys.stderr)
        return 2
    print(markdown(table))
    if args.plot:
        plot(table, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
