"""Per-round checkpoints of the server (global aligner + optimiser + round history) and resume.

A checkpoint is written after every completed round, atomically (temp file,
fsync, rename), so a crash at any moment leaves the last complete round on
disk. Resuming loads the newest readable checkpoint and continues with the
next round; device ledgers are never touched by the server, so a round that
was interrupted is simply run again (its spend, if any, is already in the
devices' ledgers, which is the conservative side).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fed_nessa.atomic import atomic_write_bytes
from fed_nessa.errors import FedNessaError

CHECKPOINT_DIR = "checkpoints"
#: Run-config keys a resumed run may change: how long it runs, where, how long it waits.
#: Every other key (budget, noise, mode, seed, model shape, data, SecAgg+ settings) shapes the
#: model or the guarantee and must equal the checkpoint's.
RESUMABLE_KEYS = frozenset({"num-server-rounds", "resume", "run-dir", "round-timeout"})


class ResumeError(FedNessaError, ValueError):
    """A resumed run's config differs from its checkpoint's in a key that must not change."""
_NAME = re.compile(r"^round-(\d{5})\.pt$")


@dataclass(frozen=True)
class Checkpoint:
    round: int
    model_state: dict[str, Any]
    history: list[dict[str, Any]]
    config: dict[str, Any]


def _path(run_dir: Path, round_num: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"round-{round_num:05d}.pt"


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``checkpoints/round-NNNNN.pt`` atomically; returns its path."""
    path = _path(run_dir, ckpt.round)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"round": ckpt.round, "model_state": ckpt.model_state, "history": ckpt.history,
                "config": ckpt.config}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint (weights-only unpickling: tensors, dicts, lists, numbers, strings)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    return Checkpoint(int(data["round"]), data["model_state"], list(data["history"]), dict(data["config"]))


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest readable checkpoint of a run folder (``None`` when there is none)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    rounds = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    for _, path in reversed(rounds):
        try:
            return load_checkpoint(path)
        except ValueError:
            continue  # a torn newest file: fall back to the previous round
    return None


def check_resumable(ckpt: Checkpoint, config: dict[str, Any]) -> None:
    """Refuse to resume when any privacy- or model-relevant key differs from the checkpoint's.

    The error names every differing key with both values. Raising ``num-server-rounds``
    (and the other :data:`RESUMABLE_KEYS`) stays allowed.
    """
    saved = ckpt.config
    keys = (set(saved) | set(config)) - RESUMABLE_KEYS
    diffs = sorted(k for k in keys if saved.get(k) != config.get(k))
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {config.get(k)!r}" for k in diffs)
        raise ResumeError(f"refusing to resume from round {ckpt.round}: the config differs from the checkpoint's "
                          f"in {', '.join(diffs)} ({detail}). Only {', '.join(sorted(RESUMABLE_KEYS))} may change; "
                          "start a new run folder for a different setting.")
