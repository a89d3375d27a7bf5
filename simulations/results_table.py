"""One markdown table from many run folders (the README's and BENCHMARKS.md's federated tables).

``python -m simulations.results_table results/fed-synth-* [--sort devices,mode,eps]``

Every figure is read from each folder's ``summary.json``; nothing is recomputed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HEADER = ("| data | devices | mode | noise | ε budget | σ stats / σ DP-SGD | rounds | EER after start % "
          "| final EER % | gap closure | share of centralised NESSA's | centralised NESSA EER % (gap) "
          "| centralised ridge EER % (gap) "
          "| ε max / median | declined | s: stats round / later rounds |")
ALIGN = "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"


def _mode(cfg: dict[str, Any]) -> str:
    if cfg.get("linear-start") == "suffstats" and int(cfg["num-server-rounds"]) == int(cfg.get("suffstats-rounds", 1)):
        return "linear start only"
    if cfg.get("linear-start") == "suffstats":
        return "linear start + DP-SGD"
    return "DP-SGD"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _final_eer(final: dict[str, Any]) -> str:
    """What the run ships; where its gate shipped nothing, that is not updating (and the cell says so)."""
    if (final.get("gate") or {}).get("shipped") == "none":
        return f"{_pct(final.get('eer'))} (nothing shipped: not updating)"
    return _pct(final.get("eer"))


def _row(summary: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    cfg, final, rounds = summary["config"], summary["final"], summary["rounds"]
    cen, ridge, priv = final.get("centralised_nessa") or {}, final.get("ridge") or {}, summary["privacy"]
    share = final.get("share_of_centralised_gap_closure")
    later = [r["seconds"] for r in rounds[1:]]
    noise, mode = cfg["dp-mode"], _mode(cfg)
    sgd_sigma = "–" if mode == "linear start only" else f"{cfg['noise-multiplier']:g}"
    sigmas = "–" if noise == "none" else f"{cfg['suffstats-noise-multiplier']:g} / {sgd_sigma}"
    eps = "∞" if noise == "none" else f"{cfg['epsilon-budget']:g}"
    data = "synthetic" if cfg["data-source"] == "synthetic" else cfg["data-source"]
    cells = [data, cfg["num-devices"], mode, noise, eps, sigmas, len(rounds), _pct(rounds[0].get("eer")),
             _final_eer(final), f"{final['gap_closure']:.2f}",
             "n/a" if share is None else f"{100 * share:.0f} %",
             f"{_pct(cen.get('eer'))} ({cen.get('gap_closure', float('nan')):.2f})",
             f"{_pct(ridge.get('eer'))} ({ridge.get('gap_closure', float('nan')):.2f})",
             f"{priv.get('epsilon_max', 0):.2f} / {priv.get('epsilon_median', 0):.2f}",
             sum(int(r.get("declined", 0)) for r in rounds),
             f"{rounds[0]['seconds']:.0f} / " + (f"{sum(later) / len(later):.1f}" if later else "–")]
    key = (data, -int(cfg["num-devices"]), mode, noise, -float(cfg.get("epsilon-budget", 0)))
    return key, "| " + " | ".join(str(c) for c in cells) + " |"


def table(folders: Sequence[Path]) -> str:
    rows = []
    for folder in folders:
        path = Path(folder) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no summary.json (not a run folder, or the run has not finished a round)")
        summary = json.loads(path.read_text())
        if not summary.get("final"):
            raise ValueError(f"{path}: the run has no final evaluation yet")
        rows.append(_row(summary))
    return "\n".join([HEADER, ALIGN, *(line for _, line in sorted(rows))])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.results_table", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        print(table(args.folders))
    except (OSError, ValueError, KeyError) as exc:
        print(f"results_table: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
