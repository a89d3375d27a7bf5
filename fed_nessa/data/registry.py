"""The one data-source registry: a data name -> the source that builds its population.

Every command that reads data looks its name up here: ``train`` and ``evaluate``
(``--data``), ``simulate`` on both engines and the canary audit (``data-source``).
The names themselves are listed once in :mod:`fed_nessa.config` (``SOURCE_NAMES``,
``FEDERATION_NAMES``: the config sits below ``fed_nessa.data`` and validates
``data-source`` with them); this module maps each to its source and the CLI help reads it. Besides a name, a path is a
source: a folder of device shards or one embedding-set file.

Every source returns the one population type (:class:`fed_nessa.data.population.Population`):
:func:`resolve` its centralised side (``train``, ``evaluate``, the centralised canary audit),
:func:`load_federation_data` a simulation's devices (both engines, the federated canary audit).

Adding a data source: one module with a class that has the :class:`Source` methods,
and one line in :data:`SOURCES` plus its name in ``fed_nessa.config.SOURCE_NAMES``
(docs/architecture.md "Where to add").

Each source loads its data only when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fed_nessa.config import CORPUS_NAME, FEDERATION_NAMES, SOURCE_NAMES

if TYPE_CHECKING:
    from fed_nessa.config import FederationConfig
    from fed_nessa.data.population import Population


class Source(Protocol):
    """What one data source provides: its population for the centralised commands and, if ``federated``,
    for a simulation (the same type; the sources that split differently say why)."""

    @property
    def federated(self) -> bool:
        """Whether it can build a simulation's devices and the server's held-out sets."""
        ...

    def centralised(self, name: str, num_devices: int, seed: int) -> Population:
        """Train-side speakers pooled and the fixed held-out set (None: use voice folds)."""
        ...

    def federation(self, cfg: FederationConfig, shard_folder: Path | None) -> Population:
        """The simulation's devices, the held-out evaluation set and the server's validation set."""
        ...


@dataclass(frozen=True)
class Synthetic:
    """The embedded synthetic population (devices' speakers; separate evaluation population)."""

    federated: bool = True

    def centralised(self, name: str, num_devices: int, seed: int) -> Population:
        from fed_nessa.data.sources import synthetic_sets

        return synthetic_sets(num_devices, seed)

    def federation(self, cfg: FederationConfig, shard_folder: Path | None) -> Population:
        from fed_nessa.data.population import synthetic_federation

        return synthetic_federation(cfg, shard_folder)


@dataclass(frozen=True)
class RealSet:
    """Real-model embeddings of a bundled set; held-out figures from voice folds (households when federated)."""

    federated: bool = False

    def centralised(self, name: str, num_devices: int, seed: int) -> Population:
        from fed_nessa.data.sources import real_sets

        return real_sets(name)

    def federation(self, cfg: FederationConfig, shard_folder: Path | None) -> Population:
        from fed_nessa.data.population import real_dev_federation

        if not self.federated:  # only real-dev makes households; the speed sets would be read as real-dev
            raise ValueError(f"data-source = {cfg.data_source!r}: not a federated source "
                             f"(federated: {', '.join(FEDERATION_NAMES)} or a folder of shards)")
        return real_dev_federation(cfg, shard_folder)


@dataclass(frozen=True)
class Corpus:
    """The Kokoro blend corpus: fixed held-out voices that share no parent pack with training voices.

    Federated: one device per training voice, less ``validation-speakers`` training voices the server
    keeps for its gate; the held-out voices are the evaluation set
    (:func:`fed_nessa.data.population.corpus_federation`).
    """

    federated: bool = True

    def centralised(self, name: str, num_devices: int, seed: int) -> Population:
        from fed_nessa.data.sources import corpus_sets

        return corpus_sets(name)

    def federation(self, cfg: FederationConfig, shard_folder: Path | None) -> Population:
        from fed_nessa.data.population import corpus_federation

        return corpus_federation(cfg, shard_folder)


@dataclass(frozen=True)
class ShardFolder:
    """A folder of device shards (with ``eval.npz``, optionally ``validation.npz``, when federated)."""

    federated: bool = True

    def centralised(self, name: str, num_devices: int, seed: int) -> Population:
        from fed_nessa.data.sources import shard_folder_sets

        return shard_folder_sets(name)

    def federation(self, cfg: FederationConfig, shard_folder: Path | None) -> Population:
        from fed_nessa.data.population import folder_federation

        if shard_folder is None:
            raise ValueError("a folder data source needs its shard folder")
        return folder_federation(shard_folder)


@dataclass(frozen=True)
class SetFile:
    """One ``.safetensors`` embedding-set file (centralised commands only)."""

    federated: bool = False

    def centralised(self, name: str, num_devices: int, seed: int) -> Population:
        from fed_nessa.data.sources import set_file_sets

        return set_file_sets(name)

    def federation(self, cfg: FederationConfig, shard_folder: Path | None) -> Population:
        raise ValueError(f"data-source = {cfg.data_source!r}: an embedding-set file is not a federation "
                         f"(federated: {', '.join(FEDERATION_NAMES)} or a folder of shards)")


SOURCES: dict[str, Source] = {
    "synthetic": Synthetic(),
    "real-dev": RealSet(federated=True),
    "real-speed-dev": RealSet(),
    "real-dev+speed": RealSet(),
    CORPUS_NAME: Corpus(),
}
if tuple(SOURCES) != SOURCE_NAMES or FEDERATION_NAMES != tuple(n for n, s in SOURCES.items() if s.federated):
    raise ImportError("fed_nessa.data.registry: SOURCES and fed_nessa.config's SOURCE_NAMES/FEDERATION_NAMES differ")
NAMES_HELP = " | ".join(SOURCE_NAMES) + " | a shard folder | an embedding-set file"


def lookup(spec: str) -> Source:
    """The source for a name or a path; anything else is one error listing the names."""
    if spec in SOURCES:
        return SOURCES[spec]
    path = Path(spec)
    if spec and path.is_dir():
        return ShardFolder()
    if spec and path.is_file():
        return SetFile()
    raise FileNotFoundError(f"{spec}: not a data name ({', '.join(SOURCE_NAMES)}), "
                            f"a shard folder or an embedding-set file")


def resolve(spec: str, *, num_devices: int = 1000, seed: int = 0) -> Population:
    """The centralised population of ``spec`` (a name or a path): train side pooled, fixed held-out set."""
    return lookup(spec).centralised(spec, num_devices, seed)


def load_federation_data(cfg: FederationConfig, shard_folder: Path | None) -> Population:
    """Build (simulation) or locate the devices, the held-out evaluation set and the server's validation set.

    ``shard_folder`` is the wire contract's rule (:func:`fed_nessa.federated.protocol.shard_folder`),
    passed in so that data never depends on the federated layer. ``None`` (fleet engine,
    built-in sources): the devices stay in memory and no shard file is written.
    """
    source = SOURCES.get(cfg.data_source, ShardFolder())  # a name not in the registry is a shard folder
    return source.federation(cfg, shard_folder)
