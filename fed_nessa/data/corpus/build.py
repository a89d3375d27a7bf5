"""Build the corpus voice by voice: synthesise, degrade, embed with the three real models, keep embeddings.

One file per voice (``work/voice-NNNNN.npz``, written atomically) holds that
voice's float16 embeddings and what was drawn for each utterance, so a run
stopped at any point resumes at the first voice without a file; audio is never
stored. Runs on one process with one thread (the machine is shared):
throughput is set by the number of concurrent runs over disjoint voice ranges
(``--first``/``--limit``), never by threads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fed_nessa.data.corpus import pins
from fed_nessa.data.corpus.degrade import SR, degrade
from fed_nessa.data.corpus.texts import HARVARD
from fed_nessa.data.corpus.voices import HELDOUT, TRAIN, VOICE_SEED, Voice
from fed_nessa.data.extract import MODEL_NAMES, get_backend
from fed_nessa.data.extract.audio import AudioError, check_waveform, resample
from fed_nessa.data.extract.backend import Backend

UTTERANCES_PER_VOICE = 16
DEGRADE_SEED = 20261125  # the real-voices data set's seed
BABBLE_PACKS = 8  # clean single-pack utterances per split, the babble noise's talkers
WORK = "work"
DEGRADATION_FIELDS = ("reverb", "noise_type", "snr_db", "telephone", "gain_db", "clipped_frac")


class Synthesiser:
    """Kokoro-82M int8 on one onnxruntime thread; returns 16 kHz mono float32 audio."""

    def __init__(self, model: Path, voices: Path) -> None:
        import onnxruntime as rt
        from kokoro_onnx import Kokoro

        opts = rt.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        session = rt.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.kokoro = Kokoro.from_session(session, str(voices))

    def speak(self, text: str, style: np.ndarray, speed: float) -> np.ndarray:
        audio, sr = self.kokoro.create(text, style[:, None, :].astype(np.float32), speed=speed, lang="en-us")
        return resample(np.asarray(audio, np.float32), int(sr), SR)


def voice_sentences(voice_id: int, n: int = UTTERANCES_PER_VOICE) -> list[int]:
    """The voice's sentence indices into HARVARD: ``n`` distinct ones, seeded by the voice id."""
    return np.random.default_rng((VOICE_SEED, voice_id)).choice(len(HARVARD), size=n, replace=False).tolist()


def work_file(cache: Path, voice_id: int) -> Path:
    return cache / WORK / f"voice-{voice_id:05d}.npz"


def is_done(path: Path) -> bool:
    """True when ``path`` is a complete voice file (a damaged or partial one is redone)."""
    try:
        with np.load(path) as npz:
            return all(k in npz.files for k in (*MODEL_NAMES, "sentence")) and npz["sentence"].size > 0
    except (OSError, ValueError, EOFError):
        return False


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def babble_pool(cache: Path, synth: Synthesiser, packs: dict[str, np.ndarray], names: Sequence[str],
                split: str) -> list[np.ndarray]:
    """Clean utterances of ``BABBLE_PACKS`` single packs of one split (cached): the babble talkers."""
    path = cache / WORK / f"babble-{split}.npz"
    if path.is_file():
        with np.load(path) as npz:
            return [npz[k] for k in sorted(npz.files)]
    rng = np.random.default_rng((DEGRADE_SEED, 0 if split == TRAIN else 1))
    chosen = sorted(rng.choice(list(names), size=min(BABBLE_PACKS, len(names)), replace=False).tolist())
    clips = {name: synth.speak(HARVARD[int(rng.integers(len(HARVARD)))], packs[name], 1.0) for name in chosen}
    atomic_savez(path, clips)
    return [clips[k] for k in sorted(clips)]


def embed_voice(voice: Voice, synth: Synthesiser, packs: dict[str, np.ndarray], backends: dict[str, Backend],
                babble: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Every utterance of one voice: synthesised, degraded, embedded by each model (float16)."""
    style = voice.style(packs)
    rows: dict[str, list] = {k: [] for k in (*MODEL_NAMES, "sentence", "duration_s", *DEGRADATION_FIELDS)}
    for u, sentence in enumerate(voice_sentences(voice.voice_id)):
        clean = synth.speak(HARVARD[sentence], style, voice.speed)
        wav, drawn = degrade(clean, np.random.default_rng((DEGRADE_SEED, voice.voice_id, u)), babble)
        try:
            check_waveform(wav, SR, f"voice {voice.voice_id} utterance {u}")
            vecs = {name: backends[name].embed(wav, f"voice {voice.voice_id} utterance {u}") for name in MODEL_NAMES}
        except AudioError:
            continue  # listed by its absence: 'sentence' records the utterances kept
        for name, vec in vecs.items():
            rows[name].append(vec.astype(np.float16))
        rows["sentence"].append(sentence)
        rows["duration_s"].append(round(clean.size / SR, 3))
        for key, value in asdict(drawn).items():
            rows[key].append(value)
    return {k: np.asarray(v) for k, v in rows.items()}


def build(cache: Path, assets_model: Path, assets_voices: Path, packs: dict[str, np.ndarray], table: list[Voice], *,
          first: int = 0, limit: int | None = None, stop_at: float | None = None,
          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict[str, float]:
    """Build voices ``first``.. in id order, skipping those done, until ``limit`` voices or ``stop_at`` (epoch s)."""
    todo = [v for v in table[first:] if not is_done(work_file(cache, v.voice_id))]
    stats = {"built": 0.0, "utterances": 0.0, "cpu_s": 0.0, "skipped_done": float(len(table[first:]) - len(todo))}
    todo = todo[:limit] if limit is not None else todo
    if not todo:
        return stats
    synth = Synthesiser(assets_model, assets_voices)
    backends = {name: get_backend(name).load() for name in MODEL_NAMES}
    heldout = sorted({p for v in table if v.split == HELDOUT for p in v.parents})
    train = sorted(set(packs) - set(heldout))
    pools = {TRAIN: babble_pool(cache, synth, packs, train, TRAIN),
             HELDOUT: babble_pool(cache, synth, packs, heldout, HELDOUT)}
    for voice in todo:
        if stop_at is not None and time.time() >= stop_at:
            log(f"stop time reached after {int(stats['built'])} voices")
            break
        cpu = time.process_time()
        arrays = embed_voice(voice, synth, packs, backends, pools[voice.split])
        atomic_savez(work_file(cache, voice.voice_id), arrays)
        spent = time.process_time() - cpu
        stats["built"] += 1
        stats["utterances"] += arrays["sentence"].size
        stats["cpu_s"] += spent
        log(f"voice {voice.voice_id}: {arrays['sentence'].size} utterances, {spent:.1f} CPU-s "
            f"({spent / max(1, arrays['sentence'].size):.2f} per utterance)")
    return stats


def write_table(cache: Path, table: list[Voice]) -> Path:
    """The voice table the build follows, beside the work files (JSON; the README's record of the draw)."""
    path = cache / WORK / "voices.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pins": {"model_sha256": pins.MODEL_SHA256}, "voices": [asdict(v) for v in table]}))
    return path
