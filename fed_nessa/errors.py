"""The library's one base exception.

Why one base: the CLI (and any embedding application) catches a single type,
:class:`FedNessaError`, and prints one clear line, while genuine bugs (a plain
``TypeError`` or ``KeyError`` from a mistake in our code) still surface with a
traceback. Every library error subclasses it *and* keeps its historical
built-in base (``ShardError(FedNessaError, ValueError)``), so existing
``except ValueError`` handlers keep working.

This module imports nothing from the package, so any module may import it
without creating a cycle.
"""

from __future__ import annotations

__all__ = ["FedNessaError"]


class FedNessaError(Exception):
    """Base of every error fed-nessa raises on purpose (bad input, corrupt file, exhausted budget)."""
