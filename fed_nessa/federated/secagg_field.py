"""Handing SecAgg+ integers already in its field, so Flower's quantizer decides nothing.

Flower's client (``secaggplus_mod``) multiplies a vector by ``q_ratio / quantization_range``
(``q_ratio = round(num_examples / max_weight x quantization_range)``), maps it with
``quantize``: ``(clip(x, -c, c) + c) x quantization_range / (2c)`` rounded stochastically, masks
it and reduces it mod ``modulus_range``; the server unmasks, ``dequantize``s and divides by the
summed weight. With the settings of :func:`flower_settings` every one of those maps is exact
on our field elements ``u in [0, 2^bits)`` handed in as ``u - 2^(bits-1)``:

- ``max_weight = 1`` and every device reporting ``num_examples = 1``: the factor is 1.0;
- ``clipping_range = 2^(bits-1)``, ``quantization_range = 2^bits``: ``quantize(u - c) = u``, an
  integer, so ``_stochastic_round`` subtracts nothing (its uniform is compared with 0);
- ``modulus_range = 2^(bits + m)`` with ``2^m > max_devices``: a multiple of ``2^bits`` (so the sum
  mod it reduces to ours) that also holds the summed weight factor, and below 2^52 (so
  :func:`field_sum_from_flower` recovers the integer sum from Flower's float output exactly).

``_stochastic_round`` still calls ``np.random.rand``; its value cannot change our output, but the
mechanism promises no draw from numpy's global generator at all, so :func:`exact_secaggplus_mod`
is Flower's own ``secaggplus_mod`` with ``quantize`` bound to :func:`exact_quantize` (a copy of
its functions over a copy of its module's globals: Flower's masking code runs unchanged, nothing
of Flower is patched in place).
"""

from __future__ import annotations

import dataclasses
import sys
import types
from typing import Any

import numpy as np

from fed_nessa.federated.integer_mechanism import IntegerMechanismParams

#: Flower's float output must hold the masked-sum modulus exactly.
MAX_MODULUS_BITS = 52
#: The weight every device reports and the server's max_weight: the factor Flower applies is 1.
UNIT_WEIGHT = 1


@dataclasses.dataclass(frozen=True)
class FlowerFieldSettings:
    """SecAgg+ workflow arguments that make its quantisation the identity on our field."""

    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float = float(UNIT_WEIGHT)


def flower_settings(params: IntegerMechanismParams) -> FlowerFieldSettings:
    """The SecAgg+ settings for ``params`` (see the module doc); ValueError if they cannot be exact."""
    extra = params.max_devices.bit_length()
    if params.bits + extra > MAX_MODULUS_BITS:
        raise ValueError(f"{params.bits} bits x {params.max_devices} devices needs a modulus of 2^{params.bits + extra}"
                         f" (> 2^{MAX_MODULUS_BITS}: Flower's float output would not be exact)")
    return FlowerFieldSettings(float(params.modulus // 2), params.modulus, 1 << (params.bits + extra))


def to_flower(encoding: np.ndarray, params: IntegerMechanismParams) -> np.ndarray:
    """A device's field elements as the float vector Flower's client quantizes to exactly those elements."""
    return np.asarray(encoding, np.int64).astype(np.float64) - params.modulus // 2


def field_sum_from_flower(aggregate: np.ndarray, n_active: int, params: IntegerMechanismParams) -> np.ndarray:
    """The modular sum of the encodings from Flower's server output (``(S - n c) / n`` in float64)."""
    c = params.modulus // 2
    total = np.rint(np.asarray(aggregate, np.float64) * n_active).astype(np.int64) + n_active * c
    return np.mod(total, params.modulus)


def exact_quantize(parameters: list[np.ndarray], clipping_range: float, target_range: int) -> list[np.ndarray]:
    """Flower's ``quantize`` on vectors already in the field: exact, no random draw, refuses anything else."""
    if target_range != 2 * clipping_range:
        raise ValueError(f"exact SecAgg+ needs quantization_range = 2 x clipping_range, got {target_range} "
                         f"and {clipping_range}")
    out = []
    for arr in parameters:
        values = np.asarray(arr, np.float64)
        if not (np.all(values == np.floor(values)) and np.all(values >= -clipping_range)
                and np.all(values < clipping_range)):
            raise ValueError("exact SecAgg+ got values that are not field elements (integers in [-c, c)): "
                             "the vector was not encoded by the integer mechanism")
        out.append((values + clipping_range).astype(np.int64))
    return out


def _exact_flower_mod() -> Any:
    # the package re-exports the function under the module's name: take the module itself
    import flwr.client.mod.secure_aggregation.secaggplus_mod  # noqa: F401

    module = sys.modules["flwr.client.mod.secure_aggregation.secaggplus_mod"]
    scope: dict[str, Any] = dict(vars(module))
    scope["quantize"] = exact_quantize
    for name in ("_collect_masked_vectors", "secaggplus_mod"):
        original = getattr(module, name)
        clone = types.FunctionType(original.__code__, scope, name, original.__defaults__, original.__closure__)
        clone.__kwdefaults__ = original.__kwdefaults__
        scope[name] = clone
    return scope["secaggplus_mod"]


#: Flower's SecAgg+ client mod with :func:`exact_quantize` in place of its quantizer.
exact_secaggplus_mod = _exact_flower_mod()
