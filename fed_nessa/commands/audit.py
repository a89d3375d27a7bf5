"""``fed-nessa audit RUN_DIR_OR_LEDGER``: verify ledgers and recompute every epsilon.

Exit status 0 when every check passes, 1 when any fails (the report lists them),
2 for unusable input (no ledger found, unreadable summary).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fed_nessa.arguments import path_arg
from fed_nessa.privacy.accounting import ACCOUNTANTS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "audit", help="verify privacy ledgers, recompute epsilons, write audit/report.md",
        description="Verify every device ledger (hash chain, Ed25519 signatures), recompute each device's "
                    "epsilon with two independent accountants, compare with reported values and budgets, "
                    "cross-check the server's federation ledger, and write audit/audit.json + report.md.")
    p.add_argument("path", type=path_arg, help="a run folder, a folder of collected device ledgers, or one "
                                           "privacy-ledger.jsonl")
    p.add_argument("--out", type=path_arg, default=None, help="output folder (default: <path>/audit)")
    p.add_argument("--accountants", default="rdp,pld",
                   help=f"two of {','.join(ACCOUNTANTS)} (default rdp,pld)")
    p.set_defaults(func=run)


def _check_inputs(path: Path, out: Path | None) -> None:
    """What the audit cannot read at all (exit 2), as opposed to what it reads and finds faulty (exit 1)."""
    from fed_nessa.outputs import check_output
    from fed_nessa.privacy.ledger import FEDERATION_LEDGER_NAME

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or ledger file")
    check_output(out or (path if path.is_dir() else path.parent) / "audit", "--out", "folder")
    if not path.is_dir():
        return
    summary = path / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{summary}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{summary}: not a run summary (a JSON {type(data).__name__}, expected an object)")
    for name in ("summary.json", FEDERATION_LEDGER_NAME):
        if (path / name).exists() and not (path / name).is_file():
            raise ValueError(f"{path / name}: is a folder, expected a file")


def run(args: argparse.Namespace) -> int:
    from fed_nessa.privacy.audit import audit

    _check_inputs(args.path, args.out)
    accountants = tuple(a.strip() for a in args.accountants.split(","))
    bad = [a for a in accountants if a not in ACCOUNTANTS]
    if len(accountants) != 2 or bad:
        raise ValueError(f"--accountants needs two of {ACCOUNTANTS}, got {args.accountants!r}")
    result = audit(args.path, out_dir=args.out, accountants=accountants)  # type: ignore[arg-type]
    fails = result.failures
    print(f"{'PASS' if result.passed else 'FAIL'}: {len(result.devices)} device ledger(s), "
          f"{len(fails)} failed check(s); report: {Path(result.out_dir or '') / 'report.md'}")
    for f in fails[:20]:
        where = f" device {f.device}" if f.device else ""
        where += f" seq {f.seq}" if f.seq is not None else ""
        print(f"  FAIL {f.check}{where}: {f.message}")
    if len(fails) > 20:
        print(f"  ... and {len(fails) - 20} more in the report")
    return 0 if result.passed else 1
