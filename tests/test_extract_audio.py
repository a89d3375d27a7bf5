"""Audio input: formats, mono mix, resampling to 16 kHz, and clear errors for unusable files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fed_nessa.data.extract.audio import (
    MIN_DURATION_S,
    TARGET_SR,
    AudioError,
    check_waveform,
    load_audio,
    resample,
    rms_dbfs,
)


def _require(module: str) -> None:
    """Skip without the extra locally; in CI (which installs it) a missing extra is a failure."""
    try:
        __import__(module)
    except ImportError:
        reason = f"'{module}' not installed (the 'extract' extra: .ci/install-extract.sh)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the extraction tests: {reason}")
        pytest.skip(reason)


def _tone(sr: int, seconds: float, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wav: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wav * np.hanning(wav.size)))
    return float(np.fft.rfftfreq(wav.size, 1 / sr)[spec.argmax()])


@pytest.fixture()
def sf():
    _require("soundfile")
    import soundfile

    return soundfile


@pytest.mark.parametrize("sr,fmt,subtype", [(16000, "WAV", "PCM_16"), (44100, "FLAC", "PCM_16"),
                                            (22050, "WAV", "FLOAT"), (8000, "WAV", "PCM_16")])
def test_reads_and_resamples_to_16k(tmp_path: Path, sf, sr: int, fmt: str, subtype: str) -> None:
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, _tone(sr, 1.0), sr, format=fmt, subtype=subtype)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size - TARGET_SR) <= 2
    assert _peak_hz(wav, TARGET_SR) == pytest.approx(440.0, abs=2.0)
    assert np.sqrt(np.mean(wav**2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.02)


def test_stereo_is_mixed_to_mono(tmp_path: Path, sf) -> None:
    left, right = _tone(16000, 1.0, 440.0), _tone(16000, 1.0, 440.0, amp=0.1)
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav"), (left + right) / 2, atol=1e-6)


def test_too_short(tmp_path: Path, sf) -> None:
    sf.write(tmp_path / "short.wav", _tone(16000, 0.3), 16000)
    with pytest.raises(AudioError, match=r"short\.wav: too short: 0\.300 s \(minimum 0\.5 s\)"):
        load_audio(tmp_path / "short.wav")
    sf.write(tmp_path / "ok.wav", _tone(16000, MIN_DURATION_S), 16000)
    assert load_audio(tmp_path / "ok.wav").size == 8000


@pytest.mark.parametrize("amp,match", [(0.0, "digital silence"), (1e-4, r"RMS -83\.0 dBFS")])
def test_silent(tmp_path: Path, sf, amp: float, match: str) -> None:
    sf.write(tmp_path / "quiet.wav", _tone(16000, 1.0, amp=amp) + 0.01, 16000, subtype="FLOAT")  # + DC offset
    with pytest.raises(AudioError, match=rf"quiet\.wav: silent: {match}"):
        load_audio(tmp_path / "quiet.wav")


def test_quiet_speech_level_is_accepted(tmp_path: Path, sf) -> None:
    sf.write(tmp_path / "q.wav", _tone(16000, 1.0, amp=0.003), 16000)  # about -53 dBFS
    assert rms_dbfs(load_audio(tmp_path / "q.wav")) == pytest.approx(-53.5, abs=0.5)


@pytest.mark.parametrize("content", [b"", b"RIFF not really a wave file", bytes(range(256)) * 40])
def test_unreadable(tmp_path: Path, sf, content: bytes) -> None:
    (tmp_path / "bad.wav").write_bytes(content)
    with pytest.raises(AudioError, match=r"bad\.wav: unreadable audio"):
        load_audio(tmp_path / "bad.wav")


def test_non_finite_samples(tmp_path: Path, sf) -> None:
    wav = _tone(16000, 1.0)
    wav[100] = np.nan
    sf.write(tmp_path / "nan.wav", wav, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(tmp_path / "nan.wav")


def test_missing_and_unsupported_files(tmp_path: Path, sf) -> None:
    with pytest.raises(AudioError, match="file not found"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "x.mp3").write_bytes(b"ID3")
    with pytest.raises(AudioError, match=r"unsupported file type '\.mp3'"):
        load_audio(tmp_path / "x.mp3")


def test_check_waveform_rejects_multichannel() -> None:
    with pytest.raises(AudioError, match="mono"):
        check_waveform(np.zeros((2, 16000), np.float32), 16000)


def test_resample_falls_back_to_scipy_without_soxr(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _tone(22050, 1.0)
    with_soxr = resample(x, 22050) if _has("soxr") else None
    monkeypatch.setitem(sys.modules, "soxr", None)  # makes `import soxr` raise ImportError
    y = resample(x, 22050)
    assert y.dtype == np.float32 and y.size == 16000
    assert _peak_hz(y, 16000) == pytest.approx(440.0, abs=2.0)
    if with_soxr is not None:  # both are band-limited resamplers: they agree away from the edges
        np.testing.assert_allclose(y[500:-500], with_soxr[500:-500], atol=2e-3)


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_audio_error_names_file_and_fault() -> None:
    err = AudioError("dir/f.wav", "too short")
    assert str(err) == "dir/f.wav: too short" and err.path == "dir/f.wav" and isinstance(err, ValueError)
