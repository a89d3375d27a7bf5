"""Per-example clipped gradient sums without per-example gradient tensors ("ghost" norms).

:mod:`.clipping` holds the algorithms (per example, per device); the per-layer maths is
registered per layer type in :mod:`.registry` (:mod:`.linear`, :mod:`.layer_norm`), the shape
of Opacus' ``grad_sample/``.
"""

from fed_nessa.sim.ghost.clipping import CLIP_EPS, clipped_gradient_sums, device_clipped_sum, device_clipped_vectors
from fed_nessa.sim.ghost.registry import GHOST_LAYERS, ghost_rule

__all__ = ["CLIP_EPS", "GHOST_LAYERS", "clipped_gradient_sums", "device_clipped_sum", "device_clipped_vectors",
           "ghost_rule"]
