"""The argparse ``type`` of the command-line arguments every command shares (paths, seeds).

An argument's fault is found while parsing, so it is one usage line (exit 2) naming the
argument, before anything is read, computed or written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["path_arg", "seed_arg"]


def path_arg(text: str) -> Path:
    """A path: ``""`` would silently be ``Path(".")``, the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"empty path {text!r}")
    return Path(text)


def seed_arg(text: str) -> int:
    """A seed: an integer >= 0 (numpy refuses a negative one only later, in a message naming no argument)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value
