"""``fed-nessa simulate``: a federated simulation (SecAgg+, DP, ledgers) in one process -> a run folder."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from fed_nessa.sim.runner import add_arguments

    parser = subparsers.add_parser(
        "simulate", help="simulate a federation of virtual devices and write a run folder",
        description="Run the ServerApp and hundreds of virtual ClientApps in-process (real SecAgg+, DP-SGD, "
                    "privacy ledgers) and write summary.json, report.md, plots and the aligner artifact.")
    add_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fed_nessa.sim.runner import run_from_args

    return run_from_args(args)
