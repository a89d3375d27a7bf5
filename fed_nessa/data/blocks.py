"""Blocks of devices: many devices' pairs as one array pair plus row offsets.

A block is the layout the fleet engine computes on (``x`` (pairs, d_x), ``y`` (pairs, d_y) and
``starts``, device ``first + i`` owning rows ``starts[i]:starts[i + 1]``). A fleet of 10^5-10^6
devices does not fit in memory (~200 GB of float32 at 10^6 devices x 112 pairs), so it is visited
block by block: from the lazy synthetic population (:mod:`fed_nessa.data.lazy_population`) or
from a shard folder (:func:`iter_shard_blocks`), holding one block at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fed_nessa.data.shards import Shard, ShardError, load_shard, make_shard, shard_paths


@dataclass(frozen=True)
class DeviceBlock:
    """Devices ``first .. first + devices - 1``: their pairs, row offsets and local speaker ids."""

    first: int
    x: np.ndarray  # (pairs, d_x) float32, the enrollment model's side
    y: np.ndarray  # (pairs, d_y) float32, the runtime model's side
    starts: np.ndarray  # (devices + 1,) int64 row offsets, starts[0] == 0
    speaker: np.ndarray  # (pairs,) int64 device-local speaker ids (as in a shard)
    enroll_model: str
    runtime_model: str

    @property
    def devices(self) -> int:
        return int(self.starts.size - 1)

    @property
    def stop(self) -> int:
        """One past the last device's index."""
        return self.first + self.devices

    @property
    def pairs(self) -> int:
        return int(self.starts[-1])

    @property
    def n(self) -> np.ndarray:
        """Pairs per device."""
        return np.diff(self.starts)

    def device_of_row(self) -> np.ndarray:
        """The (global) device index of every row."""
        return np.repeat(np.arange(self.first, self.stop, dtype=np.int64), self.n)

    def shard(self, device: int) -> Shard:
        """Device ``device`` (a global index inside the block) as a validated shard."""
        if not self.first <= device < self.stop:
            raise IndexError(f"device {device} is not in this block ({self.first}..{self.stop - 1})")
        rows = slice(int(self.starts[device - self.first]), int(self.starts[device - self.first + 1]))
        return make_shard(self.x[rows], self.y[rows], self.speaker[rows], self.enroll_model, self.runtime_model)

    @classmethod
    def from_shards(cls, first: int, shards: Sequence[Shard]) -> DeviceBlock:
        """Concatenate consecutive devices' shards (same models and dimensions) into one block."""
        if not shards:
            raise ValueError("a block needs at least one device")
        n = np.array([s.n for s in shards], dtype=np.int64)
        return cls(first, np.concatenate([s.enroll for s in shards]), np.concatenate([s.runtime for s in shards]),
                   np.concatenate([[0], np.cumsum(n)]).astype(np.int64),
                   np.concatenate([s.speaker for s in shards]).astype(np.int64),
                   shards[0].enroll_model, shards[0].runtime_model)


def block_ranges(num_devices: int, devices_per_block: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks tiling ``0 .. num_devices - 1``."""
    if devices_per_block < 1:
        raise ValueError(f"devices_per_block must be >= 1, got {devices_per_block}")
    for start in range(0, num_devices, devices_per_block):
        yield start, min(start + devices_per_block, num_devices)


def iter_shard_blocks(folder: str | os.PathLike[str], devices_per_block: int) -> Iterator[DeviceBlock]:
    """Stream a shard folder as blocks of ``devices_per_block`` devices, reading each shard once.

    Device order is the file order (:func:`fed_nessa.data.shards.shard_paths`). Every shard gets
    the loader's checks, with the first shard's dimensions expected of all, and must name the
    first shard's two models: a fault raises :class:`ShardError` naming the file, when its block
    is reached (blocks before it have been yielded). Only one block's pairs are held at a time.
    """
    paths = shard_paths(folder)
    if not paths:
        raise ShardError(folder, "no shard files in the folder")
    first = load_shard(paths[0])
    for start, stop in block_ranges(len(paths), devices_per_block):
        shards = [first if i == 0 else _load_like(paths[i], first) for i in range(start, stop)]
        yield DeviceBlock.from_shards(start, shards)


def _load_like(path: os.PathLike[str], first: Shard) -> Shard:
    """Load one shard and check it is of the same models and dimensions as the folder's first."""
    shard = load_shard(path, expect_dx=first.d_x, expect_dy=first.d_y)
    if (shard.enroll_model, shard.runtime_model) != (first.enroll_model, first.runtime_model):
        raise ShardError(path, f"models ({shard.enroll_model}, {shard.runtime_model}) differ from the folder's "
                               f"first shard ({first.enroll_model}, {first.runtime_model})")
    return shard
