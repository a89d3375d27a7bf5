"""The distributed Skellam mechanism's device-side encoder and server-side decoder (issue 19).

Device: project its vector onto the ball of radius ``vectors_per_device x l2_clip`` -> scale by
``scale`` -> pad to a power of two -> randomised Hadamard rotation (sign flips from the PUBLIC
per-round seed, so every party can undo it) -> randomised rounding, ONCE per device -> plus an
integer Skellam share -> reduced into ``Z_{2^bits}``. The rounding is conditional (re-drawn until
the rounded L2 norm is <= ``norm_bound``, checked in exact integer arithmetic) when ``beta > 0``:
the device level, where the vector is the whole unit. At ``beta = 0`` (the example level, where
the vector is a SUM of clipped examples) it is plain randomised rounding and ``norm_bound`` is the
coupled bound ``c + sqrt(d)`` of :func:`fed_nessa.privacy.skellam.rounded_l2_norm_bound` on how far
the rounded sums of two neighbouring inputs can be apart (docs/privacy.md "The example level").

Rounding uniforms and Poisson draws come from a
:class:`~fed_nessa.randomness.NoiseSource` (the OS CSPRNG in a real run); the only other
randomness, the rotation's signs, is public by design.

Server: modular sum -> centred into ``[-2^(bits-1), 2^(bits-1))`` -> refused if any coordinate is
beyond the stated bound (:func:`sum_bound`; a wrap shows up there) -> inverse rotation -> unpad
-> descale. The decoded sum is a post-processing of the integer sum ``sum_i y_i + Sk(mu)`` that
:mod:`fed_nessa.privacy.skellam` accounts, so a wrap-around can cost utility, never privacy.

Floating point: the Poisson samplers compare float64 expressions, so they are Poisson up to
float64 rounding (as every sampler in numpy is); the rounding decision and the norm check are exact.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import numpy as np

from fed_nessa.privacy.skellam import DEFAULT_BETA, SkellamRelease, integer_l1_bound, rounded_l2_norm_bound
from fed_nessa.randomness import NoiseSource

#: Scaled clip per sqrt(padded dim) ``k`` a round tries, largest first: the largest whose field fits
#: :data:`MAX_BITS`. The rounding inflates the L2 bound by ~1/(8 k^2) at the device level (conditional
#: rounding) and by 1/k at the example level (the coupled bound): 0.8 % at 128, 12.5 % at 8, 50 % at 2
#: (the smallest, for sums as large as 30k devices x 1,000 pairs, which need 32 bits at 8).
SCALE_CANDIDATES: tuple[float, ...] = (128.0, 64.0, 32.0, 16.0, 8.0, 4.0, 2.0)
#: Probability (per round, over every coordinate) that the decoder refuses a sum; also bounds a wrap.
DEFAULT_WRAP_PROBABILITY = 1e-9
#: Flower's quantizer casts to int32 (``_stochastic_round``), so field elements must stay below 2^31.
MAX_BITS = 31
#: Below this Poisson mean, inversion; at and above it, PTRS (Hoermann 1993).
PTRS_MIN_MEAN = 10.0
#: Rows of the largest dense Hadamard factor :func:`fwht` multiplies by.
HADAMARD_BLOCK = 128
#: Conditional rounding re-draws at most this many times (each keeps w.p. >= 1 - beta ~ 0.39).
MAX_ROUNDING_TRIES = 200


class FieldTooSmallError(ValueError):
    """No scale keeps the round's sum within :data:`MAX_BITS` (too many devices, vectors or too much noise)."""


class WrapAroundError(ArithmeticError):
    """A decoded modular sum lies outside the stated bound: it may have wrapped; refused."""


