"""``fed-nessa view RUN_DIR``: a live, read-only web page of one run folder (docs/federation.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from fed_nessa.view.app import DEFAULT_HOST

    parser = subparsers.add_parser(
        "view", help="a local web page of one run folder, live while the run writes it",
        description="Serve a read-only page of RUN_DIR (rounds, quality, privacy budgets, declines, the gate, "
                    "the audit's verdict, cost), refreshed while a run (either engine, or a deployed SuperLink's "
                    "run folder) writes it. Binds to 127.0.0.1 unless --host says otherwise.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run folder (it may not exist yet)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this "
                                                               "machine only)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free one, printed)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fed_nessa.view.app import serve

    if args.run_dir.exists() and not args.run_dir.is_dir():
        raise ValueError(f"{args.run_dir}: not a folder (a run folder holds summary.json and ledgers)")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: allowed range [0, 65535]")
    try:
        serve(args.run_dir, args.host, args.port)
    except KeyboardInterrupt:
        pass
    return 0
