"""The fleet engine's simulated numerics: SecAgg+'s arithmetic and the fast numerics' fleet-wide streams.

SecAgg+ is simulated without its masks (they cancel exactly in the modular sum): each device's
codec step and own range check, Flower's quantization of each payload, the modular sum and the
workflow's dequantization (``exact``), or the devices' summed stochastic-rounding error drawn from
its distribution (``fast``). The fast numerics draw a round's Poisson uniforms, summed Gaussian
noise and rounding errors fleet-wide; under ``reproducible-noise`` every one of them is keyed by
(seed, stream, round), so a fast run replays bit for bit.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
from flwr.common.secure_aggregation.quantization import quantize

from fed_nessa.config import SECAGG_MODULUS_RANGE, FederationConfig
from fed_nessa.federated.codec import SaturationError, SecAggCodec
from fed_nessa.randomness import NoiseSource, noise_source

#: Stream keys of the fast numerics' seeded draws under ``reproducible-noise`` (7: the engine's drop-outs,
#: 13: the reference subsample).
UNIFORMS_STREAM = 11
ROUNDING_STREAM = 17


def summed_noise(cfg: FederationConfig, round_num: int) -> NoiseSource:
    """The summed-noise stream of a fast round: OS CSPRNG, or the reproducible key's seed."""
    return noise_source(cfg.reproducible_noise, cfg.seed, "fleet", round_num)


def uniforms(cfg: FederationConfig, n: int, round_num: int) -> np.ndarray:
    """The fast numerics' Poisson-sample uniforms for ``n`` pairs of the fleet at once.

    A PCG64 stream keyed with 128 fresh bits of OS entropy per round (the field-notes recipe for
    fleet scale); reproducible only under ``reproducible-noise``.
    """
    if cfg.reproducible_noise:
        return np.random.default_rng([cfg.seed, UNIFORMS_STREAM, round_num]).random(n)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(secrets.randbits(128)))).random(n)


def fast_rounding(total: np.ndarray, n: int, codec: SecAggCodec, cfg: FederationConfig,
                  round_num: int) -> np.ndarray:
    """Add ``n`` devices' summed stochastic-rounding error, drawn from its distribution.

    Variance ``n s^2 / 6`` per coordinate (s the quantization step; 1/6 = E[p(1-p)] for a uniform
    fractional part p). Not a privacy mechanism, but part of the released sum: keyed by (seed,
    round) under ``reproducible-noise``.
    """
    std = codec.step * math.sqrt(n / 6.0)
    rng = (np.random.default_rng([cfg.seed, ROUNDING_STREAM, round_num]) if cfg.reproducible_noise
           else np.random.default_rng())
    return (total + rng.normal(0.0, std, total.shape)).astype(np.float32)


def encode_all(vectors: list[np.ndarray], devices: list[int],
               codec: SecAggCodec) -> tuple[list[np.ndarray], list[int], list[int]]:
    """Each device's codec step and own range check: a saturated vector fails on its device.

    Returns the payloads, the devices that sent them and the devices that failed.
    """
    payloads, sent, failed = [], [], []
    for vec, i in zip(vectors, devices, strict=True):
        try:
            payloads.append(codec.encode(vec)[0])
            sent.append(i)
        except SaturationError:
            failed.append(i)
    return payloads, sent, failed


def modular_sum(payloads: list[np.ndarray], codec: SecAggCodec, keys: list[list[int]] | None = None) -> np.ndarray:
    """Flower's quantization of each payload, the modular sum, the workflow's dequantization (``keys``:
    :func:`partial_modular_sum`'s)."""
    return dequantized_total(partial_modular_sum(payloads, codec, keys), len(payloads), codec)


def rounding_keys(cfg: FederationConfig, round_num: int, devices: list[int]) -> list[list[int]] | None:
    """Each device's key for its payload's stochastic rounding in round ``round_num`` under
    ``reproducible-noise`` (None otherwise: Flower's own rounding). Keyed by the device's place in the
    fleet, so the fleet engine and the block engine round a device's payload alike."""
    if not cfg.reproducible_noise:
        return None
    return [[cfg.seed, ROUNDING_STREAM, round_num, int(i)] for i in devices]


def partial_modular_sum(payloads: list[np.ndarray], codec: SecAggCodec,
                        keys: list[list[int]] | None = None) -> np.ndarray:
    """Flower's quantization of each payload and their sum modulo SecAgg+'s modulus (int64).

    Partial sums of disjoint groups of devices add (modulo the same modulus) to the whole
    sum, so a block of devices can send one (:mod:`fed_nessa.sim.blocks`). ``keys`` (one per
    payload, reproducible runs): Flower's stochastic rounding draws from NumPy's global
    generator, which is seeded with the payload's key for its call (and restored after), so a
    payload rounds the same in any process.
    """
    c, t = codec.clipping_range, codec.quantization_range
    acc: np.ndarray | None = None
    for k, payload in enumerate(payloads):
        state = np.random.get_state() if keys is not None else None
        if keys is not None:
            np.random.seed(np.asarray(keys[k], np.uint32))
        qv = quantize([payload], c, t)[0].astype(np.int64)
        if state is not None:
            np.random.set_state(state)
        acc = qv if acc is None else (acc + qv) % SECAGG_MODULUS_RANGE
    assert acc is not None
    return acc


def dequantized_total(acc: np.ndarray, n: int, codec: SecAggCodec) -> np.ndarray:
    """The released sum of ``n`` payloads from their modular sum ``acc`` (the workflow's dequantization)."""
    c, t = codec.clipping_range, codec.quantization_range
    # Flower's workflow: dequantize the sum, shift by -(n-1)c, divide by the summed weight factor.
    mean = (np.asarray(acc).astype(np.float64) * (2 * c / t) - c - (n - 1) * c) / n
    total, _ = codec.decode(mean, n)
    return total
