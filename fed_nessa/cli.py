"""The ``fed-nessa`` command line: discovers sub-commands in :mod:`fed_nessa.commands`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from typing import NoReturn

from fed_nessa import __version__
from fed_nessa import commands as _commands
from fed_nessa.errors import FedNessaError


class CliError(FedNessaError):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the CLI's form: one line, exit status 2 (``--help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def os_error_text(exc: OSError) -> str:
    """``PATH: fault`` for an operating-system error: ``[Errno 21] Is a directory: 'x'`` reads ``x: Is a directory``."""
    if exc.strerror and exc.filename is not None:
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
        return f"{where}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fed-nessa",
        description="Federated, differentially private NESSA embedding aligners.",
    )
    parser.add_argument("--version", action="version", version=f"fed-nessa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{_commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FedNessaError, ValueError) as exc:
        # ValueError covers ShardError/ConfigError: they already name the file and fault.
        print(f"fed-nessa {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # an absurd size (canaries, speakers, devices) found out while allocating
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"fed-nessa {args.command}: error: out of memory ({detail}): a size given is too large for this "
              "machine", file=sys.stderr)
        return 2
    except OSError as exc:
        # FileNotFoundError we raise names the file and fault; one the system raises (a folder where a
        # file is expected, a parent that is a file, a read-only folder, a full disk) names its path.
        print(f"fed-nessa {args.command}: error: {os_error_text(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
