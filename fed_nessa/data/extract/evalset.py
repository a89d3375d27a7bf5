"""Turn an extracted shard of HELD-OUT speakers into the server's evaluation file (``eval.npz``).

A federated run over a folder of shards (``data-source = <folder>``) scores
the aligner on ``<folder>/eval.npz``: speakers no device has, embedded by
both models (format: ``fed_nessa/data/population.py``). Extracting held-out audio with
``fed-nessa extract ... --eval-set <folder>/eval.npz`` writes it from the
same pipeline as the devices' shards, so evaluation and training embeddings
can never come from different weights or feature recipes.

The first K utterances of a speaker (in file-name order) become its profile
in the evaluation protocol, the rest its tests: give every held-out speaker
comfortably more than K (default 10) utterances.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fed_nessa.data.shards import Shard


def eval_arrays(shard: Shard) -> dict[str, np.ndarray]:
    """The ``eval.npz`` arrays: speaker, utterance (index within speaker), model names, one ``emb:<id>`` per model."""
    if shard.enroll_model == shard.runtime_model:
        raise ValueError(f"an evaluation set needs two different models, got {shard.enroll_model!r} twice")
    utterance = np.zeros(shard.n, dtype=np.int64)
    for spk in np.unique(shard.speaker):
        rows = np.flatnonzero(shard.speaker == spk)
        utterance[rows] = np.arange(rows.size)
    return {
        "speaker": shard.speaker.astype(np.int64),
        "utterance": utterance,
        "old_model": np.array(shard.enroll_model),  # the enrollment side keeps the old profiles
        "new_model": np.array(shard.runtime_model),
        f"emb:{shard.enroll_model}": shard.enroll.astype(np.float32),
        f"emb:{shard.runtime_model}": shard.runtime.astype(np.float32),
    }


def write_eval_set(shard: Shard, out: str | os.PathLike[str]) -> Path:
    """Write ``eval.npz`` atomically; returns its path."""
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"{out}: the evaluation set file must end with '.npz'")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            arrays: dict[str, Any] = eval_arrays(shard)  # Any: keeps numpy's savez(**kwds) overload happy
            np.savez(fh, **arrays)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
