"""The centralised side of each registry source: its :class:`~fed_nessa.data.population.Population` for
``train`` and ``evaluate`` (every training speaker pooled, and the fixed held-out set where there is one).

The names are listed once in :mod:`fed_nessa.data.registry`. ``synthetic`` (the embedded
default population: train = every device's speakers, held-out = the separate evaluation population), ``real-dev``,
``real-speed-dev``, ``real-dev+speed`` (real-model embeddings; held-out figures
come from voice folds), ``kokoro-voices`` (the Kokoro blend corpus: its fixed
held-out voices share no parent pack with its training voices). A folder of device shards is pooled (speaker ids made
global per device); a single ``.safetensors`` file is an EmbeddingSet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fed_nessa.config import CORPUS_NAME
from fed_nessa.data.datasets import EmbeddingSet
from fed_nessa.data.population import Population


def synthetic_sets(num_devices: int, seed: int) -> Population:
    """Train = every device's speakers, held-out = the separate evaluation population."""
    from fed_nessa.data.synthetic import generate_population

    pop = generate_population(num_devices, seed)
    return Population(f"synthetic(devices={num_devices}, seed={seed})", pop.eval, train=pop.train)


def real_sets(name: str) -> Population:
    """A bundled real-model set; its held-out figures come from voice folds."""
    from fed_nessa.data import datasets

    return Population(name, None, train=datasets.load_real(name))


def corpus_sets(name: str) -> Population:
    """The Kokoro corpus: its own parent-disjoint held-out voices."""
    from fed_nessa.data import datasets
    from fed_nessa.data.corpus.store import load_corpus

    corpus = load_corpus(datasets.resolve_real_folder(CORPUS_NAME))
    return Population(name, corpus.held_out, train=corpus.train)


def shard_folder_sets(name: str) -> Population:
    """A folder of device shards (``name``, as given), pooled (no fixed held-out set: voice folds)."""
    return Population(name, None, train=pooled_shards(Path(name)))


def set_file_sets(name: str) -> Population:
    """One embedding-set file (``name``, as given; no fixed held-out set: voice folds)."""
    return Population(name, None, train=EmbeddingSet.load(Path(name)))


def pooled_shards(folder: Path) -> EmbeddingSet:
    """All shards of a folder as one EmbeddingSet (local speaker ids offset per device)."""
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
