"""simulations/mean_free_reference.py: the loss about a zero centre is the plain fit; the script prints both rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fed_nessa.model.aligners import AlignerInfo, NessaAligner, NessaConfig
from fed_nessa.model.training import TrainConfig
from simulations import mean_free_reference as ref


def _pairs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(80, 5))
    return y @ rng.normal(size=(5, 6)) + 0.3 * rng.normal(size=(80, 6)) + 1.0, y


def test_about_a_zero_centre_it_is_the_plain_fit_and_about_the_mean_it_is_not() -> None:
    x, y = _pairs()
    info, arch = AlignerInfo(d_x=6, d_y=5), NessaConfig(hidden=8)
    train = TrainConfig(epochs=2, batch_size=16, seed=3)
    plain = NessaAligner(info, arch).fit(x, y, train_cfg=train)
    zero, _ = ref.mean_free_nessa(info, arch, x, y, train, centre=np.zeros(6))
    for a, b in zip(plain.net.state_dict().values(), zero.net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    about, centre = ref.mean_free_nessa(info, arch, x, y, train)
    np.testing.assert_allclose(centre, (x / np.linalg.norm(x, axis=1, keepdims=True)).mean(0), atol=1e-6)
    assert not np.allclose(about.map_runtime(y), plain.map_runtime(y), atol=1e-4)


@pytest.mark.slow
def test_the_script_prints_both_references(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fed_nessa.evaluation.centralised.REFERENCE_STEPS", 20)
    monkeypatch.chdir(tmp_path)
    assert ref.main(["--devices", "60", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "60 devices, population seed 1" in out
    assert "plain cosine loss: EER" in out and "loss about the mean: EER" in out and "not updating: EER" in out
