"""The device-level study's table and plot (docs/results.md "Device-level DP").

Reads the study's CSV (``results/device_level.csv``: runs ``device-<n>dev-<linear|nessa>-eps<e>``,
fleet runs with ``privacy-unit = device``) and, beside each cell, the example-level fleet study's
run of the same fleet and epsilon (``fleet-<n>dev-nessa-eps<e>`` in ``results/fleet.csv``, same
synthetic population and seed): its pooled non-DP NESSA reference (the device-level runs skip
refitting it, ``references = false``) and what it shipped at example level.

    python -m simulations.device_level_table results/device_level.csv [--example results/fleet.csv]
        [--plot docs/device-level-study.png]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fed_nessa.config import DeviceUpdate, LossCentre
from simulations.results_csv import Cells, Value, arm, eer_gap, metrics, number, read, study_cells

NAME = re.compile(r"device-(\d+)dev-(linear|nessa)-eps([\d.]+)$")
#: Issue 22's runs (simulations/device_fedavg_scale_study.sh): one run per cell and noise draw, the DP linear start
#: on part of epsilon and DP-FedAvg rounds on the rest, or (``startonly``) on all of it, the gate choosing what ships.
FEDAVG_NAME = re.compile(r"device-(\d+)dev-(start(?:fedavg|fedsgd)(?:-split[\d.]+)?(?:-meanfree)?|startonly)"
                         r"-eps([\d.]+)(?:-draw(?P<draw>\d+))?$")
FEDAVG_HEADER = ("| devices | device ε (δ) | budget split | server optimiser (lr) | DP linear start EER % (gap) "
                 "| DP-FedAvg rounds | "
                 "σ statistics / rounds | clip, last round | DP NESSA EER % (gap) | shipped | shipped share of "
                 "non-DP (reference) | s per round | noise draw |")
FEDAVG_ALIGN = "|---:|---|---:|---|---|---:|---|---:|---|---|---|---:|---:|"
HEADER = ("| devices | device ε (δ) | DP linear start EER % (gap) | share of non-DP | DP NESSA EER % (gap) "
          "| share of non-DP | example-level DP NESSA, same ε (500 rounds), EER % (gap) | non-DP NESSA EER % (gap) "
          "| DP-SGD rounds | σ | s per round |")
ALIGN = "|---:|---|---|---:|---|---:|---|---|---:|---:|---:|"


def cells(runs: Sequence[dict[str, Value]]) -> Cells:
    """The study's rows by (devices, epsilon) and arm, from the run names."""
    return study_cells(runs, NAME)


