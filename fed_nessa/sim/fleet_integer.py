"""The fleet engine's rounds under ``distributed-mechanism = skellam`` (issue 19).

``exact``: every device's vector (its weighted statistics, its clipped-gradient sum or its clipped
update), its projection, rotation, rounding (once) and integer Skellam share from its own noise
stream (the stream a Flower device uses: under ``reproducible-noise`` the two engines release the
same sum bit for bit), the modular sum and the server's decode.

``fast`` (distribution-equivalent for the noise, approximate for the rounding): the exact float
sum of the devices' vectors (each projected as its encoder projects it), plus, in the rotated domain,
ONE draw of the summed Skellam noise (a sum of independent Skellams is Skellam, so this is its exact
law) and the rounding's error drawn as one Gaussian of variance ``n / 6`` per coordinate (n devices,
each rounding once; 1/6 = E[p(1 - p)] for a uniform fractional part; the device level's conditioning
on the norm bound is not simulated), rotated back and descaled. Neither changes what is accounted:
the ledgers record the same skellam events.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from fed_nessa.config import FederationConfig, FleetNumerics
from fed_nessa.federated import skellam_mechanism, suffstats
from fed_nessa.federated.integer_mechanism import clip_l2, skellam_share, unrotate
from fed_nessa.federated.mechanism import mechanism_for
from fed_nessa.federated.skellam_mechanism import IntegerCodec
from fed_nessa.randomness import NoiseSource, noise_source
from fed_nessa.sim.fleet_numerics import summed_noise


def stats_sum(cfg: FederationConfig, numerics: str, shards: Sequence[tuple[np.ndarray, np.ndarray]],
              ids: Sequence[str], gs: Sequence[int], r: int, codec: IntegerCodec) -> np.ndarray:
    """The released statistics sum (float32, input units) of the devices whose shards are ``shards``.

    ``ids`` name their noise streams, ``gs`` are the g their policies size their shares for. Each device's
    vector is built when the sum reaches it, so one is held at a time (at 30k devices the list of them
    was 16 GiB: 68,129 float64 values each for 256 x 192 embeddings).
    """
    mech = mechanism_for(cfg)
    vectors = (suffstats.device_vector(x, y) * mech.stats_weight(len(x)) for x, y in shards)
    if numerics == FleetNumerics.EXACT:
        return exact_sum(vectors, [noise_source(cfg.reproducible_noise, cfg.seed, "device", i, r) for i in ids],
                         gs, codec)
    return fast_sum(cfg, projected_sum(vectors, codec), gs, r, codec)


def projected_sum(vectors: Iterable[np.ndarray], codec: IntegerCodec) -> np.ndarray:
    """The float64 sum of the devices' un-noised ``vectors``, each projected as its encoder projects it (onto
    the ball of ``vectors_per_device`` clips): the fast numerics' sum before the one draw of noise."""
    radius = codec.params.vectors_per_device * codec.params.l2_clip  # in encoded units (input / codec.unit)
    total = np.zeros(codec.params.dim)
    for v in vectors:
        total += clip_l2(codec.to_encoded(v), radius) * codec.unit
    return total


def field_sum(vectors: Iterable[np.ndarray], streams: Sequence[NoiseSource], gs: Sequence[int],
              codec: IntegerCodec) -> np.ndarray:
    """The modular sum (int64 in ``[0, 2^bits)``) of the field elements of the devices' un-noised ``vectors``
    (their statistics, clipped-gradient sums or clipped updates), each encoded as its device encodes it, from
    its own stream (what the device drew before, its Poisson sample or its rows, already drawn), share sized
    for its g. Added up one device at a time (memory: one payload, whatever the count); a part of the sum
    (a block's) adds to the others' modulo 2^bits."""
    params = codec.params
    acc = np.zeros(params.padded_dim, np.int64)
    for v, stream, g in zip(vectors, streams, gs, strict=True):
        share = skellam_mechanism.encode_device(codec.to_encoded(v), skellam_mechanism.device_params(params, g), stream)
        acc = np.mod(acc + share, params.modulus)
    return acc


def exact_sum(vectors: Iterable[np.ndarray], streams: Sequence[NoiseSource], gs: Sequence[int],
              codec: IntegerCodec) -> np.ndarray:
    """The released sum (float32, input units) of the devices' un-noised ``vectors`` (one per ``gs``): their
    :func:`field_sum` decoded as the server decodes it."""
    return codec.decode_sum(field_sum(vectors, streams, gs, codec), len(gs))


def fast_sum(cfg: FederationConfig, total: np.ndarray, gs: Sequence[int], r: int, codec: IntegerCodec) -> np.ndarray:
    """The released sum (float32) from the devices' float ``total``: plus one draw of the summed Skellam noise
    and of the rounding's error (one rounding per device, ``len(gs)`` devices), in the rotated domain."""
    params = codec.params
    stream = summed_noise(cfg, r)
    variance = sum(params.device_variance / g for g in gs)
    rotated = (skellam_share(variance, params.padded_dim, stream).astype(np.float64)
               + stream.normal((params.padded_dim,), math.sqrt(len(gs) / 6.0)))
    return ((codec.to_encoded(total) + unrotate(rotated, params) / params.scale) * codec.unit).astype(np.float32)


def noise_statement(numerics: str, engine: str = "fleet engine") -> str:
    """Where a skellam run's draws came from (``engine``: the fleet or the block engine, which run the same
    numerics; a deployed device draws all of them from the OS CSPRNG)."""
    if numerics == FleetNumerics.EXACT:
        return (f"{engine}, exact numerics, integer mechanism: every device's rotation, conditional rounding and "
                "integer Skellam share drawn from the OS CSPRNG, as on a device; the modular sum decoded as the server "
                "does")
    return (f"{engine}, distribution-equivalent numerics, integer mechanism (a simulation): the summed Skellam "
            "noise is one draw from the OS CSPRNG (its exact law); the devices' rounding errors one Gaussian draw of "
            "their variance (the conditioning on the norm bound not simulated). A deployed device rounds and draws its "
            "own share from the OS CSPRNG")
