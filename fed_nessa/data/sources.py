"""Resolve a ``--data`` argument to embedding sets: a bundled name, a shard folder, or a set file.

Names: ``synthetic`` (the embedded default population: train = every device's
speakers, held-out = the separate evaluation population), ``real-dev``,
``real-speed-dev``, ``real-dev+speed`` (real-model embeddings; held-out figures
come from voice folds), ``kokoro-voices`` (the Kokoro blend corpus: its fixed
held-out voices share no parent pack with its training voices). A folder of device shards is pooled (speaker ids made
global per device); a single ``.safetensors`` file is an EmbeddingSet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REAL_NAMES = ("real-dev", "real-speed-dev", "real-dev+speed")
CORPUS_NAME = "kokoro-voices"  # also its folder under data/


@dataclass(frozen=True)
class DataSource:
    """Train-side data and, where the source has one, a fixed held-out set."""

    name: str
    train: Any  # EmbeddingSet
    held_out: Any | None  # EmbeddingSet of other speakers, or None (use voice folds)


def resolve(spec: str, *, num_devices: int = 1000, seed: int = 0) -> DataSource:
    from fed_nessa.data import datasets

    if spec == "synthetic":
        from fed_nessa.data.synthetic import generate_population

        pop = generate_population(num_devices, seed)
        return DataSource(f"synthetic(devices={num_devices}, seed={seed})", pop.train, pop.eval)
    if spec in REAL_NAMES:
        return DataSource(spec, datasets.load_real(spec), None)
    if spec == CORPUS_NAME:
        from fed_nessa.data.corpus.store import load_corpus

        corpus = load_corpus(datasets.resolve_real_folder(CORPUS_NAME))
        return DataSource(spec, corpus.train, corpus.held_out)
    path = Path(spec)
    if path.is_dir():
        return DataSource(str(path), pooled_shards(path), None)
    if path.is_file():
        return DataSource(str(path), datasets.EmbeddingSet.load(path), None)
    raise FileNotFoundError(f"{spec}: not a data name ({', '.join(('synthetic',) + REAL_NAMES + (CORPUS_NAME,))}), "
                            f"a shard folder or an embedding-set file")


def pooled_shards(folder: Path) -> Any:
    """All shards of a folder as one EmbeddingSet (local speaker ids offset per device)."""
    from fed_nessa.data.datasets import EmbeddingSet
    from fed_nessa.data.shards import load_shard, shard_paths

    paths = shard_paths(folder)
    if not paths:
        raise ValueError(f"{folder}: no *.shard.safetensors files")
    shards = [load_shard(p) for p in paths]
    first = shards[0]
    for p, s in zip(paths, shards):
        if (s.d_x, s.d_y, s.enroll_model, s.runtime_model) != (first.d_x, first.d_y, first.enroll_model,
                                                                first.runtime_model):
            raise ValueError(f"{p}: models/dims differ from {paths[0].name}")
    offset, speaker, utt = 0, [], []
    for s in shards:
        speaker.append(s.speaker + offset)
        utt.append(_utterance_index(s.speaker))
        offset += int(s.speaker.max()) + 1
    spk = np.concatenate(speaker)
    return EmbeddingSet(
        embeddings={first.enroll_model: np.concatenate([s.enroll for s in shards]),
                    first.runtime_model: np.concatenate([s.runtime for s in shards])},
        speaker=spk, voice=spk.copy(), utterance=np.concatenate(utt),
        model_ids={first.enroll_model: first.enroll_model, first.runtime_model: first.runtime_model},
        name=str(folder))


def _utterance_index(speaker: np.ndarray) -> np.ndarray:
    """0..k-1 within each speaker, in file order."""
    out = np.zeros(speaker.size, np.int64)
    for s in np.unique(speaker):
        rows = np.flatnonzero(speaker == s)
        out[rows] = np.arange(rows.size)
    return out
