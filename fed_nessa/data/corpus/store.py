"""The committed corpus folder: float16 embeddings + voice table; written from the work files, loaded checked.

Layout (``data/kokoro-voices/``):

- ``embeddings.npz``: ``campp`` (N, 192), ``resemblyzer`` (N, 256), ``vfl_dvec``
  (N, 256) float16 unit rows; ``voice`` and ``utterance`` (int32); ``sentence``
  (int16, index into the Harvard list); the conditions drawn per utterance
  (:data:`CONDITIONS`); rows sorted by (voice, utterance);
- ``voices.csv``: voice_id, split (train/heldout), parents and weights ('+'-joined),
  speed, utterances.

The loader refuses a file with NaN/inf rows, wrong dimensions, missing arrays,
a voice absent from the table, or a held-out voice sharing a parent with a
training voice, with one line naming the file and the problem.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fed_nessa.data.corpus.voices import HELDOUT, TRAIN, Voice
from fed_nessa.data.datasets import REAL_MODEL_DIMS, REAL_MODEL_IDS, EmbeddingSet, EmbeddingSetError
from fed_nessa.data.extract import MODEL_NAMES

EMBEDDINGS = "embeddings.npz"
VOICES = "voices.csv"
VOICE_FIELDS = ("voice_id", "split", "parents", "weights", "speed", "utterances")
# Per-utterance conditions kept beside the embeddings (build.DEGRADATION_FIELDS + duration), compactly typed.
CONDITIONS = {"duration_s": np.float16, "reverb": np.bool_, "noise_type": np.str_, "snr_db": np.float16,
              "telephone": np.bool_, "gain_db": np.float16, "clipped_frac": np.float16}


@dataclass(frozen=True)
class Corpus:
    """The corpus as two embedding sets whose voices share no parent pack."""

    train: EmbeddingSet
    held_out: EmbeddingSet
    voices: tuple[Voice, ...]


def check_split(voices: list[Voice] | tuple[Voice, ...], where: str = "<voice table>") -> None:
    """Raise unless no held-out voice shares a parent pack with a training voice."""
    bad_split = sorted({v.split for v in voices} - {TRAIN, HELDOUT})
    if bad_split:
        raise EmbeddingSetError(where, f"unknown split(s) {', '.join(bad_split)} (expected {TRAIN}/{HELDOUT})")
    train = {p for v in voices if v.split == TRAIN for p in v.parents}
    shared = sorted(train & {p for v in voices if v.split == HELDOUT for p in v.parents})
    if shared:
        raise EmbeddingSetError(where, f"held-out voices share parent pack(s) with training voices: "
                                       f"{', '.join(shared)}")


def _voice_rows(voices: list[Voice], counts: dict[int, int]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(VOICE_FIELDS)
    for v in voices:
        w.writerow([v.voice_id, v.split, "+".join(v.parents), "+".join(f"{x:.6f}" for x in v.weights),
                    f"{v.speed:.4f}", counts[v.voice_id]])
    return buf.getvalue()


def write_corpus(out: Path, voices: list[Voice], per_voice: dict[int, dict[str, np.ndarray]]) -> Path:
    """Write the corpus folder from per-voice arrays (model -> (n, d), 'sentence' -> (n,))."""
    check_split(voices, str(out))
    ids = [v.voice_id for v in voices]
    arrays: dict[str, np.ndarray] = {
        m: np.concatenate([per_voice[i][m] for i in ids]).astype(np.float16) for m in MODEL_NAMES}
    arrays["voice"] = np.concatenate([np.full(per_voice[i]["sentence"].size, i, np.int32) for i in ids])
    arrays["utterance"] = np.concatenate([np.arange(per_voice[i]["sentence"].size, dtype=np.int32) for i in ids])
    arrays["sentence"] = np.concatenate([per_voice[i]["sentence"] for i in ids]).astype(np.int16)
    for key, dtype in CONDITIONS.items():  # what was drawn per utterance, where the work files have it
        if all(key in per_voice[i] for i in ids):
            arrays[key] = np.concatenate([per_voice[i][key] for i in ids]).astype(dtype)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{EMBEDDINGS}.tmp"
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, out / EMBEDDINGS)
    (out / VOICES).write_text(_voice_rows(voices, {i: per_voice[i]["sentence"].size for i in ids}), encoding="utf-8")
    return out


def read_voices(path: Path) -> tuple[Voice, ...]:
    """The voice table, each row checked (one line naming the file and the row on a fault)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: voice table not found") from None
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            parents = tuple(row["parents"].split("+"))
            weights = tuple(float(x) for x in row["weights"].split("+"))
            if len(parents) != len(weights) or abs(sum(weights) - 1.0) > 1e-3 or min(weights) < 0:
                raise ValueError("weights must be one non-negative weight per parent, summing to 1")
            out.append(Voice(int(row["voice_id"]), parents, weights, float(row["speed"]), row["split"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EmbeddingSetError(path, f"line {line}: bad voice row ({exc})") from None
    check_split(out, str(path))
    return tuple(out)


def _arrays(npz: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(npz, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"{npz}: file not found (expected a corpus folder)") from None
    except Exception as exc:  # zipfile/ValueError/OSError for corrupt archives
        raise EmbeddingSetError(npz, f"unreadable or corrupt archive ({type(exc).__name__}: {exc})") from None


def check_arrays(npz: Path, arrays: dict[str, np.ndarray]) -> None:
    """Raise on missing arrays, wrong dimensions or row counts, and non-finite embeddings."""
    missing = [k for k in (*MODEL_NAMES, "voice", "utterance") if k not in arrays]
    if missing:
        raise EmbeddingSetError(npz, f"missing array(s): {', '.join(missing)}")
    n = arrays["voice"].shape[0]
    for m in MODEL_NAMES:
        a = arrays[m]
        if a.ndim != 2 or a.shape != (n, REAL_MODEL_DIMS[m]):
            raise EmbeddingSetError(npz, f"model '{m}': expected shape ({n}, {REAL_MODEL_DIMS[m]}), got {a.shape}")
        bad = ~np.isfinite(a.astype(np.float32)).all(axis=1)
        if bad.any():
            raise EmbeddingSetError(npz, f"model '{m}': {int(bad.sum())} non-finite row(s), first at row "
                                         f"{int(np.argmax(bad))}")


def load_corpus(folder: str | os.PathLike[str]) -> Corpus:
    """The corpus folder as training and held-out embedding sets (voices of disjoint parent packs)."""
    folder = Path(folder)
    npz = folder / EMBEDDINGS
    arrays = _arrays(npz)
    check_arrays(npz, arrays)
    voices = read_voices(folder / VOICES)
    split = {v.voice_id: v.split for v in voices}
    unknown = sorted(set(np.unique(arrays["voice"]).tolist()) - set(split))
    if unknown:
        raise EmbeddingSetError(npz, f"voice id(s) not in {VOICES}: {unknown[:5]}")
    is_heldout = np.array([split[int(v)] == HELDOUT for v in arrays["voice"]])

    def part(rows: np.ndarray, name: str) -> EmbeddingSet:
        try:
            return EmbeddingSet(
                embeddings={m: arrays[m][rows].astype(np.float32) for m in MODEL_NAMES},
                speaker=arrays["voice"][rows], voice=arrays["voice"][rows], utterance=arrays["utterance"][rows],
                model_ids={m: REAL_MODEL_IDS[m] for m in MODEL_NAMES}, name=name, meta={"source": folder.name})
        except EmbeddingSetError as exc:
            raise EmbeddingSetError(npz, exc.problem) from None

    return Corpus(part(~is_heldout, f"{folder.name}:{TRAIN}"), part(is_heldout, f"{folder.name}:{HELDOUT}"), voices)


def assemble(cache: Path, table: list[Voice], out: Path) -> int:
    """Gather every finished voice of the work folder into the corpus folder; returns the voice count."""
    from fed_nessa.data.corpus.build import is_done, work_file

    done = [v for v in table if is_done(work_file(cache, v.voice_id))]
    per_voice = {}
    for v in done:
        with np.load(work_file(cache, v.voice_id)) as z:
            per_voice[v.voice_id] = {k: z[k] for k in z.files}
    if not done:
        raise ValueError(f"{cache}: no finished voice to assemble")
    write_corpus(out, done, per_voice)
    return len(done)


def seed_work(cache: Path, corpus: Path) -> int:
    """Write a work file for every voice of an assembled corpus that has none: a build on another
    machine (or after the cache was lost) then resumes after the committed voices. Returns how many."""
    from fed_nessa.data.corpus.build import atomic_savez, work_file

    npz = corpus / EMBEDDINGS
    if not npz.is_file():
        return 0
    arrays = _arrays(npz)
    check_arrays(npz, arrays)
    written = 0
    for v in np.unique(arrays["voice"]).tolist():
        path = work_file(cache, int(v))
        if path.is_file():
            continue
        rows = arrays["voice"] == v
        atomic_savez(path, {k: a[rows] for k, a in arrays.items() if k not in ("voice", "utterance")})
        written += 1
    return written