def rows(by_cell: Cells, example_runs: Sequence[dict[str, Value]]) -> list[dict[str, Any]]:
    examples = {str(r["run"]): r for r in example_runs}

    def example_level(n: int, eps: float) -> dict[str, Value] | None:
        """The example-level fleet study's NESSA run for this cell (its reference and what it shipped)."""
        return examples.get(f"fleet-{n}dev-nessa-eps{eps:g}")

    out = []
    for (n, eps), runs in sorted(by_cell.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if "linear" not in runs or "nessa" not in runs:
            continue
        lin, nes = runs["linear"], runs["nessa"]
        # Two arms, each its own run with the whole epsilon: the linear start alone (one statistics
        # round) and NESSA trained end to end by device-level DP-SGD. No cross-run choice is made
        # (that would pick on the reported speakers).
        example = example_level(n, eps) or example_level(n, 8.0)
        ref = (metrics(example, "centralised_nessa") if example else None) or metrics(nes, "centralised_nessa")
        nessa = arm(nes, "dp_nessa") or {}
        linear = arm(lin, "linear_start") or {}

        def share(row: dict[str, float | None], ref: dict[str, float | None] | None = ref) -> float | None:
            gap, ref_gap = row.get("gap_closure"), (ref or {}).get("gap_closure")
            return gap / ref_gap if gap is not None and ref_gap else None

        same_eps = example_level(n, eps)
        out.append({"devices": n, "epsilon": eps, "delta": nes["delta"], "linear": linear,
                     "linear_share": share(linear), "nessa": nessa, "nessa_share": share(nessa),
                     "example": arm(same_eps, "dp_nessa") if same_eps else None,
                     "reference": ref, "rounds": nes["dpsgd_rounds"],
                     "sigma": nes["dpsgd_sigma"], "stats_sigma": lin["suffstats_sigma"],
                     "seconds": nes["seconds_per_dpsgd_round_median"]})
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [HEADER, ALIGN]
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    for r in table:
        lines.append(f"| {r['devices']} | {r['epsilon']:g} ({r['delta']:g}) | {eer_gap(r['linear'])} "
                     f"| {fmt(r['linear_share'])} | {eer_gap(r['nessa'])} | {fmt(r['nessa_share'])} "
                     f"| {eer_gap(r['example'])} | {eer_gap(r['reference'])} | {r['rounds']} "
                     f"| {r['stats_sigma']:.3g} / {r['sigma']:.3g} | {fmt(r['seconds'])} |")
    return "\n".join(lines)


def reference_for(n: int, example_runs: Sequence[dict[str, Value]]) -> tuple[int, dict[str, float | None]] | None:
    """Non-DP NESSA from the example-level fleet study's largest fleet <= n (the same generator and held-out
    speakers; no pooled reference is fitted at 10^5 devices): (its fleet size, its metrics)."""
    best: tuple[int, dict[str, float | None]] | None = None
    for r in example_runs:
        devices, ref = r["devices"], metrics(r, "centralised_nessa")
        if isinstance(devices, int) and devices <= n and ref and (best is None or devices > best[0]):
            best = (devices, ref)
    return best


def fedavg_markdown(runs: Sequence[dict[str, Value]], example_runs: Sequence[dict[str, Value]]) -> str:
    """Issue 22's table: one line per ``device-<n>dev-<arm>-eps<e>[-draw<k>]`` run."""
    lines = [FEDAVG_HEADER, FEDAVG_ALIGN]
    for (n, eps), arms in sorted(study_cells(runs, FEDAVG_NAME).items()):
        for _, r in sorted(arms.items()):
            match = FEDAVG_NAME.search(str(r["run"]))
            draw = (match.group("draw") if match else None) or "1"
            lines.append(_fedavg_line(n, eps, r, reference_for(n, example_runs)) + f" {draw} |")
    return "\n".join(lines)


def _fedavg_line(n: int, eps: float, r: dict[str, Value],
                 ref: tuple[int, dict[str, float | None]] | None) -> str:
    """One run of the large-fleet study (an arm is its budget split)."""
    gap, ref_gap = (metrics(r, "final") or {}).get("gap_closure"), (ref[1].get("gap_closure") if ref else None)
    share = (f"{gap / ref_gap:.2f} ({ref_gap:.2f}, {ref[0]} devices)"
             if ref and ref_gap and gap is not None else "n/a")
    clip, seconds, rounds = r["last_round_clip"], r["seconds_per_dpsgd_round_median"], r["dpsgd_rounds"] or 0
    lr = number(r["server-lr"])
    step = f"{r['server-optimizer']} ({'n/a' if lr is None else f'{lr:g}'}){_update(r)}" if rounds else "n/a"
    return (f"| {n} | {eps:g} ({r['delta']:g}) | {r['budget-split']} | {step} "
            f"| {eer_gap(metrics(r, 'linear_start'))} "
            f"| {rounds} | {_g(r['suffstats_sigma'])} / {_g(r['dpsgd_sigma']) if rounds else 'n/a'} "
            f"| {_g(clip)} | {eer_gap(metrics(r, 'dp_nessa'))} "
            f"| {r['gate_shipped']} | {share} | {'n/a' if seconds is None else f'{seconds:.1f}'} |")


def _update(r: dict[str, Value]) -> str:
    """An arm's rounds where they are not DP-FedAvg with the plain loss (``DEVICE_UPDATE``, ``LOSS_CENTRE``)."""
    words = [] if r["device-update"] in (None, DeviceUpdate.FEDAVG) else [f"device-update {r['device-update']}"]
    if (r.get("loss-centre") or LossCentre.NONE) != LossCentre.NONE:
        words.append(f"loss-centre {r['loss-centre']}")
    return "".join(f"; {w}" for w in words)


def _g(x: Value) -> str:
    """A sigma or clip to 3 significant digits; ``n/a`` where the run has none."""
    v = number(x)
    return "n/a" if v is None else f"{v:.3g}"


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
    parser.add_argument("csv", type=Path, help="the study's CSV (simulations.results_csv)")
    parser.add_argument("--example", type=Path, default=Path("results/fleet.csv"),
                        help="the example-level fleet study's CSV (its references and same-epsilon runs)")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    try:
        runs, example_runs = read(args.csv), read(args.example)
        table = rows(cells(runs), example_runs)
    except (OSError, ValueError) as exc:
        print(f"device_level_table: error: {exc}", file=sys.stderr)
        return 2
    if not table:
        print(f"device_level_table: error: {args.csv}: no complete (linear, nessa) pair of device-level runs",
              file=sys.stderr)
        return 2
    print(markdown(table))
    if study_cells(runs, FEDAVG_NAME):
        print()
        print(fedavg_markdown(runs, example_runs))
    if args.plot:
        plot(table, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
