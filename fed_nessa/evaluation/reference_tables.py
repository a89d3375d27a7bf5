"""The centralised result tables: every method, both update scenarios, DP rows, the data-hunger curve.

Held-out figures are only ever computed on voices no aligner saw: the
synthetic default has a separate evaluation population; the real dev data is
cross-validated over *voices* (pseudo-speakers of a held-out voice are
excluded from training too).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fed_nessa.evaluation.centralised import (
    SCENARIOS,
    CentralisedConfig,
    fit_dp_nessa,
    mean_reports,
    plan_dp,
    scenario_report,
    sides,
)
from fed_nessa.evaluation.protocol import ScenarioReport, reports_to_markdown
from fed_nessa.model.training import TrainConfig

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Split:
    """One train/held-out split of an embedding set (a fold, or the synthetic population/eval pair)."""

    name: str
    train: Any
    test: Any


def voice_folds(es: Any, n_folds: int, seed: int = 0) -> list[Split]:
    """K folds over whole voices: every voice is held out exactly once."""
    voices = np.unique(es.voice)
    if n_folds < 2 or n_folds > voices.size:
        raise ValueError(f"folds must be in [2, {voices.size}] for {voices.size} voices, got {n_folds}")
    order = np.random.default_rng(seed).permutation(voices)
    out = []
    for i, held in enumerate(np.array_split(order, n_folds)):
        test = np.isin(es.voice, held)
        out.append(Split(f"fold{i}", es.subset(~test), es.subset(test)))
    return out


def dp_rows(train: Any, enroll_model: str, runtime_model: str, epsilons: Sequence[float], delta: float,
            cfg: CentralisedConfig, dp_train: TrainConfig, clip_norm: float) -> dict[str, Any]:
    """Per epsilon (example-level, composed with Opacus RDP): the private linear start with all of
    epsilon (``ridge-dp-all``), and the split plan's start (``ridge-dp``) + DP-SGD (``nessa-dp``)."""
    out: dict[str, Any] = {}
    n = len(train.speaker)
    for eps in epsilons:
        whole = plan_dp(eps, delta, n, dp_train, clip_norm, linear_share=1.0)
        out[f"ridge-dp-all-eps{eps:g}"] = fit_dp_nessa(train, enroll_model, runtime_model, whole, cfg,
                                                       cfg.nessa, dp_train, seed=cfg.seed)[0]
        plan = plan_dp(eps, delta, n, dp_train, clip_norm)
        ridge, nessa = fit_dp_nessa(train, enroll_model, runtime_model, plan, cfg,
                                    dataclasses.replace(cfg.nessa, hidden=dp_hidden(cfg)), dp_train, seed=cfg.seed)
        out[f"ridge-dp-eps{eps:g}"] = ridge
        out[f"nessa-dp-eps{eps:g}"] = nessa
    return out


def dp_hidden(cfg: CentralisedConfig) -> int:
    """Under DP the residual is kept narrow: noise grows with the trained parameter count."""
    return min(cfg.nessa.hidden, 64)


def scenario_tables(splits: Sequence[Split], old_model: str, new_model: str, cfg: CentralisedConfig,
                    scenarios: Sequence[str] = SCENARIOS, epsilons: Sequence[float] = (), delta: float = 1e-5,
                    dp_train: TrainConfig | None = None, clip_norm: float = 1.0,
                    progress: Progress = print) -> dict[str, Any]:
    """Fit and evaluate everything; per scenario: per-split reports and their fold mean."""
    result: dict[str, Any] = {"old_model": old_model, "new_model": new_model, "scenarios": {}}
    dp_train = dp_train or TrainConfig(epochs=10, batch_size=256, lr=1e-3, seed=cfg.seed)
    for scenario in scenarios:
        reports: list[ScenarioReport] = []
        for split in splits:
            t0 = time.perf_counter()
            e, r = sides(scenario, old_model, new_model)
            extra = dp_rows(split.train, e, r, epsilons, delta, cfg, dp_train, clip_norm) if epsilons else {}
            reports.append(scenario_report(split.train, split.test, old_model, new_model, scenario, cfg, extra))
            progress(f"{scenario} {split.name}: {time.perf_counter() - t0:.0f} s")
        result["scenarios"][scenario] = {"splits": [r.to_dict() for r in reports], "mean": mean_reports(reports),
                                         "markdown": [r.to_markdown() for r in reports]}
    return result


