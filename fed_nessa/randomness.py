"""Where every random draw of a DP mechanism comes from.

A primitive at the bottom of the library (it imports nothing of ``fed_nessa``): the model's
DP-SGD, the device, the fleet engine and the privacy code all draw from here, so no layer has
to reach up into the accounting package for its noise.

A DP guarantee holds only if the noise (and the secret Poisson sample) cannot be
recomputed by whoever sees the output. So a device draws them from the OS CSPRNG
(``os.urandom`` via :mod:`secrets`): :class:`SecureNoise` turns fresh OS bytes into
uniforms (53 bits each) and Gaussians (Box-Muller), with no seed anyone could learn.

:class:`ReproducibleNoise` exists for simulations that must replay bit for bit
(tests, the engine-equivalence check). It is only reachable through the explicit
run-config key ``reproducible-noise = true``; every ledger entry, run summary and
report made with it says that **the DP guarantee does not hold** (anyone who knows
the seed can subtract the noise).

What remains even with the CSPRNG: floating-point Gaussian samplers leak through the
low-order bits of their outputs (Mironov, CCS 2012). Released values here are sums of
float32 vectors, quantized by SecAgg+ before they leave the device, which blunts but
does not formally close that channel; a discrete Gaussian would.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from typing import Protocol

import numpy as np

#: Bits of fresh OS entropy behind every secure draw (each draw uses its own bytes).
SECURE_BITS_PER_UNIFORM = 53
REPRODUCIBLE_WARNING = ("reproducible-noise is on: the noise is derived from a public seed and can be "
                        "recomputed, so NO differential-privacy guarantee holds for this run")


class NoiseSource(Protocol):
    """A stream of uniforms and Gaussians for one mechanism run on one device."""

    secure: bool

    def uniform(self, n: int) -> np.ndarray: ...

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray: ...


def _uniforms_from_bytes(raw: bytes, n: int) -> np.ndarray:
    """``n`` uniforms in (0, 1) from 8 bytes each (53 significant bits, never exactly 0)."""
    words = np.frombuffer(raw, dtype="<u8", count=n)
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


class SecureNoise:
    """Draws straight from the OS CSPRNG: nothing to seed, nothing to recompute."""

    secure = True

    def uniform(self, n: int) -> np.ndarray:
        if n <= 0:
            return np.zeros(0, np.float64)
        return _uniforms_from_bytes(secrets.token_bytes(8 * n), n)

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        size = int(np.prod(shape, dtype=np.int64))
        if std == 0.0 or size == 0:
            return np.zeros(shape, np.float64)
        half = (size + 1) // 2
        u1, u2 = self.uniform(half), self.uniform(half)
        radius = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([radius * np.cos(2 * math.pi * u2), radius * np.sin(2 * math.pi * u2)])[:size]
        return (std * z).reshape(shape)


class ReproducibleNoise:
    """A seeded stream (simulation only; see the module doc: no DP guarantee)."""

    secure = False

    def __init__(self, seed: int, *stream: int | str) -> None:
        digest = hashlib.sha256(repr((seed, *stream)).encode()).digest()
        self._rng = np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest[:16], "little")))

    def uniform(self, n: int) -> np.ndarray:
        return self._rng.random(max(n, 0))

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        if std == 0.0:
            return np.zeros(shape, np.float64)
        return self._rng.normal(0.0, std, shape)


def noise_source(reproducible: bool, seed: int, *stream: int | str) -> NoiseSource:
    """The secure source, or (only when ``reproducible``) a seeded one for ``stream``."""
    if reproducible:
        return ReproducibleNoise(seed, *stream)
    return SecureNoise()
