"""Centralised reference: NESSA on real dev data, DP calibration, the train/evaluate commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fed_nessa.cli import main
from fed_nessa.data.datasets import load_real, split_by_voice
from fed_nessa.data.sources import pooled_shards
from fed_nessa.evaluation.centralised import CentralisedConfig, plan_dp, scenario_report
from fed_nessa.model.aligners import NessaConfig, load_aligner
from fed_nessa.model.training import TrainConfig
from fed_nessa.privacy.accounting import compute_epsilon


@pytest.fixture(scope="module")
def real_split() -> tuple:
    return split_by_voice(load_real("real-dev"), n_test_voices=15, seed=0)


@pytest.mark.slow
def test_nessa_beats_naive_cosine_on_real_voices_by_a_wide_margin(real_split: tuple) -> None:
    train, test = real_split
    cfg = CentralisedConfig(methods=("nessa",), nessa=NessaConfig(hidden=256, depth=1, ridge_alpha=0.1),
                            train=TrainConfig(epochs=8, batch_size=64, lr=3e-4, patience=3))
    rep = scenario_report(train, test, "vfl_dvec", "resemblyzer", "runtime-upgrade", cfg)
    naive, nessa = rep.row("asym_naive").metrics.eer, rep.row("asym_nessa").metrics.eer
    assert naive > 0.40  # plain cosine across two real models is near chance
    assert nessa < naive - 0.15, (nessa, naive)


def test_plan_dp_meets_the_target_epsilon() -> None:
    plan = plan_dp(3.0, 1e-5, n=5000, train=TrainConfig(epochs=5, batch_size=100), clip_norm=1.0)
    eps = compute_epsilon(list(plan.events), 1e-5)
    assert 2.9 < eps <= 3.0 + 1e-6 and plan.sample_rate == 1 / 50 and plan.steps == 250
    with pytest.raises(ValueError, match="not reachable"):
        plan_dp(1e-4, 1e-5, n=10, train=TrainConfig(epochs=50, batch_size=10), clip_norm=1.0)


def test_train_command_writes_a_loadable_aligner(tmp_path: Path) -> None:
    out = tmp_path / "al"
    assert main(["train", "--data", "real-dev", "--enroll-model", "campp", "--runtime-model", "resemblyzer",
                 "--method", "nessa", "--epochs", "2", "--hidden", "32", "--depth", "1", "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["method"] == "nessa" and card["d_x"] == 192 and card["d_y"] == 256
    assert (out / "aligner.onnx").is_file()
    y = load_real("real-dev").emb("resemblyzer")[:5]
    assert load_aligner(out).map_runtime(y).shape == (5, 192)


def test_train_command_dp_and_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "dp"
    assert main(["train", "--data", "real-dev", "--enroll-model", "campp", "--runtime-model", "resemblyzer",
                 "--method", "ridge", "--epsilon", "8", "--out", str(out)]) == 0
    dp = json.loads((out / "card.json").read_text())["training"]["dp"]
    assert dp["epsilon"] == 8 and dp["epsilon_rdp"] <= 8 + 1e-6
    assert main(["train", "--data", "real-dev", "--enroll-model", "campp", "--runtime-model", "nope",
                 "--out", str(out)]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
    assert main(["train", "--data", "real-dev", "--enroll-model", "campp", "--runtime-model", "resemblyzer",
                 "--method", "procrustes", "--epsilon", "1", "--out", str(out)]) == 2
    assert main(["train", "--data", str(tmp_path / "missing"), "--enroll-model", "a", "--runtime-model", "b",
                 "--out", str(out)]) == 2
    assert "missing: not a data name" in capsys.readouterr().err


def test_evaluate_command_tables(tmp_path: Path) -> None:
    assert main(["evaluate", "--data", "real-dev", "--old-model", "resemblyzer", "--new-model", "campp",
                 "--methods", "ridge,speaker-logit", "--folds", "5", "--max-folds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "evaluation.json").read_text())
    for scenario in ("runtime-upgrade", "enrollment-upgrade"):
        rows = result["scenarios"][scenario]["mean"]
        assert set(rows) == {"sym_before", "sym_after", "asym_ridge", "asym_speaker-logit"}
        assert rows["sym_after"]["eer"]["mean"] < rows["sym_before"]["eer"]["mean"]
    assert "| asym_ridge |" in (tmp_path / "evaluation.md").read_text()


def test_pooled_shards(tmp_path: Path) -> None:
    from fed_nessa.data.shards import make_shard, write_shard

    rng = np.random.default_rng(0)
    for i in range(3):
        write_shard(tmp_path / f"d{i}.shard.safetensors",
                    make_shard(rng.standard_normal((6, 4)), rng.standard_normal((6, 3)), [0, 0, 0, 1, 1, 1], "X", "Y"))
    es = pooled_shards(tmp_path)
    assert es.n == 18 and np.unique(es.speaker).size == 6 and sorted(es.embeddings) == ["X", "Y"]
