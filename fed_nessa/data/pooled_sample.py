"""A bounded, uniform subsample of a fleet's pairs: the data of the pooled non-DP references.

The centralised comparison rows (non-DP NESSA, ridge) are fitted on pooled pairs; at 10^6
devices the pool (~10^8 pairs, ~200 GB) cannot be held, so a reference is fitted on a stated
subsample instead: a uniform sample without replacement of ``min(limit, total)`` pairs, drawn in
one pass over the blocks (lazy population or shard folder) while holding at most ``limit`` pairs
plus one block.

How: pair ``r`` of device ``j`` gets the key ``mix(salt(seed) ^ (j << 32 | r))`` with ``mix`` the
SplitMix64 finaliser (a bijection of 64-bit words, so keys never tie), and the sample is the
``limit`` pairs with the smallest keys (bottom-k sampling: every ``limit``-subset is equally
likely when the keys behave as independent uniforms). The sample depends on the seed and the
fleet only, not on how the fleet was cut into blocks, and is returned in (device, row) order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fed_nessa.data.blocks import DeviceBlock

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_ROW_BITS = 32


@dataclass(frozen=True)
class PooledSample:
    """The pairs a pooled reference is fitted on, and what they are a sample of."""

    x: np.ndarray  # (m, d_x) float32
    y: np.ndarray  # (m, d_y) float32
    device: np.ndarray  # (m,) int64 global device index of each pair
    row: np.ndarray  # (m,) int64 row of the pair within its device
    total_pairs: int  # pairs in the whole fleet (the population the sample is drawn from)
    limit: int
    seed: int

    @property
    def fraction(self) -> float:
        """The share of the fleet's pairs in the sample (1.0 when the fleet has <= ``limit`` pairs)."""
        return self.x.shape[0] / self.total_pairs

    def describe(self) -> str:
        """One line for a report: what the reference was fitted on."""
        return (f"uniform sample without replacement of {self.x.shape[0]:,} of {self.total_pairs:,} pairs "
                f"({self.fraction:.2%}; at most {self.limit:,}; seed {self.seed})")


def _mix(v: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic; a bijection)."""
    v = (v ^ (v >> np.uint64(30))) * _M1
    v = (v ^ (v >> np.uint64(27))) * _M2
    return v ^ (v >> np.uint64(31))


def pair_keys(device: np.ndarray, row: np.ndarray, seed: int) -> np.ndarray:
    """The sampling key of each (device, row) pair under ``seed``: distinct for distinct pairs."""
    if (row >= 1 << _ROW_BITS).any() or (device >= 1 << (64 - _ROW_BITS)).any():
        raise ValueError(f"a device has more than 2^{_ROW_BITS} pairs or an index past 2^{64 - _ROW_BITS}")
    salt = _mix(np.array([(int(seed) * _GOLDEN) % (1 << 64)], dtype=np.uint64))
    ids = (device.astype(np.uint64) << np.uint64(_ROW_BITS)) | row.astype(np.uint64)
    return _mix(ids ^ salt)


def pooled_subsample(blocks: Iterable[DeviceBlock], limit: int, seed: int = 0) -> PooledSample:
    """One pass over ``blocks``: a uniform sample of ``min(limit, total)`` pairs (see module doc)."""
    if int(limit) < 1:
        raise ValueError(f"the pooled reference's sample needs limit >= 1 pairs, got {limit}")
    limit = int(limit)
    keys = np.empty(0, dtype=np.uint64)
    kept: list[np.ndarray] = []  # x, y, device, row of the current sample
    total = 0
    for block in blocks:
        device = block.device_of_row()
        row = np.arange(block.pairs, dtype=np.int64) - np.repeat(block.starts[:-1], block.n)
        k = pair_keys(device, row, seed)
        total += block.pairs
        take = k < keys.max() if keys.size == limit else np.ones(k.size, dtype=bool)
        new = [block.x[take], block.y[take], device[take], row[take]]
        keys = np.concatenate([keys, k[take]])
        kept = new if not kept else [np.concatenate([a, b]) for a, b in zip(kept, new)]
        if keys.size > limit:
            keep = np.argpartition(keys, limit - 1)[:limit]
            keys, kept = keys[keep], [a[keep] for a in kept]
    if not kept:
        raise ValueError("no device blocks to sample from")
    order = np.lexsort((kept[3], kept[2]))
    x, y, device, row = (a[order] for a in kept)
    return PooledSample(x, y, device, row, total, limit, int(seed))
