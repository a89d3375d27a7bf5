"""The EER validator injected into training for early stopping: the protocol's EER, train mode kept."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fed_nessa.evaluation.protocol import evaluate_trials
from fed_nessa.evaluation.validators import EERValidator

SPEAKERS, UTTERANCES, DIM = 6, 14, 16


def _voices(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((SPEAKERS, DIM))
    speaker = np.repeat(np.arange(SPEAKERS), UTTERANCES)
    utterance = np.tile(np.arange(UTTERANCES), SPEAKERS)
    emb = (centres[speaker] + 0.05 * rng.standard_normal((len(speaker), DIM))).astype(np.float32)
    return emb, speaker, utterance


class _Negate(nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return -y


class _SharedSpace(_Negate):
    """A shared-space model: it maps the profile side too (``map_x``)."""

    def map_x(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def test_the_score_is_the_protocols_eer_of_the_mapped_runtime_side() -> None:
    emb, speaker, utterance = _voices()
    noisy = emb + 0.5 * np.random.default_rng(1).standard_normal(emb.shape).astype(np.float32)
    score = EERValidator(emb, noisy, speaker, utterance)(nn.Identity())
    assert score == evaluate_trials(emb, noisy, speaker, utterance).eer
    assert EERValidator(emb, emb, speaker, utterance)(nn.Identity()) == 0.0


def test_a_shared_space_model_maps_the_profiles_too() -> None:
    emb, speaker, utterance = _voices()
    validator = EERValidator(emb, emb, speaker, utterance)
    assert validator(_SharedSpace()) == 0.0  # both sides negated: the same comparison as before
    assert validator(_Negate()) > 0.5  # only the runtime side negated: every genuine pair scores lowest


def test_the_model_is_scored_in_eval_mode_and_handed_back_in_train_mode() -> None:
    emb, speaker, utterance = _voices()
    modes: list[bool] = []

    class Probe(nn.Identity):
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            modes.append(self.training)
            return y

    model = Probe()
    EERValidator(emb, emb, speaker, utterance)(model)
    assert modes == [False] and model.training
