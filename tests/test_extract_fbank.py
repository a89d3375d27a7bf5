"""Kaldi fbank re-implementation: pinned against torchaudio's Kaldi-compliant fbank, plus invariants."""

from __future__ import annotations

import numpy as np
import pytest

from fed_nessa.data.extract.fbank import kaldi_fbank, mean_normalise, mel_banks, povey_window


def _signal() -> np.ndarray:
    """0.3 s of two tones plus seeded noise at 16 kHz (the golden values below are for this signal)."""
    t = np.arange(4800) / 16000.0
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 2500 * t) + 0.05 * noise).astype(np.float32)


# torchaudio 2.11 `torchaudio.compliance.kaldi.fbank(wav[None], num_mel_bins=80, sample_frequency=16000,
# dither=0.0)` on _signal(): frames 0, 13, 27 at bins 0, 10, 40, 79, and the per-bin means at 0, 5, 20, 60.
GOLDEN_FRAMES = {
    0: [-8.53164, -8.55016, -2.55969, 2.97333],
    13: [-10.00761, -3.42127, -1.46804, 1.12133],
    27: [-8.0259, -6.10614, -0.81849, 2.73222],
}
GOLDEN_BINS = [0, 10, 40, 79]
GOLDEN_MEANS = {0: -8.51536, 5: -6.87678, 20: -3.89194, 60: 1.22764}


def test_matches_torchaudio_kaldi_fbank() -> None:
    feats = kaldi_fbank(_signal())
    assert feats.shape == (28, 80) and feats.dtype == np.float32
    for frame, values in GOLDEN_FRAMES.items():
        np.testing.assert_allclose(feats[frame, GOLDEN_BINS], values, atol=2e-3)
    for b, mean in GOLDEN_MEANS.items():
        assert feats[:, b].mean() == pytest.approx(mean, abs=2e-3)


def test_frame_count_snips_edges() -> None:
    assert kaldi_fbank(np.ones(400, np.float32) * 0.1).shape[0] == 1
    assert kaldi_fbank(np.ones(559, np.float32) * 0.1).shape[0] == 1
    assert kaldi_fbank(np.ones(560, np.float32) * 0.1).shape[0] == 2
    assert kaldi_fbank(np.zeros(16000, np.float32)).shape == (98, 80)


def test_short_or_multichannel_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="shorter than one"):
        kaldi_fbank(np.zeros(399, np.float32))
    with pytest.raises(ValueError, match="1-D mono"):
        kaldi_fbank(np.zeros((2, 16000), np.float32))


def test_silence_is_floored_at_float32_eps() -> None:
    feats = kaldi_fbank(np.zeros(8000, np.float32))
    assert np.all(feats == np.float32(np.log(np.finfo(np.float32).eps)))


def test_scale_only_shifts_log_energies_and_mean_normalisation_removes_it() -> None:
    """A gain g adds 2*ln(g) to every log-mel value; CAM++'s mean normalisation cancels it."""
    x = _signal()
    a, b = kaldi_fbank(x), kaldi_fbank(4.0 * x)
    np.testing.assert_allclose(b - a, 2 * np.log(4.0), atol=1e-3)
    np.testing.assert_allclose(mean_normalise(a), mean_normalise(b), atol=1e-3)
    assert np.abs(mean_normalise(a).mean(axis=0)).max() < 1e-5


def test_mel_banks_are_kaldi_triangles() -> None:
    banks = mel_banks(80, 512, 16000.0)
    assert banks.shape == (80, 257)
    assert banks.min() >= 0 and banks.max() <= 1
    assert np.all(banks[:, -1] == 0)  # the Nyquist bin never contributes
    assert np.all(banks[:, 0] == 0)  # nor does DC (low_freq = 20 Hz)
    peaks = banks.argmax(axis=1)
    assert np.all(np.diff(peaks) >= 0) and peaks[-1] > peaks[0]
    with pytest.raises(ValueError):
        mel_banks(3, 512, 16000.0)
    with pytest.raises(ValueError):
        mel_banks(80, 512, 16000.0, low_freq=9000.0)


def test_povey_window() -> None:
    w = povey_window(400)
    assert w[0] == 0 and w[-1] == 0
    np.testing.assert_allclose(w, w[::-1])
    assert w.max() == pytest.approx(1.0, abs=1e-4)
