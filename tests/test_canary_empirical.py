"""The empirical canary audit end to end on a small configuration (real Opacus DP-SGD)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fed_nessa.canary.empirical import EmpiricalConfig, canary_cosines, load_base_pairs, make_canaries
from fed_nessa.cli import main

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[1] / "data" / "real-voices-dev" / "embeddings.npz"


def test_canaries_are_seeded_unit_vectors_with_fair_inclusion() -> None:
    x, y, inc = make_canaries(2000, 256, 192, seed=3)
    assert x.shape == (2000, 256) and y.shape == (2000, 192)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert abs(inc.mean() - 0.5) < 0.04
    x2, _, inc2 = make_canaries(2000, 256, 192, seed=3)
    assert np.array_equal(x, x2) and np.array_equal(inc, inc2)


def test_scores_are_cosines() -> None:
    x, y, _ = make_canaries(5, 4, 4, seed=0)
    ident = torch.nn.Identity()
    assert np.allclose(canary_cosines(ident, y, y), 1.0, atol=1e-6)


def test_config_rejects_an_unsound_setup() -> None:
    with pytest.raises(ValueError, match="1/2"):
        EmpiricalConfig(inclusion=0.3)
    with pytest.raises(ValueError, match="positive control"):
        EmpiricalConfig(noise_multiplier=0.5, control_noise_multiplier=0.5)


def test_load_base_pairs_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_base_pairs(tmp_path / "nowhere.npz")
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="bad.npz"):
        load_base_pairs(tmp_path / "bad.npz")


@pytest.mark.slow
def test_dp_bound_below_claim_and_control_clearly_above(tmp_path: Path) -> None:
    out = tmp_path / "emp"
    rc = main(["audit-empirical", "--data", str(DATA), "--out", str(out), "--canaries", "300", "--epochs", "3",
               "--hidden", "64", "--limit", "600"])
    import json

    res = json.loads((out / "empirical.json").read_text())
    dp, control = res["runs"]
    assert dp["attack"]["epsilon_lower_bound"] <= dp["epsilon_claimed"]["pld"]
    assert control["attack"]["epsilon_lower_bound"] > dp["attack"]["epsilon_lower_bound"] + 0.5
    assert control["attack"]["auroc"] > 0.85
    assert rc == 0
    report = (out / "report.md").read_text()
    for text in ("Canary design", "inclusion probability 0.5", "AUROC", "TPR@1%FPR", "Bonferroni", "seed 0"):
        assert text in report
    assert (out / "canary-scores.png").stat().st_size > 1000
