"""Audio input for on-device extraction: read, mix to mono, resample to 16 kHz, reject bad audio.

All three speaker models expect 16 kHz mono float waveforms in [-1, 1]. A
device's recordings are whatever its microphone stack wrote, so every file is
checked here once, before any model sees it, and a bad one raises
:class:`AudioError` naming the file and the fault. The extraction run skips
and *lists* such files; it never drops one silently.
"""

from __future__ import annotations

import os
from math import gcd
from pathlib import Path

import numpy as np

from fed_nessa.errors import FedNessaError

TARGET_SR = 16000
MIN_DURATION_S = 0.5
# RMS of the DC-free signal below this is treated as silence: digital silence
# or a muted microphone. Real speech recorded quietly sits around -50..-20 dBFS.
SILENCE_DBFS = -60.0
AUDIO_SUFFIXES = (".wav", ".flac")


class AudioError(FedNessaError, ValueError):
    """An audio file that cannot be used (unreadable, too short, silent, ...)."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def is_audio_file(path: Path) -> bool:
    """True for the formats extraction reads (.wav, .flac; case-insensitive)."""
    return path.suffix.lower() in AUDIO_SUFFIXES


def resample(wav: np.ndarray, orig_sr: int, target_sr: int = TARGET_SR) -> np.ndarray:
    """Band-limited resampling; soxr (what the reference data used) if present, else scipy's polyphase."""
    if orig_sr == target_sr:
        return wav.astype(np.float32, copy=False)
    try:
        import soxr
    except ImportError:
        from scipy.signal import resample_poly

        g = gcd(int(orig_sr), int(target_sr))
        return resample_poly(wav, target_sr // g, orig_sr // g).astype(np.float32)
    return soxr.resample(wav.astype(np.float32, copy=False), orig_sr, target_sr).astype(np.float32)


def rms_dbfs(wav: np.ndarray) -> float:
    """RMS level of the DC-free signal in dB relative to full scale (-inf for digital silence)."""
    centred = wav.astype(np.float64) - float(np.mean(wav))
    rms = float(np.sqrt(np.mean(centred**2))) if wav.size else 0.0
    return 20.0 * np.log10(rms) if rms > 0 else float("-inf")


def check_waveform(wav: np.ndarray, sr: int, path: str | os.PathLike[str] = "<memory>") -> np.ndarray:
    """Raise :class:`AudioError` if ``wav`` is unusable for speaker embedding; return it otherwise."""
    if wav.ndim != 1:
        raise AudioError(path, f"expected a mono waveform, got shape {wav.shape}")
    if not np.isfinite(wav).all():
        raise AudioError(path, "audio contains NaN or infinite samples")
    duration = wav.size / float(sr)
    if duration < MIN_DURATION_S:
        raise AudioError(path, f"too short: {duration:.3f} s (minimum {MIN_DURATION_S} s)")
    level = rms_dbfs(wav)
    if level < SILENCE_DBFS:
        shown = "digital silence" if level == float("-inf") else f"RMS {level:.1f} dBFS"
        raise AudioError(path, f"silent: {shown} (threshold {SILENCE_DBFS:.0f} dBFS)")
    return wav


def load_audio(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a wav/flac file as a checked 16 kHz mono float32 waveform.

    Multi-channel files are averaged to mono (a phone's stereo pair carries the
    same talker). Raises :class:`AudioError` for a missing, unreadable,
    too-short or silent file, naming the file.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found")
    if not is_audio_file(path):
        raise AudioError(path, f"unsupported file type '{path.suffix}' (expected one of {', '.join(AUDIO_SUFFIXES)})")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile reports format faults through several exception types
        raise AudioError(path, f"unreadable audio ({type(exc).__name__}: {exc})") from None
    if data.shape[0] == 0:
        raise AudioError(path, "unreadable audio: no samples")
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wav).all():
        raise AudioError(path, "audio contains NaN or infinite samples")
    check_waveform(wav, sr, path)  # before resampling: duration and level are rate-independent
    return check_waveform(resample(wav, int(sr)), TARGET_SR, path)
