"""Ghost clipping's per-layer registry: lookup by layer type, clear refusal, and the per-device paths.

The per-example numerics against explicit per-example gradients are in tests/test_sim_fleet.py;
device-level sums against per-device vectors in tests/test_device_level.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fed_nessa.model.aligners.nessa import NessaConfig, NessaNet
from fed_nessa.sim.ghost import GHOST_LAYERS, clipped_gradient_sums, device_clipped_vectors, ghost_rule
from fed_nessa.sim.ghost.layer_norm import LayerNormGhost
from fed_nessa.sim.ghost.linear import LinearGhost

torch.set_num_threads(1)


def test_each_registered_type_finds_its_rule_and_subclasses_inherit_it() -> None:
    assert isinstance(ghost_rule(nn.Linear(2, 3)), LinearGhost)
    assert isinstance(ghost_rule(nn.LayerNorm(3)), LayerNormGhost)
    # PyTorch's attention output projection is a Linear subclass: the Linear rule applies.
    sub = nn.modules.linear.NonDynamicallyQuantizableLinear(2, 3)
    assert ghost_rule(sub) is GHOST_LAYERS[nn.Linear]


def test_a_trainable_layer_without_a_rule_is_one_clear_error() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Conv1d(1, 1, 1))
    with pytest.raises(TypeError, match=r"no rule for Conv1d \(registered: Linear, LayerNorm\)"):
        clipped_gradient_sums(net, torch.randn(2, 3), torch.randn(2, 4), 1.0)


def test_a_frozen_layer_of_any_type_needs_no_rule() -> None:
    prelu = nn.PReLU()  # has a parameter, no ghost rule
    prelu.requires_grad_(False)
    net = nn.Sequential(nn.Linear(4, 3), prelu)
    sums, norms = clipped_gradient_sums(net, torch.randn(2, 3), torch.randn(2, 4), 1.0)
    assert sums.shape == (15,) and norms.shape == (2,)
    prelu.requires_grad_(True)
    with pytest.raises(TypeError, match="no rule for PReLU"):
        clipped_gradient_sums(net, torch.randn(2, 3), torch.randn(2, 4), 1.0)


def test_device_norms_from_gram_matrices_equal_the_norms_of_the_per_device_vectors() -> None:
    """Each rule's ``device_sq_norms`` agrees with the norm of its own ``device_grads`` (unclipped)."""
    from fed_nessa.sim.ghost.clipping import _device_pass

    torch.manual_seed(0)
    net = NessaNet(6, 5, NessaConfig(hidden=4, depth=2, train_linear=True), seed=0)
    x, y = torch.randn(12, 5), torch.randn(12, 6)
    seg = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 0, 2, 1])
    rows = _device_pass(net, x, y, seg, 3, "cosine")
    vectors = device_clipped_vectors(net, x, y, seg, 3, 1.0, clip_enabled=False)
    sq = torch.zeros(3)
    for layer, d in zip(rows.layers, rows.deltas, strict=True):
        sq = sq + ghost_rule(layer.module).device_sq_norms(layer, rows.weights * d, rows.pos, rows.segments, 3,
                                                            rows.width)
    assert torch.allclose(sq, vectors.pow(2).sum(1), rtol=1e-5, atol=1e-7)
