"""The self-set fleet study's table and plot (``results/fleet_selfset.csv``: one row per run, several noise draws
per cell).

Every run was given only its fleet size and epsilon (``simulations/fleet_selfset_study.sh``); the rest came from
``fed_nessa.sim.fleet_settings`` and ``aligner = auto``, and the promotion gate chose what ships among not
updating, the run's DP linear start and its DP NESSA on the server's validation speakers. Per cell: mean +- sd
over the draws of what shipped, the gate's choices, the shipped share of non-DP NESSA's gap closure against the
target, and whether every draw's shipped aligner is at least as good as not updating (gap closure >= 0) and as
its own DP linear start on the reported (held-out) speakers. The runs skip the pooled non-DP references
(``references = false``); non-DP NESSA's gap closure comes from the fleet study's runs of the same size on the
same population seed (``--reference results/fleet.csv``; a study run on another seed is an error, and where a run
recorded the held-out speakers' ``sym_before`` EER it must agree).

    python -m simulations.fleet_selfset_table results/fleet_selfset.csv --reference results/fleet.csv \
        [--plot docs/fleet-selfset.png]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.results_csv import Value, metrics, number, read

NAME = re.compile(r"selfset-(\d+)dev-eps([\d.]+)(?:-(skellam(?:-sym)?))?(?:-(val\d+))?(?:-(meanfree))?-draw(\d+)$")
#: A run name without a mechanism tag ran the Gaussian shares (the study's rows before skellam was the default);
#: ``skellam`` rows were calibrated under Zhu & Wang's general subsampling bound (sessions 8-13), ``skellam-sym``
#: rows under the symmetric expansion (session 14 on; docs/privacy.md "Poisson subsampling of a symmetric mechanism").
#: A ``-val<V>`` suffix: the server held V validation speakers for the gate (no suffix: the default, 100); such
#: rows are a cell of their own (the gate, not the training, differs). A ``-meanfree`` suffix: the devices took their
#: loss about the released mean enrollment embedding (``loss-centre = enrollment-mean``), a cell of its own.
UNTAGGED = "gaussian"
#: The issue's targets: the shipped share of non-DP NESSA's gap closure, by (devices, epsilon).
TARGETS = {(10_000, 8.0): 0.95, (10_000, 3.0): 0.90, (10_000, 1.0): 0.70, (30_000, 1.0): 0.85}
HEADER = ("| devices | ε | mechanism (q) | draws | auto rule (signal) | gate shipped | DP linear start EER % "
          "| DP NESSA EER % | shipped EER % | shipped gap closure | non-DP NESSA gap | shipped / non-DP gap (target) "
          "| ≥ not updating, ≥ own start |")
ALIGN = "|---:|---:|---|---:|---|---|---|---|---|---|---:|---|---|"


Cell = tuple[int, float, str]


def draws(runs: Sequence[dict[str, Value]]) -> dict[Cell, list[dict[str, Value]]]:
    """The study's rows by (devices, epsilon, mechanism), from the run names
    (``selfset-<n>dev-eps<e>[-skellam|-skellam-sym][-val<V>][-meanfree]-draw<k>``)."""
    out: dict[Cell, list[dict[str, Value]]] = {}
    for r in runs:
        m = NAME.search(str(r["run"]))
        if m:
            mech = (m.group(3) or UNTAGGED) + "".join(f" {g}" for g in (m.group(4), m.group(5)) if g)
            out.setdefault((int(m.group(1)), float(m.group(2)), mech), []).append(r)
    return out


def references(runs: Sequence[dict[str, Value]]) -> dict[int, tuple[float, float]]:
    """Non-DP NESSA's gap closure and the held-out speakers' sym_before EER, by fleet size (seed-0 runs)."""
    out: dict[int, tuple[float, float]] = {}
    for r in runs:
        gap, before = number(r["centralised_nessa_gap_closure"]), number(r["sym_before_eer"])
        devices = r["devices"]
        if gap is not None and before is not None and isinstance(devices, int) and not r["seed"]:
            out.setdefault(devices, (gap, before))
    return out


def _spread(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± sd`` (sd over the draws; a single draw shows its value alone)."""
    if not values:
        return "n/a"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _figures(rows: list[dict[str, Value]], name: str, metric: str) -> list[float]:
    return [v for v in (number(r[f"{name}_{metric}"]) for r in rows) if v is not None]


def _safe(r: dict[str, Value]) -> bool:
    """The shipped aligner is no worse than not updating nor than the run's own DP linear start (held-out)."""
    shipped, start = metrics(r, "final") or {}, metrics(r, "linear_start") or {}
    gap, eer, start_eer = shipped.get("gap_closure"), shipped.get("eer"), start.get("eer")
    return gap is not None and gap >= 0 and (start_eer is None or eer is None or eer <= start_eer)