@dataclasses.dataclass(frozen=True)
class IntegerMechanismParams:
    """Every public parameter of one round of the mechanism (what a ledger records)."""

    dim: int
    padded_dim: int
    scale: float
    bits: int
    l2_clip: float
    norm_bound: float
    beta: float
    device_variance: float
    rotation_seed: int
    min_devices: int
    max_devices: int
    #: Clipped vectors one device's contribution sums: 1 at the device level; at the example level, the
    #: most examples its sum is sized for. The encoder projects the sum onto the ball of radius
    #: ``vectors_per_device x l2_clip`` (1-Lipschitz, so one example still moves it by <= ``l2_clip``),
    #: which bounds the field's signal; the sum is rounded once, so more than one needs ``beta = 0``.
    vectors_per_device: int = 1

    def __post_init__(self) -> None:
        if self.padded_dim != padded_dimension(self.dim):
            raise ValueError(f"padded_dim {self.padded_dim} is not the power of two for dim {self.dim}")
        if not 2 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in [2, {MAX_BITS}], got {self.bits}")
        if not (self.scale > 0 and self.l2_clip > 0 and self.device_variance >= 0):
            raise ValueError(f"scale, l2_clip must be > 0 and device_variance >= 0, got {self}")
        if not 1 <= self.min_devices <= self.max_devices:
            raise ValueError(f"need 1 <= min_devices <= max_devices, got {self.min_devices}, {self.max_devices}")
        if self.vectors_per_device < 1:
            raise ValueError(f"vectors_per_device must be >= 1, got {self.vectors_per_device}")
        if self.vectors_per_device > 1 and self.beta != 0.0:
            raise ValueError(f"a sum of up to {self.vectors_per_device} vectors is rounded once without conditioning: "
                             f"its bound is the coupled one, beta must be 0, got {self.beta:g}")
        # The accountant charges norm_bound: it must be the bound the rounding was built for, so a record
        # whose scale, clip, beta or bound was edited is refused rather than accounted.
        expected = rounded_l2_norm_bound(self.scale * self.l2_clip, self.beta, self.padded_dim)
        if self.norm_bound != expected:
            raise ValueError(f"norm_bound {self.norm_bound!r} is not the rounded bound {expected!r} of scale x clip "
                             f"{self.scale * self.l2_clip:g}, beta {self.beta:g}, padded_dim {self.padded_dim}")

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def l1_bound(self) -> float:
        """L1 sensitivity of one device's rounded vector (integer domain)."""
        return integer_l1_bound(self.norm_bound, self.padded_dim)

    @property
    def central_variance(self) -> float:
        """Per-coordinate Skellam variance of the sum when the fewest allowed devices contribute."""
        return self.device_variance * self.min_devices

    def release(self, sample_rate: float = 1.0, steps: int = 1) -> SkellamRelease:
        """What the accountant charges for ``steps`` releases at ``sample_rate`` (add/remove one device or example)."""
        return SkellamRelease(self.norm_bound, self.l1_bound, self.central_variance, sample_rate, steps)


