"""Synthetic speech for tests and demos, made locally with Debian's ``flite`` and ``espeak-ng``.

No audio is shipped or downloaded: a voice is a (engine, voice) pair, an
utterance is a sentence rendered with per-utterance prosody jitter drawn from
a seeded generator, so the same seed always yields the same files (both
engines are deterministic). flite's four voices (kal, awb, rms, slt) are
built from recordings of four real people; espeak-ng's formant variants
(``en-us+m3``, ``en+f2``, ...) are fully synthetic but distinct "talkers".

Command line (a demo fleet of devices, one audio folder per device)::

    python -m fed_nessa.data.extract.tts OUT_DIR --devices 6 --heldout 5 --seed 0
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FLITE_VOICES = ("kal", "awb", "rms", "slt")
# Natural mean F0 (Hz) of the flite voices: pitch jitter scales around it (rms ignores F0 targets).
FLITE_F0 = {"kal": 95.0, "kal16": 95.0, "awb": 127.0, "slt": 170.0}
ESPEAK_VARIANTS = tuple(f"en-us+m{i}" for i in range(1, 8)) + tuple(f"en-us+f{i}" for i in range(1, 5)) + tuple(
    f"en+{v}" for v in ("klatt", "klatt2", "klatt3", "croak", "whisperf")
)
# Harvard sentences (IEEE 1969, public domain).
SENTENCES = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
)


@dataclass(frozen=True)
class Voice:
    """A synthetic talker: ``engine`` is 'flite' or 'espeak-ng'."""

    engine: str
    name: str


def require_engine(engine: str) -> str:
    """Path of the engine's binary, or a clear error saying how to install it."""
    if engine not in ("flite", "espeak-ng"):
        raise ValueError(f"unknown speech engine {engine!r} (flite or espeak-ng)")
    found = shutil.which(engine)
    if not found:
        raise FileNotFoundError(f"'{engine}' is not installed (Debian: apt-get install {engine})")
    return found


def synthesise(text: str, path: str | Path, voice: Voice, *, stretch: float = 1.0, pitch: float = 0.0) -> Path:
    """Render ``text`` with ``voice`` to a wav file.

    ``stretch`` > 1 speaks slower; ``pitch`` in [-1, 1] shifts the pitch
    (flite: the voice's natural mean F0 scaled by 1 + 0.15 * pitch; rms ignores
    F0 targets; espeak-ng: ``-p`` 50 + 20 * pitch around its default 50).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exe = require_engine(voice.engine)
    if voice.engine == "flite":
        cmd = [exe, "-voice", voice.name, "--setf", f"duration_stretch={stretch:.3f}"]
        if pitch and voice.name in FLITE_F0:
            cmd += ["--setf", f"int_f0_target_mean={FLITE_F0[voice.name] * (1.0 + 0.15 * pitch):.1f}"]
        cmd += ["-t", text, "-o", str(path)]
    else:
        rate = int(round(175 / stretch))
        cmd = [exe, "-v", voice.name, "-s", str(rate), "-p", str(int(round(50 + 20 * pitch))), "-w", str(path), text]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 or not path.is_file() or path.stat().st_size < 100:
        raise RuntimeError(f"{voice.engine} failed for voice {voice.name!r}: {proc.stderr.strip()[:200]}")
    return path


def make_speaker_folders(
    out_dir: str | Path, speakers: Mapping[str, Voice], utterances: int | Mapping[str, int], *, seed: int = 0,
    sentences: Sequence[str] = SENTENCES,
) -> list[Path]:
    """Write ``out_dir/<speaker>/uNN.wav`` for every speaker: the layout ``fed-nessa extract`` reads.

    Each utterance uses a different sentence (cycling through ``sentences``,
    offset per speaker) and its own slight tempo/pitch jitter.
    """
    rng = np.random.default_rng(seed)
    written: list[Path] = []
    for k, (speaker, voice) in enumerate(sorted(speakers.items())):
        count = utterances if isinstance(utterances, int) else utterances[speaker]
        for i in range(count):
            text = sentences[(3 * k + i) % len(sentences)]
            stretch, pitch = float(rng.uniform(0.9, 1.15)), float(rng.uniform(-0.5, 0.5))
            written.append(synthesise(text, Path(out_dir) / speaker / f"u{i:02d}.wav", voice, stretch=stretch,
                                      pitch=pitch))
    return written


def voice_pool() -> list[Voice]:
    """Every talker both engines offer here: flite's four, then the espeak-ng variants."""
    return [Voice("flite", v) for v in FLITE_VOICES] + [Voice("espeak-ng", v) for v in ESPEAK_VARIANTS]


def make_demo_fleet(out_dir: str | Path, devices: int, *, heldout: int = 0, seed: int = 0, max_speakers: int = 3,
                    utterances: tuple[int, int] = (5, 12), heldout_utterances: int = 16) -> list[Path]:
    """Audio for a demo federation: ``out_dir/devices/device_NNN/<speaker>/...`` (+ ``out_dir/heldout/...``).

    Each device gets 1..max_speakers talkers. With ``heldout`` > 0, that many
    talkers are reserved first and written to ``out_dir/heldout`` (for the
    evaluation set) and never appear on a device. Device talkers are drawn
    from the rest without replacement while it lasts, then reused (one person
    may use several devices). Returns the device folders.
    """
    rng = np.random.default_rng(seed)
    pool = voice_pool()
    if not 0 <= heldout <= len(pool) - 2:
        raise ValueError(f"heldout must be in [0, {len(pool) - 2}] (the pool has {len(pool)} talkers)")
    perm = [pool[i] for i in rng.permutation(len(pool))]
    reserved, available = perm[:heldout], perm[heldout:]
    out = Path(out_dir)
    if reserved:
        make_speaker_folders(out / "heldout", {_speaker_name(v): v for v in reserved}, heldout_utterances,
                             seed=seed * 1000 + 999)
    order: list[Voice] = []
    folders: list[Path] = []
    for d in range(devices):
        speakers: dict[str, Voice] = {}
        for _ in range(int(rng.integers(1, max_speakers + 1))):
            if not order:
                order = [available[i] for i in rng.permutation(len(available))]
            v = order.pop()
            speakers[_speaker_name(v)] = v
        counts = {s: int(rng.integers(utterances[0], utterances[1] + 1)) for s in speakers}
        folder = out / "devices" / f"device_{d:03d}"
        make_speaker_folders(folder, speakers, counts, seed=seed * 1000 + d)
        folders.append(folder)
    return folders


def _speaker_name(voice: Voice) -> str:
    return f"{voice.engine}-{voice.name}".replace("+", "_")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fed_nessa.data.extract.tts", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--heldout", type=int, default=0, help="talkers reserved for the evaluation set")
    parser.add_argument("--max-speakers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folders = make_demo_fleet(args.out_dir, args.devices, heldout=args.heldout, seed=args.seed,
                              max_speakers=args.max_speakers)
    print(f"wrote {len(folders)} device audio folders under {args.out_dir / 'devices'}"
          + (f" and {args.heldout} held-out talkers under {args.out_dir / 'heldout'}" if args.heldout else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