def rows(by_cell: dict[Cell, list[dict[str, Value]]],
         refs: dict[int, tuple[float, float]]) -> list[dict[str, Any]]:
    """One summary per cell (devices descending in importance: the targets' size first)."""
    out = []
    for (n, eps, mech), runs in sorted(by_cell.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        ref_gap, ref_before = refs.get(n, (None, None))
        seeds = {r["seed"] or 0 for r in runs}
        if seeds != {0}:
            raise ValueError(f"{n} devices, epsilon {eps:g}: population seed(s) {sorted(seeds)}, but the "
                             "references are the seed-0 population's")
        befores = set(_figures(runs, "sym_before", "eer"))
        if ref_before is not None and befores and befores != {ref_before}:
            raise ValueError(f"{n} devices: the reference's held-out sym_before EER {ref_before} differs from the "
                             f"study's {sorted(befores)} (not the same population)")
        gaps = _figures(runs, "final", "gap_closure")
        shares = [g / ref_gap for g in gaps] if ref_gap else []
        signals = sorted({round(v) for v in (number(r["auto_signal"]) for r in runs) if v is not None})
        plans = Counter(str(r["plan_aligner"]) for r in runs)
        rates = sorted({v for v in (number(r["sample-rate"]) for r in runs) if v is not None})
        out.append({"devices": n, "epsilon": eps, "mechanism": mech, "rates": rates, "draws": len(runs),
                    "rule": ", ".join(f"{p}" for p in sorted(plans)) + f" ({', '.join(map(str, signals))})",
                    "gate": ", ".join(f"{k} x{v}" for k, v in sorted(Counter(str(r["gate_shipped"])
                                                                             for r in runs).items())),
                    "reasons": sorted({str(r["gate_reason"]) for r in runs}),
                    "linear": _figures(runs, "linear_start", "eer"), "nessa": _figures(runs, "dp_nessa", "eer"),
                    "shipped": _figures(runs, "final", "eer"), "gaps": gaps, "reference": ref_gap,
                    "shares": shares, "target": TARGETS.get((n, eps)), "safe": all(_safe(r) for r in runs)})
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [HEADER, ALIGN]
    for r in table:
        met = bool(r["shares"]) and r["target"] is not None and statistics.fmean(r["shares"]) >= r["target"]
        target = "" if r["target"] is None else f" (≥ {r['target']:.2f}: {'met' if met else 'missed'})"
        ref = "n/a" if r["reference"] is None else f"{r['reference']:.2f}"
        rates = ", ".join(f"{q:.3g}" for q in r["rates"]) or "n/a"
        lines.append(f"| {r['devices']} | {r['epsilon']:g} | {r['mechanism']} ({rates}) | {r['draws']} | {r['rule']} "
                     f"| {r['gate']} "
                     f"| {_spread(r['linear'], 100)} | {_spread(r['nessa'], 100)} | {_spread(r['shipped'], 100)} "
                     f"| {_spread(r['gaps'])} | {ref} | {_spread(r['shares'])}{target} "
                     f"| {'yes' if r['safe'] else 'NO'} |")
    return "\n".join(lines)


def reasons(table: list[dict[str, Any]]) -> str:
    """The gate's reasons, one line per cell (they name the validation EERs it compared)."""
    return "\n".join(f"- {r['devices']} devices, ε = {r['epsilon']:g}, {r['mechanism']}: " + "; ".join(r["reasons"])
                     for r in table)


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for eps, mech in sorted({(r["epsilon"], r["mechanism"]) for r in table}, key=lambda c: (-c[0], c[1])):
        pts = [r for r in table if (r["epsilon"], r["mechanism"]) == (eps, mech) and r["gaps"]]
        ax.errorbar([r["devices"] for r in pts], [statistics.fmean(r["gaps"]) for r in pts],
                    yerr=[statistics.stdev(r["gaps"]) if len(r["gaps"]) > 1 else 0.0 for r in pts],
                    marker="o" if mech == UNTAGGED else "s", linestyle="-" if mech == UNTAGGED else ":", capsize=3,
                    label=f"shipped, ε = {eps:g}, {mech}")
    refs = sorted({(r["devices"], r["reference"]) for r in table if r["reference"] is not None})
    ax.plot([p[0] for p in refs], [p[1] for p in refs], "k--", marker="x", label="non-DP NESSA")
    ax.set_xscale("log")
    ax.set_xlabel("devices (every device in every round)")
    ax.set_ylabel("gap closure (held-out speakers)")
    ax.set_title("self-set protocol: what the gate shipped (mean ± sd over draws)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.fleet_selfset_table",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="the study's CSV (simulations.results_csv)")
    parser.add_argument("--reference", type=Path, required=True,
                        help="a study CSV with the pooled non-DP references (results/fleet.csv)")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    try:
        table = rows(draws(read(args.csv)), references(read(args.reference)))
    except (OSError, ValueError) as exc:
        print(f"fleet_selfset_table: error: {exc}", file=sys.stderr)
        return 2
    if not table:
        print(f"fleet_selfset_table: error: {args.csv}: no self-set runs (selfset-<n>dev-eps<e>[-skellam]-draw<k>)",
              file=sys.stderr)
        return 2
    print(markdown(table))
    print()
    print(reasons(table))
    if args.plot:
        plot(table, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
