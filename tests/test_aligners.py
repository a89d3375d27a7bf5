"""Aligners: fit/map contracts, known solutions, save/load round trips, determinism, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fed_nessa.model.aligners import (
    AlignerInfo,
    NaiveAligner,
    NessaAligner,
    NessaConfig,
    NessaSharedAligner,
    ProcrustesAligner,
    RidgeAligner,
    RidgeStats,
    SpeakerLogitAligner,
    load_aligner,
    make_aligner,
    ridge_from_stats,
)
from fed_nessa.model.aligners.base import l2_normalize
from fed_nessa.model.training import TrainConfig


def _pairs(n: int = 300, dx: int = 8, dy: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spk = np.repeat(np.arange(n // 10), 10)
    z = rng.standard_normal((n // 10, dy))[spk] + 0.3 * rng.standard_normal((n, dy))
    y = l2_normalize(z)
    x = l2_normalize(np.tanh(y @ rng.standard_normal((dy, dx))) + 0.05 * rng.standard_normal((n, dx)))
    return x, y, spk


def test_ridge_matches_lstsq_and_stats_add_up() -> None:
    x, y, _ = _pairs()
    W, b = ridge_from_stats(RidgeStats.from_pairs(x, y), alpha=1e-9)
    A = np.hstack([y, np.ones((len(y), 1))])
    sol = np.linalg.lstsq(A, x, rcond=None)[0]
    np.testing.assert_allclose(W.T, sol[:-1], atol=1e-3)
    np.testing.assert_allclose(b, sol[-1], atol=1e-3)
    half = RidgeStats.from_pairs(x[:100], y[:100]) + RidgeStats.from_pairs(x[100:], y[100:])
    W2, b2 = ridge_from_stats(half, alpha=1e-2)
    W3, b3 = ridge_from_stats(RidgeStats.from_pairs(x, y), alpha=1e-2)
    np.testing.assert_allclose(W2, W3, atol=1e-5)
    np.testing.assert_allclose(b2, b3, atol=1e-5)


def test_procrustes_recovers_rotation() -> None:
    rng = np.random.default_rng(1)
    y = l2_normalize(rng.standard_normal((200, 5)))
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    x = y @ q.T
    a = ProcrustesAligner(AlignerInfo(5, 5)).fit(x, y)
    np.testing.assert_allclose(a.map_runtime(y), x, atol=1e-5)
    with pytest.raises(ValueError, match="equal dims"):
        ProcrustesAligner(AlignerInfo(5, 4))


def test_naive_is_identity_and_needs_equal_dims() -> None:
    y = l2_normalize(np.random.default_rng(0).standard_normal((3, 4)))
    np.testing.assert_allclose(NaiveAligner(AlignerInfo(4, 4)).map_runtime(y), y, atol=1e-6)
    with pytest.raises(ValueError, match="equal dims"):
        NaiveAligner(AlignerInfo(4, 3))


def test_speaker_logit_space() -> None:
    x, y, spk = _pairs()
    a = SpeakerLogitAligner(AlignerInfo(8, 6)).fit(x, y, spk)
    assert a.map_enroll(x).shape == a.map_runtime(y).shape == (300, 30)
    with pytest.raises(ValueError, match="speaker labels"):
        SpeakerLogitAligner(AlignerInfo(8, 6)).fit(x, y)


def test_nessa_starts_at_ridge_and_improves_on_nonlinear_map() -> None:
    x, y, _ = _pairs(n=600)
    ridge = RidgeAligner(AlignerInfo(8, 6), alpha=1e-2).fit(x, y)
    untrained = NessaAligner(AlignerInfo(8, 6), NessaConfig(hidden=32, depth=1))
    untrained.init_linear(x, y)
    np.testing.assert_allclose(untrained.map_runtime(y), ridge.map_runtime(y), atol=1e-5)
    nessa = NessaAligner(AlignerInfo(8, 6), NessaConfig(hidden=64, depth=2)).fit(
        x, y, train_cfg=TrainConfig(epochs=40, batch_size=64, lr=3e-3))
    cos = lambda a: float((a.map_runtime(y) * x).sum(1).mean())  # noqa: E731
    assert cos(nessa) > cos(ridge) + 0.01


def test_nessa_deterministic() -> None:
    x, y, _ = _pairs()
    cfg = TrainConfig(epochs=3, batch_size=32, seed=7)
    a = NessaAligner(AlignerInfo(8, 6), NessaConfig(hidden=16, depth=1)).fit(x, y, train_cfg=cfg)
    b = NessaAligner(AlignerInfo(8, 6), NessaConfig(hidden=16, depth=1)).fit(x, y, train_cfg=cfg)
    np.testing.assert_array_equal(a.map_runtime(y), b.map_runtime(y))


def test_no_batchnorm_anywhere() -> None:
    net = NessaSharedAligner(AlignerInfo(8, 6)).net
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


@pytest.mark.parametrize("method", ["ridge", "procrustes", "speaker-logit", "nessa", "nessa-shared", "naive"])
def test_save_load_round_trip(tmp_path: Path, method: str) -> None:
    x, y, spk = _pairs(dx=6, dy=6)
    info = AlignerInfo(6, 6, enroll_model="X:abc", runtime_model="Y:def")
    kwargs = {"cfg": NessaConfig(hidden=16, depth=1)} if method.startswith("nessa") else {}
    a = make_aligner(method, info, **kwargs)
    fit_kw = {"train_cfg": TrainConfig(epochs=2)} if method.startswith("nessa") else {}
    a.fit(x, y, spk, **fit_kw)
    a.save(tmp_path / method)
    b = load_aligner(tmp_path / method)
    assert type(b) is type(a) and b.info.enroll_model == "X:abc" and b.info.runtime_model == "Y:def"
    np.testing.assert_array_equal(a.map_runtime(y), b.map_runtime(y))
    np.testing.assert_array_equal(a.map_enroll(x), b.map_enroll(x))


def test_bad_inputs(tmp_path: Path) -> None:
    a = RidgeAligner(AlignerInfo(8, 6)).fit(*_pairs()[:2])
    with pytest.raises(ValueError, match=r"expected an \(n, 6\) array"):
        a.map_runtime(np.zeros((2, 5), np.float32))
    bad = np.ones((3, 6), np.float32)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="1 non-finite row"):
        a.map_runtime(bad)
    with pytest.raises(FileNotFoundError, match="aligner file not found"):
        load_aligner(tmp_path)
    a.save(tmp_path / "r")
    (tmp_path / "r" / "card.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt aligner card"):
        load_aligner(tmp_path / "r")
    with pytest.raises(ValueError, match="unknown method"):
        make_aligner("magic", AlignerInfo(2, 2))
