"""``fed-nessa audit-empirical``: canary audit of DP-SGD training with a positive control.

Exit status 0 when the DP run's lower bound stays below its claimed epsilon and
the positive control shows a clearly larger bound; 1 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

_DEFAULT_DATA = Path(__file__).resolve().parents[2] / "data" / "real-voices-dev" / "embeddings.npz"


def register(subparsers: argparse._SubParsersAction) -> None:
    from fed_nessa.privacy.canary.empirical import EmpiricalConfig

    d = EmpiricalConfig()
    p = subparsers.add_parser(
        "audit-empirical", help="canary audit: epsilon lower bound of DP-SGD training vs the claimed epsilon",
        description="Insert canary pairs (inclusion probability 1/2), train the NESSA aligner once with DP-SGD "
                    "and once as a positive control (no noise), and turn the attack's guesses into epsilon lower "
                    "bounds (Steinke, Nasr & Jagielski 2023; Clopper-Pearson).")
    p.add_argument("--data", type=Path, default=None,
                   help="base pairs: a device shard (.shard.safetensors) or an embeddings .npz "
                        "(default: the bundled real-voices-dev embeddings)")
    p.add_argument("--out", type=Path, default=Path("audit-empirical"), help="output folder")
    p.add_argument("--canaries", type=int, default=d.canaries)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--noise-multiplier", type=float, default=d.noise_multiplier)
    p.add_argument("--control-noise-multiplier", type=float, default=d.control_noise_multiplier)
    p.add_argument("--clip-norm", type=float, default=d.clip_norm)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--delta", type=float, default=d.delta)
    p.add_argument("--confidence", type=float, default=d.confidence)
    p.add_argument("--limit", type=int, default=None, help="use only the first N base pairs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fed_nessa.privacy.canary.empirical import (
        EmpiricalConfig,
        empirical_audit,
        load_base_pairs,
        write_empirical_report,
    )

    cfg = EmpiricalConfig(canaries=args.canaries, seed=args.seed, noise_multiplier=args.noise_multiplier,
                          control_noise_multiplier=args.control_noise_multiplier, clip_norm=args.clip_norm,
                          batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, hidden=args.hidden,
                          delta=args.delta, confidence=args.confidence)
    enroll, runtime, what = load_base_pairs(args.data or _DEFAULT_DATA, args.limit)
    result = empirical_audit(enroll, runtime, cfg, what)
    write_empirical_report(result, args.out)
    for r in result["runs"]:
        a = r["attack"]
        print(f"{r['label']}: sigma {r['noise_multiplier']:g}, claimed eps (RDP) {r['epsilon_claimed']['rdp']:.3g}, "
              f"AUROC {a['auroc']:.3f}, eps lower bound {a['epsilon_lower_bound']:.3f} "
              f"(confidence {cfg.confidence:g})")
    ok = all(result["checks"].values())
    print(f"{'PASS' if ok else 'FAIL'}: {result['checks']}; report: {args.out / 'report.md'}")
    return 0 if ok else 1
