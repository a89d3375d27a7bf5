"""Embedding sets for ``train`` and ``evaluate``: the centralised side of each registry source.

The names are listed once in :mod:`fed_nessa.data.registry`. ``synthetic`` (the embedded
default population: train = every device's speakers, held-out = the separate evaluation population), ``real-dev``,
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

from fed_nessa.data.registry import CORPUS_NAME, lookup


@dataclass(frozen=True)
class DataSource:
    """Train-side data and, where the source has one, a fixed held-out set."""

    name: str
    train: Any  # EmbeddingSet
    held_out: Any | None  # EmbeddingSet of other speakers, or None (use voice folds)


def resolve(spec: str, *, num_devices: int = 1000, seed: int = 0) -> DataSource:
    """The embedding sets of ``spec``, looked up in the one registry (:mod:`fed_nessa.data.registry`)."""
    return lookup(spec).embedding_sets(spec, num_devices, seed)


def synthetic_sets(num_devices: int, seed: int) -> DataSource:
    """Train = every device's speakers, held-out = the separate evaluation population."""
    from fed_nessa.data.synthetic import generate_population

    pop = generate_population(num_devices, seed)
    return DataSource(f"synthetic(devices={num_devices}, seed={seed})", pop.train, pop.eval)


def real_sets(name: str) -> DataSource:
    """A bundled real-model set; its held-out figures come from voice folds."""
    from fed_nessa.data import datasets

    return DataSource(name, datasets.load_real(name), None)


def corpus_sets(name: str) -> DataSource:
    """The Kokoro corpus: its own parent-disjoint held-out voices."""
    from fed_nessa.data import datasets
    from fed_nessa.data.corpus.store import load_corpus

    corpus = load_corpus(datasets.resolve_real_folder(CORPUS_NAME))
    return DataSource(name, corpus.train, corpus.held_out)


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