def padded_dimension(dim: int) -> int:
    """The smallest power of two >= ``dim`` (the Hadamard transform's length)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return 1 << (dim - 1).bit_length()


def build_params(dim: int, l2_clip: float, noise_multiplier: float, rotation_seed: int, min_devices: int,
                 max_devices: int, vectors_per_device: int = 1, beta: float = DEFAULT_BETA,
                 clip_per_sqrt_dim: float | None = None,
                 wrap_probability: float = DEFAULT_WRAP_PROBABILITY) -> IntegerMechanismParams:
    """Parameters for ``dim`` values clipped to ``l2_clip`` and a central noise std of ``noise_multiplier x l2_clip``.

    The noise multiplier means what the continuous Gaussian's does (std over the clip, in the
    input's units), so equal multipliers are equal noise; the accountant charges the rounded bound.

    The scale puts the clip at ``k x sqrt(padded_dim)`` integer units, ``k = clip_per_sqrt_dim`` or
    (None) the largest of :data:`SCALE_CANDIDATES` that fits; the bit width is the smallest that
    holds :func:`sum_bound` at ``max_devices`` with probability ``1 - wrap_probability``. Raises
    :class:`FieldTooSmallError` when that needs more than :data:`MAX_BITS` at every candidate.
    """
    candidates = SCALE_CANDIDATES if clip_per_sqrt_dim is None else (clip_per_sqrt_dim,)
    needed = []
    for k in candidates:
        bits, draft = _params_at(dim, l2_clip, noise_multiplier, rotation_seed, min_devices, max_devices,
                                 vectors_per_device, beta, k, wrap_probability)
        if bits <= MAX_BITS:
            return dataclasses.replace(draft, bits=max(bits, 2))
        needed.append(bits)
    raise FieldTooSmallError(f"{max_devices} devices need {min(needed)} bits to keep the sum unwrapped (at most "
                             f"{MAX_BITS}) even at the smallest scale k = {candidates[-1]:g}")


def _params_at(dim: int, l2_clip: float, noise_multiplier: float, rotation_seed: int, min_devices: int,
               max_devices: int, vectors_per_device: int, beta: float, k: float,
               wrap_probability: float) -> tuple[int, IntegerMechanismParams]:
    """The bits the field needs at scale ``k`` (may exceed :data:`MAX_BITS`) and the parameters (bits unset)."""
    padded = padded_dimension(dim)
    scale = k * math.sqrt(padded) / l2_clip
    norm_bound = rounded_l2_norm_bound(scale * l2_clip, beta, padded)
    device_variance = (noise_multiplier * scale * l2_clip) ** 2 / min_devices
    draft = IntegerMechanismParams(dim, padded, scale, MAX_BITS, l2_clip, norm_bound, beta, device_variance,
                                   rotation_seed, min_devices, max_devices, vectors_per_device)
    bound = sum_bound(draft, max_devices, wrap_probability)
    return math.ceil(math.log2(bound + 1)) + 1, draft


def _skellam_tail_bound(variance: float, tail: float) -> float:
    """Smallest a with ``P(|Sk(variance)| >= a) <= tail`` by the Chernoff bound.

    ``E e^{tX} = exp(mu (cosh t - 1))`` gives ``P(X >= a) <= exp(-(a asinh(a/mu) - sqrt(a^2+mu^2) + mu))``.
    """
    if variance == 0.0:
        return 0.0

    def log_tail(a: float) -> float:
        return math.log(2.0) - (a * math.asinh(a / variance) - math.hypot(a, variance) + variance)

    lo, hi = 0.0, max(1.0, math.sqrt(variance))
    while log_tail(hi) > math.log(tail):
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if log_tail(mid) > math.log(tail) else (lo, mid)
    return hi


def sum_bound(params: IntegerMechanismParams, n_devices: int,
              wrap_probability: float = DEFAULT_WRAP_PROBABILITY) -> float:
    """B such that every coordinate of the integer sum of ``n_devices`` encodings is within +-B w.p. >= 1 - p.

    Three parts, union-bounded over the padded coordinates, half of ``p`` each for signal and noise
    (``m = n x vectors_per_device`` clipped vectors):
    - signal: for inputs fixed before the public seed, a coordinate of the rotated sum (norm
      <= m x scale x clip: each device's projected sum is within ``vectors_per_device x clip``) is
      sub-Gaussian with variance proxy ``(m scale clip)^2 / padded_dim``;
    - rounding: each device rounds once, moving each coordinate by less than 1, so by less than n;
    - noise: Sk(n x device_variance), by its Chernoff bound.
    """
    d = params.padded_dim
    vectors = n_devices * params.vectors_per_device
    signal = math.sqrt(2.0 * math.log(4.0 * d / wrap_probability)) * vectors * params.scale * params.l2_clip
    noise = _skellam_tail_bound(n_devices * params.device_variance, wrap_probability / (2.0 * d))
    return signal / math.sqrt(d) + n_devices + noise


def rotation_signs(seed: int, padded_dim: int) -> np.ndarray:
    """The public +-1 diagonal of the rotation, from SHAKE-256 of the round's seed (no RNG state)."""
    raw = hashlib.shake_256(f"fed-nessa/rotation/{int(seed)}".encode()).digest((padded_dim + 7) // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:padded_dim]
    return 1.0 - 2.0 * bits.astype(np.float64)


def fwht(x: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform along the last axis (length a power of two); self-inverse.

    ``H_{2^m}`` is the Kronecker product of Sylvester Hadamards of at most :data:`HADAMARD_BLOCK` rows
    each, so the transform is a few dense matrix products along the axes of a reshape (BLAS), not
    ``m`` butterfly passes in Python: ~20x faster at 2^17 values, the same matrix.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard length must be a power of two, got {n}")
    lead = x.shape[:-1]
    m = n.bit_length() - 1
    block = HADAMARD_BLOCK.bit_length() - 1
    sizes = [1 << min(block, m - k) for k in range(0, m, block)] or [1]
    out = np.asarray(x, dtype=np.float64).reshape(-1, *sizes)
    for axis, size in enumerate(sizes, start=1):
        out = np.moveaxis(np.moveaxis(out, axis, -1) @ _sylvester(size), -1, axis)
    return np.ascontiguousarray(out).reshape(*lead, n) / math.sqrt(n)


@functools.lru_cache(maxsize=16)
def _sylvester(size: int) -> np.ndarray:
    from scipy.linalg import hadamard

    return hadamard(size).astype(np.float64)


def rotate(x: np.ndarray, params: IntegerMechanismParams) -> np.ndarray:
    """Pad ``x`` to the padded dimension, flip signs, Hadamard-transform (norm preserved)."""
    padded = np.zeros(params.padded_dim, np.float64)
    padded[: params.dim] = x
    return fwht(padded * rotation_signs(params.rotation_seed, params.padded_dim))


def unrotate(y: np.ndarray, params: IntegerMechanismParams) -> np.ndarray:
    """The inverse of :func:`rotate` (unpadded)."""
    return (fwht(y) * rotation_signs(params.rotation_seed, params.padded_dim))[: params.dim]


def randomised_round(v: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Unbiased randomised rounding of ``v`` driven by ``uniforms`` in [0, 1): up w.p. its fractional part.

    Each coordinate lands on ``floor(v_j)`` or ``floor(v_j) + 1``, so ``|rounded_j - v_j| < 1``. Two
    inputs rounded with the SAME uniforms differ by ``floor`` or ``ceil`` of their difference in
    every coordinate (the coupling the example level's bound rests on, docs/privacy.md).
    """
    floor = np.floor(v)
    return floor.astype(np.int64) + (uniforms < v - floor).astype(np.int64)


def conditional_round(v: np.ndarray, norm_bound: float, noise: NoiseSource,
                      max_tries: int = MAX_ROUNDING_TRIES) -> np.ndarray:
    """Unbiased randomised rounding of ``v``, re-drawn until ``||rounded||_2 <= norm_bound`` (exactly).

    The check is in integers (Python int vs float comparison is exact), so the released vector's
    norm bound, the sensitivity the accountant uses, holds for every output.
    """
    limit = norm_bound * norm_bound
    for _ in range(max_tries):
        rounded = randomised_round(v, noise.uniform(v.size))
        if int(np.dot(rounded, rounded)) <= limit:
            return rounded
    raise ArithmeticError(f"conditional rounding found no draw within norm {norm_bound:g} in {max_tries} tries")


def _poisson_inversion(mean: float, n: int, noise: NoiseSource) -> np.ndarray:
    u = noise.uniform(n)
    k = np.zeros(n, np.int64)
    p = math.exp(-mean)
    cdf = p
    cap = int(mean + 40 * math.sqrt(mean) + 60)
    for j in range(1, cap):
        above = u > cdf
        if not above.any():
            break
        k += above
        p *= mean / j
        cdf += p
    return k


def _poisson_ptrs(mean: float, n: int, noise: NoiseSource) -> np.ndarray:
    """Hoermann's PTRS (transformed rejection with squeeze), vectorised over the pending draws."""
    slam, loglam = math.sqrt(mean), math.log(mean)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    vr = 0.9277 - 3.6224 / (b - 2)
    out = np.empty(n, np.int64)
    pending = np.arange(n)
    from scipy.special import gammaln

    while pending.size:
        m = pending.size
        u = noise.uniform(m) - 0.5
        v = noise.uniform(m)
        us = 0.5 - np.abs(u)
        k = np.floor((2 * a / us + b) * u + mean + 0.43)
        squeeze = (us >= 0.07) & (v <= vr)
        impossible = (k < 0) | ((us < 0.013) & (v > us))
        with np.errstate(invalid="ignore", divide="ignore"):
            exact = (np.log(v) + log_inv_alpha - np.log(a / (us * us) + b)
                     <= -mean + k * loglam - gammaln(np.maximum(k, 0) + 1))
        keep = squeeze | (~impossible & exact)
        out[pending[keep]] = k[keep].astype(np.int64)
        pending = pending[~keep]
    return out


def poisson(mean: float, n: int, noise: NoiseSource) -> np.ndarray:
    """``n`` Poisson(mean) draws driven only by ``noise``'s uniforms (inversion or PTRS)."""
    if mean < 0 or not math.isfinite(mean):
        raise ValueError(f"Poisson mean must be finite and >= 0, got {mean}")
    if mean == 0.0 or n == 0:
        return np.zeros(n, np.int64)
    return _poisson_inversion(mean, n, noise) if mean < PTRS_MIN_MEAN else _poisson_ptrs(mean, n, noise)


def skellam_share(variance: float, n: int, noise: NoiseSource) -> np.ndarray:
    """``n`` draws of the symmetric Skellam of ``variance``: Poisson(variance/2) - Poisson(variance/2)."""
    return poisson(variance / 2.0, n, noise) - poisson(variance / 2.0, n, noise)


def clip_l2(x: np.ndarray, l2_clip: float) -> np.ndarray:
    """``x`` scaled down to L2 norm <= ``l2_clip`` (unchanged when already within)."""
    norm = float(np.linalg.norm(x))
    return x * (l2_clip / norm) if norm > l2_clip else np.asarray(x, np.float64)


def encode_rounded(x: np.ndarray, params: IntegerMechanismParams, noise: NoiseSource) -> np.ndarray:
    """The device's rounded integer vector before noise: project, scale, rotate, round once.

    ``x`` is the device's contribution: its one vector (device level) or the SUM of its clipped
    examples (example level). With ``beta > 0`` the rounding is conditional, so ``||.||_2 <=
    norm_bound`` for every output; with ``beta = 0`` it is plain, and ``norm_bound`` bounds how far
    the outputs for two neighbouring inputs are apart under the coupling of :func:`randomised_round`.
    """
    if x.shape != (params.dim,):
        raise ValueError(f"encoder expects a vector of {params.dim} values, got shape {x.shape}")
    radius = params.vectors_per_device * params.l2_clip
    scaled = rotate(clip_l2(np.asarray(x, np.float64), radius) * params.scale, params)
    if params.beta > 0:
        return conditional_round(scaled, params.norm_bound, noise)
    return randomised_round(scaled, noise.uniform(scaled.size))


def encode(x: np.ndarray, params: IntegerMechanismParams, noise: NoiseSource) -> np.ndarray:
    """One device's field element vector in ``[0, 2^bits)`` (int64): rounded vector + Skellam share, mod 2^bits."""
    rounded = encode_rounded(x, params, noise)
    return np.mod(rounded + skellam_share(params.device_variance, params.padded_dim, noise), params.modulus)


def summed_noise(params: IntegerMechanismParams, n_devices: int, noise: NoiseSource) -> np.ndarray:
    """The sum of ``n_devices`` devices' Skellam shares drawn at once: ``Sk(n x device_variance)``, the same law.

    What a simulator's fast numerics may draw instead of every share (a sum of independent
    Skellams is Skellam; tested against the sum of shares).
    """
    return skellam_share(n_devices * params.device_variance, params.padded_dim, noise)


def modular_sum(encodings: np.ndarray, params: IntegerMechanismParams) -> np.ndarray:
    """What SecAgg+ reveals: the coordinate-wise sum of the encodings mod 2^bits (rows are devices)."""
    return np.mod(np.asarray(encodings, np.int64).sum(axis=0), params.modulus)


def centred(field_sum: np.ndarray, params: IntegerMechanismParams) -> np.ndarray:
    """Field elements as the integers in ``[-2^(bits-1), 2^(bits-1))`` they represent."""
    s = np.mod(np.asarray(field_sum, np.int64), params.modulus)
    return np.where(s >= params.modulus // 2, s - params.modulus, s)


def decode(field_sum: np.ndarray, params: IntegerMechanismParams, n_devices: int,
           wrap_probability: float = DEFAULT_WRAP_PROBABILITY) -> np.ndarray:
    """The float sum of ``n_devices`` clipped inputs (plus noise) from the modular sum of their encodings.

    Refuses (:class:`WrapAroundError`) a sum with any coordinate beyond :func:`sum_bound`: without a
    wrap that happens w.p. <= ``wrap_probability``; a wrap within ``2^bits - B`` of the true value
    always lands there. Refuses fewer than ``min_devices`` contributions (less noise than accounted).
    """
    if field_sum.shape != (params.padded_dim,):
        raise ValueError(f"decoder expects {params.padded_dim} field elements, got shape {field_sum.shape}")
    if not params.min_devices <= n_devices <= params.max_devices:
        raise ValueError(f"{n_devices} contributions outside [{params.min_devices}, {params.max_devices}]: "
                         "the accounted noise or the bit width does not cover this sum")
    ints = centred(field_sum, params)
    bound = sum_bound(params, n_devices, wrap_probability)
    if bound >= params.modulus // 2:
        raise WrapAroundError(f"too few bits ({params.bits}) for {n_devices} devices: the bound {bound:.0f} "
                              "reaches the half-range, so a wrap could not be told apart; refused")
    worst = int(np.abs(ints).max())
    if worst > bound:
        raise WrapAroundError(f"decoded sum has a coordinate of magnitude {worst} > bound {bound:.0f} "
                              f"({params.bits} bits, {n_devices} devices): it may have wrapped; refused")
    return unrotate(ints.astype(np.float64), params) / params.scale
