"""Degrade clean synthetic speech like ``data/real-voices-dev`` (its README, "How it was made" step 3).

Kokoro audio is clean and deterministic (within-voice cosine 0.89 against 0.73
on the real voices), which would make every model look perfect. Each utterance
gets independent draws of: reverberation (p=0.3, synthetic RIR), additive noise
(p=0.8; white, pink or babble; SNR against the active-speech level), a
telephone channel (p=0.25; 300-3400 Hz band-pass, 8 kHz, 8-bit mu-law), noise
forced if none of the three was drawn, then a random gain around -26 dBFS and
hard clipping. The constants are the data set's ``degradation_settings.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SR = 16000
SETTINGS = {  # data/real-voices-dev/degradation_settings.json
    "p_reverb": 0.3, "p_noise": 0.8, "p_tel": 0.25, "snr_lo": 5.0, "snr_hi": 30.0, "rt60_lo": 0.2,
    "rt60_hi": 0.8, "drr_lo": 0.0, "drr_hi": 10.0, "gain_lo": -20.0, "gain_hi": 8.0, "babble_lo": 3,
    "babble_hi": 6, "level_dbfs": -26.0,
}
PREDELAY_MS = (3.0, 15.0)
NOISE_TYPES = ("white", "pink", "babble")
FRAME = 320  # 20 ms: frames within 40 dB of the loudest count as active speech
ACTIVE_RANGE_DB = 40.0


@dataclass(frozen=True)
class Degradation:
    """What was drawn for one utterance (empty/0 where not applied)."""

    reverb: bool
    noise_type: str
    snr_db: float
    telephone: bool
    gain_db: float
    clipped_frac: float


def active_power(wav: np.ndarray) -> float:
    """Mean power of the frames within 40 dB of the loudest one (the speech, not the pauses)."""
    n = max(1, wav.size // FRAME)
    frames = wav[: n * FRAME].reshape(n, -1).astype(np.float64) if wav.size >= FRAME else wav[None].astype(np.float64)
    power = np.mean(frames**2, axis=1)
    active = power[power >= power.max() * 10 ** (-ACTIVE_RANGE_DB / 10)]
    return float(np.mean(active)) + 1e-20


def reverberate(wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Direct path + exponentially decaying noise tail (RT60, direct-to-reverberant ratio, pre-delay drawn)."""
    from scipy.signal import fftconvolve

    s = SETTINGS
    rt60 = rng.uniform(s["rt60_lo"], s["rt60_hi"])
    drr = rng.uniform(s["drr_lo"], s["drr_hi"])
    delay = int(rng.uniform(*PREDELAY_MS) * SR / 1000)
    t = np.arange(1, int(rt60 * SR)) / SR
    tail = rng.standard_normal(t.size) * np.exp(-6.908 * t / rt60)  # -60 dB at rt60
    tail *= np.sqrt(10 ** (-drr / 10) / np.sum(tail**2))
    rir = np.concatenate([np.zeros(delay), [1.0], tail])
    return fftconvolve(wav, rir)[delay : delay + wav.size].astype(np.float32)


def noise(kind: str, n: int, rng: np.random.Generator, babble: Sequence[np.ndarray]) -> np.ndarray:
    """Unit-power noise of ``kind``; babble sums 3-6 clean utterances at equal levels, circularly shifted."""
    if kind == "white":
        out = rng.standard_normal(n)
    elif kind == "pink":
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.arange(spec.size, dtype=np.float64)
        f[0] = 1.0
        out = np.fft.irfft(spec / np.sqrt(f), n)
    else:
        k = int(rng.integers(int(SETTINGS["babble_lo"]), int(SETTINGS["babble_hi"]) + 1))
        out = np.zeros(n)
        for j in rng.choice(len(babble), size=min(k, len(babble)), replace=False):
            src = np.resize(babble[int(j)], n)
            out += np.roll(src, int(rng.integers(n))) / np.sqrt(active_power(src))
    return out / np.sqrt(np.mean(out**2) + 1e-20)


def telephone(wav: np.ndarray) -> np.ndarray:
    """300-3400 Hz 6th-order Butterworth band-pass, 8 kHz, 8-bit mu-law, back to 16 kHz."""
    from scipy.signal import butter, resample_poly, sosfilt

    sos = butter(3, [300, 3400], btype="bandpass", fs=SR, output="sos")
    x = np.clip(resample_poly(sosfilt(sos, wav), 1, 2), -1.0, 1.0)
    mu = 255.0
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    y = np.round((y + 1) / 2 * mu) / mu * 2 - 1
    x = np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu
    return resample_poly(x, 2, 1)[: wav.size].astype(np.float32)


def degrade(wav: np.ndarray, rng: np.random.Generator, babble: Sequence[np.ndarray]) -> tuple[np.ndarray, Degradation]:
    """One degraded copy of a clean 16 kHz utterance, and what was drawn. Order: reverb, noise, telephone, gain."""
    s = SETTINGS
    x = wav.astype(np.float64)
    do_reverb = rng.random() < s["p_reverb"]
    do_noise = rng.random() < s["p_noise"]
    do_tel = rng.random() < s["p_tel"]
    if not (do_reverb or do_noise or do_tel):
        do_noise = True
    if do_reverb:
        x = reverberate(x, rng).astype(np.float64)
    kind, snr = "", 0.0
    if do_noise:
        kind = NOISE_TYPES[int(rng.integers(3 if babble else 2))]
        snr = float(rng.uniform(s["snr_lo"], s["snr_hi"]))
        x = x + noise(kind, x.size, rng, babble) * np.sqrt(active_power(x) * 10 ** (-snr / 10))
    if do_tel:
        x = telephone(x).astype(np.float64)
    gain = float(rng.uniform(s["gain_lo"], s["gain_hi"]))
    x *= np.sqrt(10 ** ((s["level_dbfs"] + gain) / 10) / active_power(x))
    clipped = float(np.mean(np.abs(x) > 1.0))
    out = np.clip(x, -1.0, 1.0).astype(np.float32)
    return out, Degradation(do_reverb, kind, round(snr, 2), do_tel, round(gain, 2), clipped)
