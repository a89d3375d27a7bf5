"""The device-level study's table and plot (docs/results.md "Device-level DP").

Reads ``results/device-<n>dev-<linear|nessa>-eps<e>`` (fleet runs with ``privacy-unit = device``)
and, beside each cell, the example-level fleet study's run of the same fleet and epsilon
(``results/fleet-<n>dev-nessa-eps<e>``, same synthetic population and seed): its pooled non-DP
NESSA reference (the device-level runs skip refitting it, ``references = false``) and what it
shipped at example level.

    python -m simulations.device_level_table results/device-* [--plot docs/device-level-study.png]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.fleet_table import arm

NAME = re.compile(r"device-(\d+)dev-(linear|nessa)-eps([\d.]+)$")
HEADER = ("| devices | device ε (δ) | DP linear start EER % (gap) | share of non-DP | DP NESSA EER % (gap) "
          "| share of non-DP | example-level DP NESSA, same ε (500 rounds), EER % (gap) | non-DP NESSA EER % (gap) "
          "| DP-SGD rounds | σ | s per round |")
ALIGN = "|---:|---|---|---:|---|---:|---|---|---:|---:|---:|"


def _summary(path: Path) -> dict[str, Any] | None:
    file = path / "summary.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _load(paths: Sequence[Path]) -> dict[tuple[int, float], dict[str, dict[str, Any]]]:
    cells: dict[tuple[int, float], dict[str, dict[str, Any]]] = {}
    for p in paths:
        m = NAME.search(p.name)
        data = _summary(p) if m else None
        if m and data is not None:
            cells.setdefault((int(m.group(1)), float(m.group(3))), {})[m.group(2)] = data
    return cells


def _cell(row: dict[str, Any] | None) -> str:
    if not row or row.get("eer") is None:
        return "n/a"
    return f"{100 * row['eer']:.2f} ({row['gap_closure']:.2f})"


def _example_level(root: Path, n: int, eps: float) -> dict[str, Any] | None:
    """The example-level fleet study's NESSA run for this cell (its reference and what it shipped)."""
    return _summary(root / f"fleet-{n}dev-nessa-eps{eps:g}")


def rows(cells: dict[tuple[int, float], dict[str, dict[str, Any]]], root: Path) -> list[dict[str, Any]]:
    out = []
    for (n, eps), runs in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if "linear" not in runs or "nessa" not in runs:
            continue
        lin, nes = runs["linear"], runs["nessa"]
        # Two arms, each its own run with the whole epsilon: the linear start alone (one statistics
        # round) and NESSA trained end to end by device-level DP-SGD. No cross-run choice is made
        # (that would pick on the reported speakers).
        example = _example_level(root, n, eps) or _example_level(root, n, 8.0)
        ref = (example or {}).get("final", {}).get("centralised_nessa") or nes["final"].get("centralised_nessa")
        nessa = arm(nes, "dp_nessa")
        linear = arm(lin, "linear_start")

        def share(row: dict[str, Any], ref: dict[str, Any] | None = ref) -> float | None:
            return row["gap_closure"] / ref["gap_closure"] if ref and ref.get("gap_closure") else None

        plan = nes["noise_plan"]
        out.append({"devices": n, "epsilon": eps, "delta": nes["privacy"]["delta"], "linear": linear,
                     "linear_share": share(linear), "nessa": nessa, "nessa_share": share(nessa),
                     "example": arm(example, "dp_nessa") if example and _example_level(root, n, eps) else None,
                     "reference": ref, "rounds": sum(1 for r in nes["rounds"] if r["phase"] == "dpsgd"),
                     "sigma": plan["dpsgd_sigma"], "stats_sigma": lin["noise_plan"]["suffstats_sigma"],
                     "seconds": nes["engine"].get("seconds_per_dpsgd_round_median")})
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [HEADER, ALIGN]
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    for r in table:
        lines.append(f"| {r['devices']} | {r['epsilon']:g} ({r['delta']:g}) | {_cell(r['linear'])} "
                     f"| {fmt(r['linear_share'])} | {_cell(r['nessa'])} | {fmt(r['nessa_share'])} "
                     f"| {_cell(r['example'])} | {_cell(r['reference'])} | {r['rounds']} "
                     f"| {r['stats_sigma']:.3g} / {r['sigma']:.3g} | {fmt(r['seconds'])} |")
    return "\n".join(lines)


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for n in sorted({r["devices"] for r in table}):
        for key, mark, what in (("nessa", "o", "DP NESSA"), ("linear", "^", "DP linear start")):
            pts = sorted((r["epsilon"], r[key]["gap_closure"]) for r in table if r["devices"] == n)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=mark, label=f"device-level {what}, {n} devices")
        ex = sorted((r["epsilon"], r["example"]["gap_closure"]) for r in table
                    if r["devices"] == n and r["example"])
        if ex:
            ax.plot([p[0] for p in ex], [p[1] for p in ex], marker="s", ls=":",
                    label=f"example-level, {n} devices")
    refs = [r["reference"]["gap_closure"] for r in table if r["reference"]]
    if refs:
        ax.axhline(max(refs), color="k", ls="--", label="non-DP NESSA")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    eps = sorted({r["epsilon"] for r in table})
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.minorticks_off()
    ax.set_xlabel("ε (per device, or per example)")
    ax.set_ylabel("gap closure (held-out speakers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.device_level_table",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    table = rows(_load(args.runs), args.runs[0].parent)
    if not table:
        print("no complete (linear, nessa) pair of device-level runs found", file=sys.stderr)
        return 2
    print(markdown(table))
    if args.plot:
        plot(table, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
