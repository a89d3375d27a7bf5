"""``fed-nessa audit-empirical``: canary audits with a positive control, centralised or federated.

* default: DP-SGD training (``train_local``) on base pairs, canaries added
  (:mod:`fed_nessa.canary.empirical`);
* ``--federated``: canaries planted inside the devices of two real ``fed-nessa simulate``
  runs (the DP run and its no-noise control) and scored from the aligner each shipped
  (:mod:`fed_nessa.sim.canary_audit`);
* ``--run DIR [--control DIR]``: score run folders made by ``fed-nessa simulate --canaries M``.

Exit status 0 when the DP run's lower bound stays below its claimed epsilon and the
positive control shows a clearly larger bound (``--run`` without ``--control``: the first
check only); 1 otherwise; 2 for unusable input.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fed_nessa.arguments import path_arg, seed_arg

_DEFAULT_DATA = Path(__file__).resolve().parents[2] / "data" / "real-voices-dev" / "embeddings.npz"


def register(subparsers: argparse._SubParsersAction) -> None:
    from fed_nessa.canary.empirical import EmpiricalConfig
    from fed_nessa.sim.canary_audit import DEFAULT_CONFIG

    d = EmpiricalConfig()
    p = subparsers.add_parser(
        "audit-empirical", help="canary audit: epsilon lower bound of DP training vs the claimed epsilon",
        description="Insert canary pairs (inclusion probability 1/2), train once with DP and once as a positive "
                    "control (no noise), and turn the attack's guesses into epsilon lower bounds (Steinke, Nasr & "
                    "Jagielski 2023; Clopper-Pearson). Centralised DP-SGD by default; --federated plants the "
                    "canaries inside the devices of two real `fed-nessa simulate` runs.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--federated", action="store_true",
                      help="audit a federation: canaries inside the devices of a real simulate run and its control")
    mode.add_argument("--run", type=path_arg, default=None, metavar="RUN_DIR",
                      help="score a run folder made by `fed-nessa simulate --canaries M` (its secret is "
                           "RUN_DIR.canaries.npz beside it)")
    p.add_argument("--control", type=path_arg, default=None, metavar="RUN_DIR",
                   help="with --run: the positive control's run folder (same config, dp-mode none)")
    p.add_argument("--out", type=path_arg, default=Path("audit-empirical"), help="output folder")
    p.add_argument("--canaries", type=int, default=None,
                   help=f"canaries to plant (default {d.canaries}; with --run, the run's own secret says)")
    p.add_argument("--seed", type=seed_arg, default=d.seed, help="seed of the canaries and their inclusion coins")
    p.add_argument("--confidence", type=float, default=d.confidence)
    fed = p.add_argument_group("federated mode (--federated)")
    fed.add_argument("--config", default=DEFAULT_CONFIG,
                     help=f"simulate config file or name in simulations/configs/ (default: {DEFAULT_CONFIG})")
    fed.add_argument("--engine", choices=("flower", "fleet"), default="fleet",
                     help="the simulate engine both runs use (default: fleet)")
    fed.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one run-config key of both runs (repeatable)")
    fed.add_argument("--device-set", dest="device_overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one device-policy key of both runs (repeatable)")
    cen = p.add_argument_group("centralised mode (default)")
    cen.add_argument("--data", type=path_arg, default=None,
                     help="base pairs: a data name (resemblyzer <- campp pairs of its train side), a device shard "
                          "(.shard.safetensors) or an embeddings .npz (default: the bundled real-voices-dev "
                          "embeddings)")
    cen.add_argument("--noise-multiplier", type=float, default=d.noise_multiplier)
    cen.add_argument("--control-noise-multiplier", type=float, default=d.control_noise_multiplier)
    cen.add_argument("--clip-norm", type=float, default=d.clip_norm)
    cen.add_argument("--batch-size", type=int, default=d.batch_size)
    cen.add_argument("--epochs", type=int, default=d.epochs)
    cen.add_argument("--lr", type=float, default=d.lr)
    cen.add_argument("--hidden", type=int, default=d.hidden)
    cen.add_argument("--delta", type=float, default=d.delta)
    cen.add_argument("--limit", type=int, default=None, help="use only the first N base pairs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fed_nessa.outputs import check_output

    check_output(args.out, "--out", "folder")
    if args.control is not None and args.run is None:
        raise ValueError("--control needs --run (the DP run folder it controls)")
    if args.run is not None and args.canaries is not None:
        raise ValueError("--canaries: a run folder's canaries were planted by `fed-nessa simulate --canaries M`; "
                         "--run scores those")
    if args.canaries is None:
        from fed_nessa.canary.empirical import EmpiricalConfig

        args.canaries = EmpiricalConfig().canaries
    if args.federated:
        return _federated(args)
    if args.run is not None:
        return _score_folders(args)
    return _centralised(args)


def _centralised(args: argparse.Namespace) -> int:
    from fed_nessa.canary.empirical import (
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
    return _verdict(result["checks"], args.out)


def _federated(args: argparse.Namespace) -> int:
    from fed_nessa.sim.canary_audit import FederatedAudit, federated_audit, write_federated_report

    audit = FederatedAudit(config=args.config, overrides=tuple(args.overrides),
                           device_overrides=tuple(args.device_overrides), engine=args.engine,
                           canaries=args.canaries, seed=args.seed, confidence=args.confidence)
    result = federated_audit(audit, args.out)
    write_federated_report(result, args.out)
    _print_runs(result["runs"], audit.confidence)
    return _verdict(result["checks"], args.out)


def _score_folders(args: argparse.Namespace) -> int:
    from fed_nessa.canary.empirical import control_clearly_above
    from fed_nessa.sim.canary_audit import score_run, write_federated_report

    runs = [score_run(args.run, "dp", args.confidence)]
    if args.control is not None:
        runs.append(score_run(args.control, "control", args.confidence))
    lb = [r["attack"]["epsilon_lower_bound"] for r in runs]
    checks = {"dp_lower_bound_below_claimed": bool(lb[0] <= min(runs[0]["epsilon_claimed"].values()))}
    if len(runs) == 2:
        checks["control_clearly_above_dp"] = control_clearly_above(lb[1], lb[0])
    result: dict[str, Any] = {"mode": "run folders", "runs": runs, "checks": checks}
    write_federated_report(result, args.out)
    _print_runs(runs, args.confidence)
    return _verdict(checks, args.out)


def _print_runs(runs: list[dict[str, Any]], confidence: float) -> None:
    from fed_nessa.canary.empirical import claim_label

    for r in runs:
        a = r["attack"]
        print(f"{r['label']}: dp-mode {r['dp_mode']}, claimed eps {claim_label(r['epsilon_claimed'])}, "
              f"AUROC {a['auroc']:.3f}, eps lower bound "
              f"{a['epsilon_lower_bound']:.3f} (confidence {confidence:g})")


def _verdict(checks: dict[str, bool], out: Path) -> int:
    ok = all(checks.values())
    print(f"{'PASS' if ok else 'FAIL'}: {checks}; report: {out / 'report.md'}")
    return 0 if ok else 1
