"""Shard folders streamed block by block, and the pooled references' bounded uniform subsample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fed_nessa.data import blocks as blocks_module
from fed_nessa.data.blocks import DeviceBlock, iter_shard_blocks
from fed_nessa.data.datasets import write_devices
from fed_nessa.data.lazy_population import LazyPopulation
from fed_nessa.data.pooled_sample import pair_keys, pooled_subsample
from fed_nessa.data.shards import ShardError, make_shard, shard_paths, write_shard


@pytest.fixture(scope="module")
def lazy() -> LazyPopulation:
    return LazyPopulation.create(10, seed=4)


@pytest.fixture()
def folder(tmp_path: Path, lazy: LazyPopulation) -> Path:
    write_devices([lazy.device(j) for j in range(10)], tmp_path / "fleet")
    return tmp_path / "fleet"


def test_a_shard_folder_streams_as_the_same_blocks_reading_each_shard_once(
        folder: Path, lazy: LazyPopulation, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real = blocks_module.load_shard
    monkeypatch.setattr(blocks_module, "load_shard", lambda p, **kw: reads.append(Path(p).name) or real(p, **kw))
    streamed = list(iter_shard_blocks(folder, 4))
    assert [(b.first, b.stop) for b in streamed] == [(0, 4), (4, 8), (8, 10)]
    assert sorted(reads) == sorted(p.name for p in shard_paths(folder)) and len(reads) == 10
    for got, want in zip(streamed, lazy.blocks(4)):
        for name in ("x", "y", "starts", "speaker"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        assert (got.enroll_model, got.runtime_model) == (want.enroll_model, want.runtime_model)


def test_a_bad_shard_is_named_when_its_block_is_reached(folder: Path, lazy: LazyPopulation) -> None:
    paths = shard_paths(folder)
    paths[6].write_bytes(paths[6].read_bytes()[:100])
    stream = iter_shard_blocks(folder, 4)
    assert next(stream).first == 0
    with pytest.raises(ShardError, match=f"{paths[6].name}: unreadable or truncated"):
        next(stream)


def test_a_shard_of_other_models_or_dimensions_is_refused(folder: Path, lazy: LazyPopulation) -> None:
    paths = shard_paths(folder)
    dev = lazy.device(2)
    write_shard(paths[2], make_shard(dev.enroll, dev.runtime, dev.speaker, "other-old", dev.runtime_model))
    with pytest.raises(ShardError, match=f"{paths[2].name}: models .* differ from the folder's first shard"):
        list(iter_shard_blocks(folder, 4))
    write_shard(paths[2], make_shard(dev.enroll[:, :100], dev.runtime, dev.speaker, dev.enroll_model,
                                     dev.runtime_model))
    with pytest.raises(ShardError, match="wrong enrollment dimension: 100"):
        list(iter_shard_blocks(folder, 4))


def test_an_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="no shard files"):
        list(iter_shard_blocks(tmp_path, 4))
    with pytest.raises(ValueError, match="devices_per_block must be >= 1"):
        list(blocks_module.block_ranges(3, 0))


def _toy_blocks(n: list[int], per_block: int) -> list[DeviceBlock]:
    """Tiny blocks whose x encodes (device, row) as (device + 1, row + 1) (a shard refuses all-zero rows),
    to check which pairs a sample holds."""
    out = []
    for first in range(0, len(n), per_block):
        shards = []
        for j in range(first, min(first + per_block, len(n))):
            rows = np.arange(n[j])
            x = np.c_[np.full(n[j], j + 1), rows + 1].astype(np.float32)
            shards.append(make_shard(x, -x, np.zeros(n[j]), "a", "b"))
        out.append(DeviceBlock.from_shards(first, shards))
    return out


def test_the_subsample_is_bounded_reproducible_and_independent_of_the_blocking() -> None:
    n = [5, 1, 30, 7, 12, 3, 40, 2]
    a = pooled_subsample(_toy_blocks(n, 3), limit=25, seed=7)
    b = pooled_subsample(_toy_blocks(n, 1), limit=25, seed=7)
    c = pooled_subsample(_toy_blocks(n, 8), limit=25, seed=8)
    assert a.x.shape == (25, 2) and a.total_pairs == sum(n) and a.fraction == 25 / sum(n)
    for name in ("x", "y", "device", "row"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.x, c.x)
    np.testing.assert_array_equal(a.x, np.c_[a.device + 1, a.row + 1])  # each row is the pair it names
    assert np.all(np.diff(a.device * 100 + a.row) > 0)  # in (device, row) order, no repeats
    assert "25 of 100 pairs (25.00%; at most 25; seed 7)" in a.describe()
    everything = pooled_subsample(_toy_blocks(n, 3), limit=1000, seed=1)
    np.testing.assert_array_equal(everything.x, np.concatenate([blk.x for blk in _toy_blocks(n, 8)]))
    with pytest.raises(ValueError, match="limit >= 1"):
        pooled_subsample(_toy_blocks(n, 3), limit=0)


def test_the_subsample_is_uniform_over_pairs() -> None:
    """Every pair is kept with probability limit / total (over seeds), whatever its device's size."""
    n = [1, 2, 50, 10, 37]
    blocks = _toy_blocks(n, 2)
    total, limit, seeds = sum(n), 20, 2000
    hits = np.zeros(total)
    offsets = np.concatenate([[0], np.cumsum(n)])
    for seed in range(seeds):
        s = pooled_subsample(blocks, limit=limit, seed=seed)
        np.add.at(hits, offsets[s.device] + s.row, 1)
    p = limit / total
    z = (hits - seeds * p) / np.sqrt(seeds * p * (1 - p))
    assert np.abs(z).max() < 4.5, z
    keys = pair_keys(np.repeat(np.arange(5), n), np.concatenate([np.arange(k) for k in n]), seed=3)
    assert np.unique(keys).size == total


def test_a_lazy_fleet_and_its_shard_folder_give_the_same_sample(folder: Path, lazy: LazyPopulation) -> None:
    streamed = pooled_subsample(iter_shard_blocks(folder, 4), limit=300, seed=2)
    generated = pooled_subsample(lazy.blocks(3), limit=300, seed=2)
    assert streamed.x.shape[0] == 300 and streamed.total_pairs == generated.total_pairs
    for name in ("x", "y", "device", "row"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(generated, name))
