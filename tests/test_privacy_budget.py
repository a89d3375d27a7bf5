"""The budget rule: decide on past + planned, never only on the past."""

from __future__ import annotations

import pytest
import torch

from fed_nessa.privacy.budget import check_budget
from fed_nessa.privacy.events import DPEvent

torch.set_num_threads(1)


def _ev(r: int) -> DPEvent:
    return DPEvent(round=r, mechanism="dp-sgd", steps=10, sample_rate=0.1, noise_multiplier=1.0,
                   clip_norm=1.0, delta=1e-5, mode="local")


def test_allows_up_to_and_declines_past_the_budget() -> None:
    # 10, 20, 30 steps at q=0.1, sigma=1: eps 3.44, 4.22, 4.85 (RDP).
    assert check_budget([], _ev(1), 3.45, 1e-5).allowed
    assert not check_budget([], _ev(1), 3.40, 1e-5).allowed
    d = check_budget([_ev(1), _ev(2)], _ev(3), 4.5, 1e-5)
    assert not d.allowed
    assert d.epsilon_now == pytest.approx(4.22, abs=0.01)
    assert d.epsilon_if_run == pytest.approx(4.85, abs=0.01)
    assert "round 3" in d.reason and "4.5" in d.reason


def test_the_accountant_is_selectable() -> None:
    # PRV is tighter than RDP: 2.86 vs 3.44 for one round.
    assert check_budget([], _ev(1), 3.0, 1e-5, accountant="prv").allowed
    assert not check_budget([], _ev(1), 3.0, 1e-5, accountant="rdp").allowed


@pytest.mark.parametrize("budget,delta", [(0.0, 1e-5), (float("inf"), 1e-5), (1.0, 0.0), (1.0, 1.5)])
def test_bad_budgets_are_errors(budget: float, delta: float) -> None:
    with pytest.raises(ValueError):
        check_budget([], _ev(1), budget, delta)
