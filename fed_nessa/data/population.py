"""The one population type: what a data source gives every command that reads data.

A :class:`Population` holds the train side (the devices of a simulation, or their speakers pooled
for ``train``/``evaluate``), the held-out evaluation set and the server's validation set. Held-out
and validation sets are :class:`~fed_nessa.data.datasets.EmbeddingSet` s (the one held-out type);
the :class:`Scenario` names the old (enrollment-side) and new (runtime-side) model they are scored
with. The registry (:mod:`fed_nessa.data.registry`) builds one per data name or path.

The server never holds device data in deployment. In simulation the devices are
*created* here (the synthetic population, households built from the real-dev
train voices, or one device per kokoro-voices training voice) and written, by the one shard writer
(:func:`fed_nessa.data.datasets.write_devices`), into the run's shard folder for the
ClientApps to load by partition id; the server keeps only the held-out evaluation
set (speakers no device has) plus, for the final comparison rows, the pooled
training pairs to fit the centralised non-DP NESSA and ridge baselines.

``data-source`` may also be a folder of shards prepared elsewhere; the
evaluation set then comes from ``<folder>/eval.npz`` (arrays ``speaker``,
``utterance``, ``old_model``/``new_model`` names and one ``emb:<model>``
array per model id), see docs/federation.md.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fed_nessa.config import CORPUS_NAME, FederationConfig
from fed_nessa.data.datasets import EmbeddingSet, EmbeddingSetError, write_devices
from fed_nessa.data.shards import Shard, ShardError, load_shard, shard_paths

EVAL_FILE = "eval.npz"
VALIDATION_FILE = "validation.npz"  # optional: the server's validation speakers (same layout as eval.npz)
#: The update scenario a federation is judged in: the runtime model is upgraded, enrolled profiles stay.
SCENARIO = "runtime-upgrade"


@dataclass(frozen=True)
class Scenario:
    """Which model embeds the enrolled profiles (``old_model``) and which the runtime tests (``new_model``)."""

    old_model: str  # the enrollment-side model of the asymmetric system
    new_model: str  # the runtime-side model
    name: str = SCENARIO


@dataclass(frozen=True)
class Population:
    """One data source's data: the train side, the held-out evaluation set and the server's validation set.

    A simulation's population has ``devices`` (in memory) or ``shards`` (their files), their
    dimensions and the ``scenario`` its held-out sets are scored in; ``train``/``evaluate`` read
    ``train`` (every training speaker pooled) and ``held_out`` (None: the command's voice folds).
    """

    name: str
    held_out: EmbeddingSet | None  # speakers no device (and no training side) has
    train: EmbeddingSet | None = None  # the train side pooled (centralised commands)
    validation: EmbeddingSet | None = None  # the server's own validation speakers (the promotion gate's)
    scenario: Scenario | None = None  # a federation's old/new models (None: the command names them)
    shards: list[Path] = field(default_factory=list)  # the simulation's device files (empty: none on disk)
    devices: tuple[Shard, ...] = ()  # the devices in memory (fleet engine: no shard files written)
    d_x: int = 0  # a federation's devices' enrollment-side and runtime-side embedding dimensions
    d_y: int = 0
    #: The devices' two models, as every round config states them (a folder's ``eval.npz`` names its
    #: scenario's models itself; the built-in sources take both from the devices).
    enroll_model: str = ""
    runtime_model: str = ""

    def train_set(self) -> EmbeddingSet:
        """The train side pooled, as the centralised commands read it (a federation's is on its devices)."""
        if self.train is None:
            raise ValueError(f"{self.name}: no pooled train side (a federation's devices hold it)")
        return self.train

    def evaluation(self) -> tuple[EmbeddingSet, Scenario]:
        """The held-out evaluation set and the scenario it is scored in (what every engine reports)."""
        if self.held_out is None or self.scenario is None:
            raise ValueError(f"{self.name}: no held-out evaluation set and scenario (not a federation)")
        return self.held_out, self.scenario

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All devices' pairs (simulation only; for the centralised comparison rows)."""
        if not self.shards:
            raise ValueError("no device shards on the server: centralised baselines need a simulation")
        loaded = []
        for p in self.shards:
            try:
                loaded.append(load_shard(p))
            except ShardError:
                continue  # the device failed its rounds too; the comparison uses the same healthy devices
        if not loaded:
            raise ValueError("no readable device shard: centralised baselines cannot be fitted")
        return np.concatenate([s.enroll for s in loaded]), np.concatenate([s.runtime for s in loaded])


def federation_population(name: str, devices: list[Shard], folder: Path | None, held_out: EmbeddingSet,
                          validation: EmbeddingSet | None, scenario: Scenario) -> Population:
    """A simulation's population: its devices written to ``folder`` (None: kept in memory), its held-out and
    validation sets scored in ``scenario``."""
    first = devices[0]
    paths = _write_devices(devices, folder) if folder is not None else []
    return Population(name, held_out, validation=validation, scenario=scenario, shards=paths,
                      devices=tuple(devices) if folder is None else (), d_x=first.d_x, d_y=first.d_y,
                      enroll_model=first.enroll_model, runtime_model=first.runtime_model)


def _write_devices(devices: list[Shard], folder: Path) -> list[Path]:
    """Write the simulation's shards once (a resumed run reuses them: same devices, same ledgers)."""
    existing = shard_paths(folder) if folder.is_dir() else []
    if len(existing) == len(devices):
        return existing
    return write_devices(devices, folder, overwrite=True)


def synthetic_federation(cfg: FederationConfig, folder: Path | None) -> Population:
    """The synthetic devices; the separate evaluation population is held out, ``validation-speakers`` drawn
    apart for the gate."""
    from fed_nessa.data.synthetic import generate_population

    pop = generate_population(cfg.num_devices, cfg.seed, eval_speakers=cfg.eval_speakers,
                              validation_speakers=cfg.validation_speakers)
    return federation_population(cfg.data_source, pop.devices, folder, pop.eval, pop.validation,
                                 Scenario(pop.enroll_model, pop.runtime_model))


def real_dev_federation(cfg: FederationConfig, folder: Path | None) -> Population:
    """Households of real-dev's training voices; one seeded voice split is held out (no validation set).

    The centralised commands judge real-dev by voice folds instead (every voice is tested once across
    the folds); a federation is one model judged as it trains, so it needs one fixed held-out split.
    """
    from fed_nessa.data import datasets

    real = datasets.load_real("real-dev")
    train, held_out = datasets.split_by_voice(real, seed=cfg.seed)
    devices = datasets.make_households(train, cfg.enroll_model, cfg.runtime_model, seed=cfg.seed)
    if len(devices) != cfg.num_devices:  # checked before a shard is written: it sizes the cohort and SecAgg+
        raise ValueError(f"num-devices = {cfg.num_devices}: data-source real-dev makes {len(devices)} households "
                         f"(devices) of its training voices; set num-devices = {len(devices)}")
    return federation_population(cfg.data_source, devices, folder, held_out, None,
                                 Scenario(cfg.enroll_model, cfg.runtime_model))


#: kokoro-voices: voices per device (one device per training voice, all its utterances).
CORPUS_VOICES_PER_DEVICE = (1, 1)


@dataclass(frozen=True)
class CorpusPopulation:
    """The corpus split three ways by whole voices: devices' voices, the server's validation voices, held-out."""

    devices: EmbeddingSet  # the training voices the devices hold
    validation: EmbeddingSet | None  # training voices withheld from every device (the gate's)
    held_out: EmbeddingSet  # the corpus's held-out voices (no parent pack shared with the above)
    folder: Path


def corpus_population(validation_speakers: int, seed: int) -> CorpusPopulation:
    """kokoro-voices as a federation's population: ``validation_speakers`` training voices withheld, seeded.

    The held-out voices are the corpus's own (split by parent packs, :mod:`fed_nessa.data.corpus.store`):
    neither a device nor the gate ever sees them.
    """
    from fed_nessa.data.corpus.store import load_corpus
    from fed_nessa.data.datasets import resolve_real_folder, validation_split

    folder = resolve_real_folder(CORPUS_NAME)
    corpus = load_corpus(folder)
    if validation_speakers == 0:
        return CorpusPopulation(corpus.train, None, corpus.held_out, folder)
    try:
        devices, validation = validation_split(corpus.train, None, seed, count=validation_speakers)
    except ValueError as exc:
        raise ValueError(f"{folder}: validation-speakers = {validation_speakers}: {exc}") from None
    return CorpusPopulation(devices, validation, corpus.held_out, folder)


def corpus_device_count(validation_speakers: int, seed: int = 0) -> int:
    """How many devices kokoro-voices makes (``num-devices`` must equal it): one per device voice that has
    the households' minimum of utterances (every voice of a finished build)."""
    from fed_nessa.data.datasets import plan_households

    devices = corpus_population(validation_speakers, seed).devices
    return len(plan_households(devices, seed, speakers_per_device=CORPUS_VOICES_PER_DEVICE))


def corpus_federation(cfg: FederationConfig, folder: Path | None) -> Population:
    """kokoro-voices: one device per training voice; the corpus's held-out voices are the evaluation set."""
    from fed_nessa.data import datasets
    from fed_nessa.data.extract import MODEL_NAMES

    pop = corpus_population(cfg.validation_speakers, cfg.seed)
    for key, model in (("enroll-model", cfg.enroll_model), ("runtime-model", cfg.runtime_model)):
        if model not in MODEL_NAMES:
            raise ValueError(f"{pop.folder}: {key} = {model!r}: the corpus has no such model "
                             f"(models: {', '.join(MODEL_NAMES)})")
    devices = datasets.make_households(pop.devices, cfg.enroll_model, cfg.runtime_model, seed=cfg.seed,
                                       speakers_per_device=CORPUS_VOICES_PER_DEVICE)
    if len(devices) != cfg.num_devices:  # checked before a shard is written: it sizes the cohort and SecAgg+
        raise ValueError(f"num-devices = {cfg.num_devices}: data-source kokoro-voices makes {len(devices)} devices "
                         f"(one per training voice, validation-speakers = {cfg.validation_speakers} withheld for the "
                         f"server's gate); set num-devices = {len(devices)}")
    return federation_population(cfg.data_source, devices, folder, pop.held_out, pop.validation,
                                 Scenario(cfg.enroll_model, cfg.runtime_model))


def load_eval_file(path: Path) -> tuple[EmbeddingSet, Scenario]:
    """Read ``eval.npz`` (see module doc): the held-out set and the scenario it names; every fault names the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: evaluation set not found (a shard folder data source needs {EVAL_FILE})")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = {"speaker", "utterance", "old_model", "new_model"} - keys
            if missing:
                raise ValueError(f"{path}: missing array(s) {', '.join(sorted(missing))}")
            old, new = str(z["old_model"]), str(z["new_model"])
            emb = {k.split(":", 1)[1]: z[k].astype(np.float32) for k in keys if k.startswith("emb:")}
            speaker, utterance = z["speaker"], z["utterance"]
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path}: unreadable or truncated evaluation set ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        raise ValueError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
    for m in (old, new):
        if m not in emb:
            raise ValueError(f"{path}: no 'emb:{m}' array for model {m!r}")
    if speaker.ndim != 1 or utterance.shape != speaker.shape or speaker.size == 0:
        raise ValueError(f"{path}: 'speaker' and 'utterance' must be two 1-D arrays of the same length >= 1, "
                         f"got {speaker.shape} and {utterance.shape}")
    n = speaker.size
    for m in (old, new):
        arr = emb[m]
        if arr.ndim != 2 or len(arr) != n:
            raise ValueError(f"{path}: 'emb:{m}' must be ({n}, d), got {arr.shape}")
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            raise ValueError(f"{path}: 'emb:{m}' has {int(bad.sum())} non-finite row(s), first at row "
                             f"{int(np.argmax(bad))}")
    try:
        held_out = EmbeddingSet({m: emb[m] for m in dict.fromkeys((old, new))}, speaker, speaker, utterance,
                                {m: m for m in (old, new)}, name=str(path))
    except EmbeddingSetError as exc:
        raise ValueError(f"{path}: {exc.problem}") from None
    return held_out, Scenario(old, new)


def folder_federation(folder: Path) -> Population:
    """A folder of device shards prepared elsewhere: its ``eval.npz`` (and ``validation.npz``) and scenario."""
    paths = shard_paths(folder)
    if not paths:
        raise ValueError(f"{folder}: no *.shard.safetensors files")
    first = load_shard(paths[0])
    held_out, scenario = load_eval_file(folder / EVAL_FILE)
    val = load_eval_file(folder / VALIDATION_FILE)[0] if (folder / VALIDATION_FILE).is_file() else None
    return Population(str(folder), held_out, validation=val, scenario=scenario, shards=paths,
                      d_x=first.d_x, d_y=first.d_y, enroll_model=first.enroll_model,
                      runtime_model=first.runtime_model)
