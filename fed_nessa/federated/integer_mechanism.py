"""The distributed Skellam mechanism's device-side encoder and server-side decoder (issue 19).

Device: clip to ``l2_clip`` -> scale by ``scale`` -> pad to a power of two -> randomised
Hadamard rotation (sign flips from the PUBLIC per-round seed, so every party can undo it)
-> conditional randomised rounding (re-drawn until the rounded L2 norm is <= ``norm_bound``,
checked in exact integer arithmetic) -> plus an integer Skellam share -> reduced into
``Z_{2^bits}``. Rounding uniforms and Poisson draws come from a
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

#: Scaled clip per sqrt(padded dim): the rounding's L2 inflation is about 1/(8 k^2) (0.2 % at 8).
DEFAULT_CLIP_PER_SQRT_DIM = 8.0
#: Probability (per round, over every coordinate) that the decoder refuses a sum; also bounds a wrap.
DEFAULT_WRAP_PROBABILITY = 1e-9
#: Flower's quantizer casts to int32 (``_stochastic_round``), so field elements must stay below 2^31.
MAX_BITS = 31
#: Below this Poisson mean, inversion; at and above it, PTRS (Hoermann 1993).
PTRS_MIN_MEAN = 10.0
#: Rows of the largest dense Hadamard factor :func:`fwht` multiplies by.
HADAMARD_BLOCK = 128
#: Rows rotated in one batched transform by :func:`encode_many` (bounds its memory: 64 x padded dim floats).
ROTATION_BATCH = 64
#: Conditional rounding re-draws at most this many times (each keeps w.p. >= 1 - beta ~ 0.39).
MAX_ROUNDING_TRIES = 200


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
    #: Rounded vectors one device may sum: 1 at device level; at example level, the most examples a
    #: device may round in one round (each example is rounded on its own, so one example's
    #: sensitivity is ``norm_bound``).
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
                 clip_per_sqrt_dim: float = DEFAULT_CLIP_PER_SQRT_DIM,
                 wrap_probability: float = DEFAULT_WRAP_PROBABILITY) -> IntegerMechanismParams:
    """Parameters for ``dim`` values clipped to ``l2_clip`` and a central noise std of ``noise_multiplier x l2_clip``.

    The noise multiplier means what the continuous Gaussian's does (std over the clip, in the
    input's units), so equal multipliers are equal noise; the accountant charges the rounded bound.

    The scale puts the clip at ``clip_per_sqrt_dim x sqrt(padded_dim)`` integer units; the bit
    width is the smallest that holds :func:`sum_bound` at ``max_devices`` with probability
    ``1 - wrap_probability``. Raises ValueError when that needs more than :data:`MAX_BITS`.
    """
    padded = padded_dimension(dim)
    scale = clip_per_sqrt_dim * math.sqrt(padded) / l2_clip
    norm_bound = rounded_l2_norm_bound(scale * l2_clip, beta, padded)
    device_variance = (noise_multiplier * scale * l2_clip) ** 2 / min_devices
    draft = IntegerMechanismParams(dim, padded, scale, MAX_BITS, l2_clip, norm_bound, beta, device_variance,
                                   rotation_seed, min_devices, max_devices, vectors_per_device)
    bound = sum_bound(draft, max_devices, wrap_probability)
    bits = math.ceil(math.log2(bound + 1)) + 1
    if bits > MAX_BITS:
        raise ValueError(f"{max_devices} devices need {bits} bits to keep the sum unwrapped (at most {MAX_BITS})")
    return dataclasses.replace(draft, bits=max(bits, 2))


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
    (``m = n x vectors_per_device`` rounded vectors):
    - signal: for inputs fixed before the public seed, a coordinate of the rotated sum (norm
      <= m x scale x clip) is sub-Gaussian with variance proxy ``(m scale clip)^2 / padded_dim``;
    - rounding: each vector moves each coordinate by less than 1, so by less than m in all;
    - noise: Sk(n x device_variance), by its Chernoff bound.
    """
    d = params.padded_dim
    vectors = n_devices * params.vectors_per_device
    signal = math.sqrt(2.0 * math.log(4.0 * d / wrap_probability)) * vectors * params.scale * params.l2_clip
    noise = _skellam_tail_bound(n_devices * params.device_variance, wrap_probability / (2.0 * d))
    return signal / math.sqrt(d) + vectors + noise


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


