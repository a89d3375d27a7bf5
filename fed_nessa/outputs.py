"""Output paths checked before any work: a command must fail at once, not after hours, and write nothing.

Every command that writes (a report folder, a run folder, an aligner, a shard, an array)
calls :func:`check_output` on its output before reading or computing anything, so an
output that cannot be written fails in one line naming the path and the fault, with no
half-written folder left behind: the path is a folder where a file is expected (or the
reverse), a parent on the way is a file, or the nearest existing folder is read-only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from fed_nessa.errors import FedNessaError

__all__ = ["OutputPathError", "check_output"]


class OutputPathError(FedNessaError, ValueError):
    """An output path that cannot be written (the message names the path and the fault)."""


def check_output(path: str | os.PathLike[str], flag: str, kind: Literal["file", "folder"]) -> Path:
    """Raise :class:`OutputPathError` unless ``path`` can be written as a ``kind``; return it as a Path.

    An existing path of the right kind is fine (overwriting is each command's own rule);
    missing folders on the way are fine too (they are made when the output is written).
    """
    path = Path(path)
    if path.exists():
        if kind == "folder" and not path.is_dir():
            raise OutputPathError(f"{flag} {path}: exists and is not a folder")
        if kind == "file" and path.is_dir():
            raise OutputPathError(f"{flag} {path}: is a folder, expected a file path")
    ancestor = path.parent if kind == "file" or not path.exists() else path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{flag} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: {ancestor} is not writable")
    return path
