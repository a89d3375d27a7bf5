"""Losses are per-example: term i depends on pair i only (the DP-SGD precondition)."""

from __future__ import annotations

import pytest
import torch

from fed_nessa.model.losses import LOSSES, cosine_loss, get_loss, mse_loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_per_example_independence(name: str) -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4)
    per_ex = get_loss(name)(pred, target)
    assert per_ex.shape == (5,)
    per_ex[2].backward()
    grad = pred.grad.abs().sum(dim=1)
    assert grad[2] > 0 and torch.all(grad[[0, 1, 3, 4]] == 0)


def test_values() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(cosine_loss(a, b), torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(mse_loss(a, b), torch.tensor([0.0, 2.0, 4.0]))


def test_unknown() -> None:
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        get_loss("hinge")
