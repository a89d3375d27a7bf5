"""Checkpoints: atomic per-round files that load weights-only, and a resume that refuses a changed config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fed_nessa.config import DPMode, FederationConfig, Phase
from fed_nessa.federated.server_model import ServerModel
from server.checkpoint import (
    RESUMABLE_KEYS,
    Checkpoint,
    ResumeError,
    check_resumable,
    latest_checkpoint,
    save_checkpoint,
)


def _ckpt(config: dict, round_num: int = 2) -> Checkpoint:
    return Checkpoint(round_num, {}, [], config)


def test_the_server_models_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    """The model's state (with its completed phases) must load again: a checkpoint that does
    not load makes a resumed run silently start over at round 1."""
    cfg = FederationConfig().replace(hidden=8, dp_mode=DPMode.NONE)
    model = ServerModel(cfg, 5, 4, "X", "Y")
    model.apply(Phase.SUFFSTATS, _stats_vector(), 2)
    history = [{"round": 1, "phase": str(Phase.SUFFSTATS), "status": "applied", "eer": 0.1}]
    save_checkpoint(tmp_path, Checkpoint(1, model.state_dict(), history, cfg.to_run_config()))
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.round == 1 and ckpt.history == history
    restored = ServerModel(cfg, 5, 4, "X", "Y")
    restored.load_state_dict(ckpt.model_state)
    assert restored.completed == [Phase.SUFFSTATS]
    np.testing.assert_array_equal(restored.vector(), model.vector())


def _stats_vector() -> np.ndarray:
    from fed_nessa.federated import suffstats

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5)), rng.normal(size=(20, 4))
    return suffstats.device_vector(x / np.linalg.norm(x, axis=1, keepdims=True),
                                   y / np.linalg.norm(y, axis=1, keepdims=True))


def test_a_torn_newest_checkpoint_falls_back_to_the_previous_round(tmp_path: Path) -> None:
    cfg = FederationConfig().to_run_config()
    save_checkpoint(tmp_path, Checkpoint(1, {}, [{"round": 1}], cfg))
    path = save_checkpoint(tmp_path, Checkpoint(2, {}, [{"round": 1}, {"round": 2}], cfg))
    path.write_bytes(path.read_bytes()[:20])
    assert latest_checkpoint(tmp_path).round == 1
    assert latest_checkpoint(tmp_path / "nothing") is None


@pytest.mark.parametrize(("key", "value"), [
    ("epsilon-budget", 100.0), ("dp-mode", "local"), ("noise-multiplier", 0.1), ("seed", 7), ("hidden", 128),
    ("delta", 1e-3), ("suffstats-noise-multiplier", 0.1), ("min-arrivals", 2), ("reproducible-noise", True),
])
def test_resume_refuses_a_changed_config_and_names_the_key(key: str, value: object) -> None:
    """Defect 5: c5b415a resumed whatever the new run-config said (a raised budget, less noise,
    another seed); now every key outside RESUMABLE_KEYS must equal the checkpoint's."""
    saved = FederationConfig().to_run_config()
    with pytest.raises(ResumeError) as err:
        check_resumable(_ckpt(saved), {**saved, key: value})
    assert f"{key}: checkpoint {saved[key]!r}, now {value!r}" in str(err.value)
    assert "refusing to resume from round 2" in str(err.value)


def test_resume_names_every_changed_key_at_once() -> None:
    saved = FederationConfig().to_run_config()
    changed = {**saved, "epsilon-budget": 100.0, "dp-mode": "none", "noise-multiplier": 0.1, "seed": 3, "hidden": 2}
    with pytest.raises(ResumeError) as err:
        check_resumable(_ckpt(saved), changed)
    assert "in dp-mode, epsilon-budget, hidden, noise-multiplier, seed (" in str(err.value)


def test_resume_may_run_longer_elsewhere_and_wait_longer() -> None:
    saved = FederationConfig().to_run_config()
    assert RESUMABLE_KEYS == {"num-server-rounds", "resume", "run-dir", "round-timeout"}
    check_resumable(_ckpt(saved), {**saved, "num-server-rounds": 10, "resume": True, "run-dir": "elsewhere",
                                   "round-timeout": 60.0})
    with pytest.raises(ResumeError, match="clients-per-round"):
        check_resumable(_ckpt(saved), {k: v for k, v in saved.items() if k != "clients-per-round"})
