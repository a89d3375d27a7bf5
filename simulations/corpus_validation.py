"""Validation of the Kokoro corpus (data/kokoro-voices/README.md, "Distinctness"): are the voices distinct?

    python -m simulations.corpus_validation distinct [--voices 20] [--seed 0]   # finished voices (cache)
    python -m simulations.corpus_validation speed [--blends 6] [--utterances 8]  # does speed add identities?

``distinct``: on a random subset of the finished voices, per model, within- and
between-voice cosine, all-trials EER and the 2-voice EER of every voice against
its nearest neighbour; the same for data/real-voices-dev (reference).
``speed``: synthesises held-back blends (ids from the end of the voice table,
which no build reaches soon) at speeds 0.85 and 1.15 through the same
degradation and models, and reports the EER of telling the two speeds of one
blend apart (0.5: one identity) next to the nearest-neighbour EER of distinct
voices. Both print a markdown table. Needs the corpus's runtime for ``speed``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from fed_nessa.data.corpus import build
from fed_nessa.data.corpus.degrade import degrade
from fed_nessa.data.corpus.fetch import cache_dir, ensure_runtime, fetch, load_packs
from fed_nessa.data.corpus.voices import voice_table
from fed_nessa.data.datasets import load_real
from fed_nessa.data.extract import MODEL_NAMES, get_backend
from fed_nessa.evaluation.corpus_distinctness import distinctness, two_group_eer

SPEEDS = (0.85, 1.15)


def _finished() -> tuple[dict[str, np.ndarray], np.ndarray]:
    cache = cache_dir()
    emb: dict[str, list[np.ndarray]] = {m: [] for m in MODEL_NAMES}
    voice: list[np.ndarray] = []
    for path in sorted((cache / build.WORK).glob("voice-*.npz")):
        if not build.is_done(path):
            continue
        with np.load(path) as z:
            for m in MODEL_NAMES:
                emb[m].append(z[m].astype(np.float32))
            voice.append(np.full(z["sentence"].size, int(path.stem.split("-")[1])))
    return {m: np.concatenate(v) for m, v in emb.items()}, np.concatenate(voice)


def distinct(n: int, seed: int) -> None:
    emb, voice = _finished()
    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(np.unique(voice), size=min(n, np.unique(voice).size), replace=False))
    real = load_real("real-dev")
    real_subset = np.sort(rng.choice(real.voices, size=min(n, real.num_voices), replace=False))
    print("| set | model | voices | within cos | between cos | EER all % | NN 2-voice EER % median (max) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, get, vox, sub in (("kokoro-voices", emb.__getitem__, voice, subset),
                                ("real-voices-dev", real.emb, real.voice, real_subset)):
        for m in MODEL_NAMES:
            d = distinctness(get(m), vox, sub)
            print(f"| {name} | {m} | {d.voices} | {d.within:.3f} | {d.between:.3f} | {100 * d.eer_all:.1f} | "
                  f"{100 * d.nn_eer_median:.1f} ({100 * d.nn_eer_max:.1f}) |")


def speed(blends: int, utterances: int) -> None:
    cache = cache_dir()
    assets = fetch(cache)
    ensure_runtime(cache)
    packs = load_packs(assets.voices)
    table = voice_table(packs)
    synth = build.Synthesiser(assets.model, assets.voices)
    backends = {m: get_backend(m).load() for m in MODEL_NAMES}
    with np.load(cache / build.WORK / "babble-train.npz") as z:
        babble = [z[k] for k in sorted(z.files)]
    rows: dict[str, list[float]] = {m: [] for m in MODEL_NAMES}
    for voice in [v for v in table if v.split == "train"][-blends:]:
        emb: dict[str, list[np.ndarray]] = {m: [] for m in MODEL_NAMES}
        for s_i, s in enumerate(SPEEDS):
            for u, sentence in enumerate(build.voice_sentences(voice.voice_id, utterances)):
                clean = synth.speak(build.HARVARD[sentence], voice.style(packs), s)
                wav, _ = degrade(clean, np.random.default_rng((build.DEGRADE_SEED, voice.voice_id, u, s_i)), babble)
                for m in MODEL_NAMES:
                    emb[m].append(backends[m].embed(wav))
        group = np.repeat([0, 1], utterances)
        for m in MODEL_NAMES:
            rows[m].append(two_group_eer(np.stack(emb[m]), group))
        print(f"voice {voice.voice_id}: " + ", ".join(f"{m} {100 * rows[m][-1]:.1f} %" for m in MODEL_NAMES),
              file=sys.stderr, flush=True)
    print(f"| model | blends | EER % telling speed {SPEEDS[0]} from {SPEEDS[1]} apart, median (min) |")
    print("|---|---:|---|")
    for m in MODEL_NAMES:
        print(f"| {m} | {blends} | {100 * np.median(rows[m]):.1f} ({100 * np.min(rows[m]):.1f}) |")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("distinct", "speed"))
    p.add_argument("--voices", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blends", type=int, default=6)
    p.add_argument("--utterances", type=int, default=8)
    args = p.parse_args(argv)
    if args.what == "distinct":
        distinct(args.voices, args.seed)
    else:
        speed(args.blends, args.utterances)
    return 0


if __name__ == "__main__":
    sys.exit(main())