def rotate_rows(rows: np.ndarray, params: IntegerMechanismParams) -> np.ndarray:
    """:func:`rotate` of every row at once (one batched transform)."""
    padded = np.zeros((len(rows), params.padded_dim), np.float64)
    padded[:, : params.dim] = rows
    return fwht(padded * rotation_signs(params.rotation_seed, params.padded_dim))


def unrotate(y: np.ndarray, params: IntegerMechanismParams) -> np.ndarray:
    """The inverse of :func:`rotate` (unpadded)."""
    return (fwht(y) * rotation_signs(params.rotation_seed, params.padded_dim))[: params.dim]


def conditional_round(v: np.ndarray, norm_bound: float, noise: NoiseSource,
                      max_tries: int = MAX_ROUNDING_TRIES) -> np.ndarray:
    """Unbiased randomised rounding of ``v``, re-drawn until ``||rounded||_2 <= norm_bound`` (exactly).

    The check is in integers (Python int vs float comparison is exact), so the released vector's
    norm bound, the sensitivity the accountant uses, holds for every output.
    """
    floor = np.floor(v)
    frac = v - floor
    base = floor.astype(np.int64)
    limit = norm_bound * norm_bound
    for _ in range(max_tries):
        rounded = base + (noise.uniform(v.size) < frac).astype(np.int64)
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
    """The device's rounded integer vector before noise (``||.||_2 <= norm_bound``): clip, scale, rotate, round."""
    if x.shape != (params.dim,):
        raise ValueError(f"encoder expects a vector of {params.dim} values, got shape {x.shape}")
    scaled = rotate(clip_l2(np.asarray(x, np.float64), params.l2_clip) * params.scale, params)
    return conditional_round(scaled, params.norm_bound, noise)


def encode(x: np.ndarray, params: IntegerMechanismParams, noise: NoiseSource) -> np.ndarray:
    """One device's field element vector in ``[0, 2^bits)`` (int64): rounded vector + Skellam share, mod 2^bits."""
    return encode_many(np.asarray(x)[None, :], params, noise)


def encode_many(rows: np.ndarray, params: IntegerMechanismParams, noise: NoiseSource) -> np.ndarray:
    """One device's field elements for several vectors (example level: one row per example's clipped gradient).

    Each row is clipped, rotated and conditionally rounded on its own, the integer vectors are
    summed and ONE Skellam share is added: adding or removing one example moves the integer sum by
    that example's rounded vector, norm <= ``norm_bound``. Rounding the sum instead would not bound
    one example's effect by ``norm_bound`` (two roundings of neighbouring sums are not coupled).
    """
    if rows.ndim != 2 or rows.shape[0] > params.vectors_per_device:
        raise ValueError(f"encoder expects at most {params.vectors_per_device} row(s) of {params.dim} values, "
                         f"got shape {rows.shape}")
    if rows.shape[1:] != (params.dim,):
        raise ValueError(f"encoder expects rows of {params.dim} values, got shape {rows.shape}")
    total = np.zeros(params.padded_dim, np.int64)
    for start in range(0, len(rows), ROTATION_BATCH):
        # the rotations are batched (deterministic); the roundings draw row by row, as encode_rounded does
        for scaled in rotate_rows(_clip_rows(rows[start:start + ROTATION_BATCH], params.l2_clip) * params.scale,
                                  params):
            total += conditional_round(scaled, params.norm_bound, noise)
    return np.mod(total + skellam_share(params.device_variance, params.padded_dim, noise), params.modulus)


def _clip_rows(rows: np.ndarray, l2_clip: float) -> np.ndarray:
    """Each row as :func:`clip_l2` clips it."""
    rows = np.asarray(rows, np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.where(norms > l2_clip, rows * (l2_clip / np.maximum(norms, 1e-300)), rows)


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
