"""The fleet engine's statistics round under ``distributed-mechanism = skellam`` (issue 19).

``exact``: every device's rows (each pair's, or its one weighted vector), its rotation, conditional
rounding and integer Skellam share from its own noise stream (the stream a Flower device uses:
under ``reproducible-noise`` the two engines release the same sum bit for bit), the modular sum
and the server's decode.

``fast`` (distribution-equivalent for the noise, approximate for the rounding): the exact float
sum of the devices' rows, plus, in the rotated domain, ONE draw of the summed Skellam noise (a
sum of independent Skellams is Skellam, so this is its exact law) and the rounding's error drawn
as one Gaussian of variance ``m / 6`` per coordinate (m rounded vectors; 1/6 = E[p(1 - p)] for a
uniform fractional part; the conditioning on the norm bound is not simulated), rotated back and
descaled. Neither changes what is accounted: the ledgers record the same skellam events.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fed_nessa.config import FederationConfig, FleetNumerics, Phase
from fed_nessa.federated import skellam_mechanism, suffstats
from fed_nessa.federated.integer_mechanism import skellam_share, unrotate
from fed_nessa.federated.mechanism import mechanism_for
from fed_nessa.federated.skellam_mechanism import IntegerCodec
from fed_nessa.randomness import noise_source
from fed_nessa.sim.fleet_numerics import summed_noise


def stats_sum(cfg: FederationConfig, numerics: str, shards: Sequence[tuple[np.ndarray, np.ndarray]],
              ids: Sequence[str], gs: Sequence[int], r: int, codec: IntegerCodec) -> np.ndarray:
    """The released statistics sum (float32, input units) of the devices whose shards are ``shards``.

    ``ids`` name their noise streams, ``gs`` are the g their policies size their shares for.
    """
    mech = mechanism_for(cfg)
    per_pair = skellam_mechanism.per_example_rows(cfg, Phase.SUFFSTATS)
    params = codec.params
    if numerics == FleetNumerics.EXACT:
        encodings = []
        for (x, y), i, g in zip(shards, ids, gs, strict=True):
            weight = mech.stats_weight(len(x))
            rows = skellam_mechanism.device_rows(cfg, Phase.SUFFSTATS,
                                                 None if per_pair else suffstats.device_vector(x, y) * weight,
                                                 x, y, weight)
            encodings.append(skellam_mechanism.encode_device(rows, skellam_mechanism.device_params(params, g),
                                                             noise_source(cfg.reproducible_noise, cfg.seed, "device",
                                                                          i, r)))
        return codec.decode_field(np.stack(encodings), len(shards))
    # the rows of a device sum to its (weighted) statistics vector: the float sum needs no row
    total = np.sum([suffstats.device_vector(x, y) * mech.stats_weight(len(x)) for x, y in shards], axis=0)
    stream = summed_noise(cfg, r)
    variance = sum(params.device_variance / g for g in gs)
    vectors = sum(len(x) for x, _ in shards) if per_pair else len(shards)
    rotated = (skellam_share(variance, params.padded_dim, stream).astype(np.float64)
               + stream.normal((params.padded_dim,), math.sqrt(vectors / 6.0)))
    return (total + unrotate(rotated, params) / params.scale).astype(np.float32)


def noise_statement(numerics: str) -> str:
    """Where a skellam fleet run's draws came from (a deployed device draws all of them from the OS CSPRNG)."""
    if numerics == FleetNumerics.EXACT:
        return ("fleet engine, exact numerics, integer mechanism: every device's rotation, conditional rounding and "
                "integer Skellam share drawn from the OS CSPRNG, as on a device; the modular sum decoded as the server "
                "does")
    return ("fleet engine, distribution-equivalent numerics, integer mechanism (a simulation): the summed Skellam "
            "noise is one draw from the OS CSPRNG (its exact law); the devices' rounding errors one Gaussian draw of "
            "their variance (the conditioning on the norm bound not simulated). A deployed device rounds and draws its "
            "own share from the OS CSPRNG")
