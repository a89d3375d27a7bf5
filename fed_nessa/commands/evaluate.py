"""``fed-nessa evaluate``: the full design.md table (both update scenarios, every method) on held-out voices."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from fed_nessa.arguments import path_arg, seed_arg
from fed_nessa.data.registry import NAMES_HELP
from fed_nessa.evaluation.centralised import METHODS, SCENARIOS, CentralisedConfig


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluation tables on held-out voices (design.md section 2)",
                       description="Fit every method on train-side voices and evaluate EER, minDCF and SID top-1 "
                                   "for sym_before/sym_after/asym_* in both update scenarios on held-out voices "
                                   "(voice folds for real data, the separate evaluation population for synthetic, "
                                   "the parent-disjoint held-out voices for kokoro-voices). "
                                   "Writes evaluation.json and evaluation.md.")
    p.add_argument("--data", default="synthetic", help=NAMES_HELP)
    p.add_argument("--old-model", required=True, help="the model before the update (worse)")
    p.add_argument("--new-model", required=True, help="the model after the update (better)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--folds", type=int, default=5, help="voice folds (real data)")
    p.add_argument("--max-folds", type=int, default=None, help="run only the first N folds (time)")
    p.add_argument("--dp-epsilons", type=_floats, default=[], help="also DP ridge/NESSA rows, e.g. 1,3,8")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--hunger", type=_ints, default=[], help="data-hunger curve at these voice counts")
    p.add_argument("--pseudo", default=None, help="pseudo-speaker set added in the hunger curve "
                                                  "(e.g. real-speed-dev)")
    p.add_argument("--devices", type=int, default=1000, help="synthetic population size")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--out", required=True, type=path_arg)
    p.set_defaults(func=run)


def _splits(args: argparse.Namespace) -> tuple[str, list[Any]]:
    from fed_nessa.data.registry import resolve
    from fed_nessa.evaluation.reference_tables import Split, voice_folds

    source = resolve(args.data, num_devices=args.devices, seed=args.seed)
    if source.held_out is not None:
        return source.name, [Split("held-out", source.train_set(), source.held_out)]
    folds = voice_folds(source.train_set(), args.folds, seed=args.seed)
    return source.name, folds[: args.max_folds] if args.max_folds else folds


def _check_models(args: argparse.Namespace, splits: list[Any]) -> None:
    """``--old-model`` / ``--new-model`` must name models of the data (before anything is written)."""
    from fed_nessa.cli import CliError

    sides = [set(s.train.embeddings) & set(s.test.embeddings) for s in splits]
    have = sorted(set.intersection(*sides)) if sides else []
    for flag, model in (("--old-model", args.old_model), ("--new-model", args.new_model)):
        if model not in have:
            raise CliError(f"{flag} {model!r}: no such model in --data {args.data} (models: {', '.join(have)})")


def _check_args(args: argparse.Namespace) -> None:
    """Every number the run needs, checked before any data is read or anything written."""
    problems = []
    if args.max_folds is not None and args.max_folds < 1:
        problems.append(f"--max-folds must be >= 1, got {args.max_folds}")
    bad_eps = [e for e in args.dp_epsilons if not (np.isfinite(e) and e > 0)]
    if bad_eps:
        problems.append(f"--dp-epsilons must be finite numbers > 0, got {', '.join(f'{e:g}' for e in bad_eps)}")
    if not 0 < args.delta < 1:
        problems.append(f"--delta must be in (0, 1), got {args.delta:g}")
    bad_counts = [n for n in args.hunger if n < 1]
    if bad_counts:
        problems.append(f"--hunger needs voice counts >= 1, got {', '.join(map(str, bad_counts))}")
    if problems:
        raise ValueError("; ".join(problems))


def _pseudo(args: argparse.Namespace) -> Any:
    if not args.pseudo:
        return None
    from fed_nessa.data.datasets import load_real

    try:
        extra = load_real(args.pseudo)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--pseudo {exc}") from None
    return lambda base: base.concat(extra.subset(np.isin(extra.voice, np.unique(base.voice))))


def run(args: argparse.Namespace) -> int:
    from fed_nessa.evaluation.reference_tables import (
        data_hunger,
        hunger_markdown,
        hunger_plot,
        hunger_summary,
        mean_table_markdown,
        scenario_tables,
        split_markdown,
    )
    from fed_nessa.model.training import TrainConfig
    from fed_nessa.outputs import check_output

    check_output(args.out, "--out", "folder")
    _check_args(args)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"--methods {args.methods!r}: unknown {unknown}; choose from {list(METHODS)}" if unknown
                         else f"--methods {args.methods!r}: names no method; choose from {list(METHODS)}")
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    if set(scenarios) - set(SCENARIOS) or not scenarios:
        raise ValueError(f"--scenarios {args.scenarios!r}: choose one or more of {list(SCENARIOS)}")
    cfg = CentralisedConfig(methods=methods, seed=args.seed,
                            train=TrainConfig(epochs=args.epochs, batch_size=128, lr=3e-4, patience=6,
                                              seed=args.seed))
    name, splits = _splits(args)
    _check_models(args, splits)
    pseudo = _pseudo(args)  # read (and checked) before hours of fitting
    t0 = time.perf_counter()
    result = scenario_tables(splits, args.old_model, args.new_model, cfg, scenarios, args.dp_epsilons, args.delta)
    result.update({"data": name, "methods": list(methods), "splits": [s.name for s in splits],
                   "dp": {"epsilons": args.dp_epsilons, "delta": args.delta, "unit": "one utterance pair",
                          "accountant": "Opacus RDP", "neighbouring": "add/remove one pair"},
                   "seconds": time.perf_counter() - t0})
    md = [f"# Evaluation: {name}", "", mean_table_markdown(result, f"{args.old_model} -> {args.new_model}")]
    if args.hunger:
        rows = data_hunger(splits, args.old_model, args.new_model, args.hunger, cfg, pseudo=pseudo, seed=args.seed)
        summary = hunger_summary(rows)
        result["data_hunger"] = {"rows": rows, "summary": summary}
        md.append(hunger_markdown(summary, "Data hunger: held-out EER vs training voices (runtime upgrade)"))
    md += ["## Per split", "", split_markdown(result)]
    # The folder is made only now, when every figure is computed: a failed run leaves nothing behind.
    args.out.mkdir(parents=True, exist_ok=True)
    if args.hunger:
        hunger_plot(result["data_hunger"]["summary"], args.out / "data_hunger.png",
                    f"{args.new_model} -> {args.old_model}")
    (args.out / "evaluation.json").write_text(json.dumps(result, indent=2, default=float))
    (args.out / "evaluation.md").write_text("\n".join(md))
    print(mean_table_markdown(result, f"{args.old_model} -> {args.new_model}"))
    print(f"wrote {args.out / 'evaluation.json'} and evaluation.md ({time.perf_counter() - t0:.0f} s)")
    return 0
