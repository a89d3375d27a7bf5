"""Layer type -> its ghost rule. A new layer type is one module and one line here.

Lookup walks the module's class hierarchy, so a subclass of a registered type (e.g. PyTorch's
``NonDynamicallyQuantizableLinear``) uses its parent's rule, as ``isinstance`` would.
"""

from __future__ import annotations

from torch import nn

from fed_nessa.sim.ghost.base import GhostLayer
from fed_nessa.sim.ghost.layer_norm import LayerNormGhost
from fed_nessa.sim.ghost.linear import LinearGhost

GHOST_LAYERS: dict[type[nn.Module], GhostLayer] = {
    nn.Linear: LinearGhost(),
    nn.LayerNorm: LayerNormGhost(),
}


def ghost_rule(module: nn.Module) -> GhostLayer:
    """The rule for ``module``'s type; a trainable layer of an unregistered type is one clear error."""
    for cls in type(module).__mro__:
        rule = GHOST_LAYERS.get(cls)
        if rule is not None:
            return rule
    known = ", ".join(t.__name__ for t in GHOST_LAYERS)
    raise TypeError(f"ghost clipping has no rule for {type(module).__name__} (registered: {known}); "
                    "add one in fed_nessa/sim/ghost/registry.py")