def mean_table_markdown(result: dict[str, Any], title: str) -> str:
    """One markdown table per scenario with fold means (and std when there are several folds)."""
    lines = [f"## {title}", ""]
    for scenario, block in result["scenarios"].items():
        mean = block["mean"]
        folds = max(v["eer"]["folds"] for v in mean.values())
        lines += [f"### {scenario} ({result['old_model']} -> {result['new_model']}), "
                  f"{'mean over ' + str(folds) + ' voice folds' if folds > 1 else 'held-out speakers'}", "",
                  "| row | EER % | minDCF | SID top-1 % | gap closure |", "|---|---:|---:|---:|---:|"]
        for name, m in mean.items():
            gap = m.get("gap_closure")
            gap_s = "n/a" if gap is None else f"{gap['mean']:.2f}" + (" (worse than not updating)"
                                                                      if gap["mean"] < 0 else "")
            lines.append(f"| {name} | {100 * m['eer']['mean']:.2f}{_std_suffix(m, 'eer', folds)} | "
                         f"{m['min_dcf']['mean']:.3f} | {100 * m['sid_top1']['mean']:.1f} | {gap_s} |")
        lines.append("")
    return "\n".join(lines)


def _std_suffix(metrics: dict[str, Any], key: str, folds: int) -> str:
    """`` ± std`` (in %) after a fold mean; nothing for a single split, whose std is meaningless."""
    return f" ± {100 * metrics[key]['std']:.2f}" if folds > 1 else ""


def split_markdown(result: dict[str, Any]) -> str:
    """The per-split tables, for the appendix of a report."""
    parts = []
    for block in result["scenarios"].values():
        parts.extend(block["markdown"])
    return "\n".join(parts)


# ------------------------------------------------------------------------------ data hunger
def data_hunger(splits: Sequence[Split], old_model: str, new_model: str, voice_counts: Sequence[int],
                cfg: CentralisedConfig, scenario: str = "runtime-upgrade", methods: Sequence[str] = ("ridge", "nessa"),
                pseudo: Callable[[Any], Any] | None = None, seed: int = 0,
                progress: Progress = print) -> list[dict[str, Any]]:
    """EER on held-out voices vs the number of training voices (optionally with pseudo-speakers).

    ``pseudo`` maps a train subset to the same voices plus their pseudo-speakers
    (the speed-perturbed set); both curves then share the same voices.
    """
    rows: list[dict[str, Any]] = []
    sub_cfg = dataclasses.replace(cfg, methods=tuple(methods))
    for split in splits:
        voices = np.unique(split.train.voice)
        for n in voice_counts:
            if n > voices.size:
                continue
            chosen = np.random.default_rng(seed + n).choice(voices, size=n, replace=False)
            base = split.train.subset(np.isin(split.train.voice, chosen))
            variants = [("voices", base)] + ([("voices+pseudo", pseudo(base))] if pseudo else [])
            for label, train in variants:
                rep = scenario_report(train, split.test, old_model, new_model, scenario, sub_cfg)
                for m in methods:
                    row = rep.row(f"asym_{m}")
                    rows.append({"split": split.name, "voices": int(n), "data": label, "method": m,
                                 "speakers": int(np.unique(train.speaker).size), "pairs": int(len(train.speaker)),
                                 "eer": row.metrics.eer, "gap_closure": row.gap_closure})
            progress(f"data hunger {split.name}: {n} voices")
    return rows


def hunger_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean EER per (voices, data, method) over splits."""
    keys = sorted({(r["voices"], r["data"], r["method"]) for r in rows})
    out = []
    for v, d, m in keys:
        sel = [r for r in rows if (r["voices"], r["data"], r["method"]) == (v, d, m)]
        out.append({"voices": v, "data": d, "method": m, "eer_mean": float(np.mean([r["eer"] for r in sel])),
                    "eer_std": float(np.std([r["eer"] for r in sel])), "splits": len(sel),
                    "speakers": int(np.mean([r["speakers"] for r in sel])),
                    "pairs": int(np.mean([r["pairs"] for r in sel]))})
    return out


def hunger_markdown(summary: list[dict[str, Any]], title: str) -> str:
    lines = [f"## {title}", "", "| training voices | data | speakers | pairs | method | held-out EER % |",
             "|---:|---|---:|---:|---|---:|"]
    for s in summary:
        lines.append(f"| {s['voices']} | {s['data']} | {s['speakers']} | {s['pairs']} | {s['method']} | "
                     f"{100 * s['eer_mean']:.2f} ± {100 * s['eer_std']:.2f} |")
    return "\n".join(lines) + "\n"


def hunger_plot(summary: list[dict[str, Any]], path: Any, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for data, method in sorted({(s["data"], s["method"]) for s in summary}):
        pts = [s for s in summary if s["data"] == data and s["method"] == method]
        ax.errorbar([p["voices"] for p in pts], [100 * p["eer_mean"] for p in pts],
                    yerr=[100 * p["eer_std"] for p in pts], marker="o", capsize=3, label=f"{method} ({data})")
    ax.set_xlabel("training voices")
    ax.set_ylabel("cross-model EER on held-out voices (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["Split", "voice_folds", "scenario_tables", "mean_table_markdown", "split_markdown", "data_hunger",
           "hunger_summary", "hunger_markdown", "hunger_plot", "reports_to_markdown"]
