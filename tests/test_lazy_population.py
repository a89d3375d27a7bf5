"""The lazy synthetic population: device j from (seed, world, j), blocks, and today's distribution."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import stats

from fed_nessa.data.blocks import DeviceBlock
from fed_nessa.data.lazy_population import LazyPopulation
from fed_nessa.data.synthetic import EVAL_SPEAKER_OFFSET, NEW, OLD, generate_population
from fed_nessa.evaluation.protocol import evaluate_trials


@pytest.fixture(scope="module")
def lazy() -> LazyPopulation:
    return LazyPopulation.create(40, seed=5, chunk_devices=7)


@pytest.fixture(scope="module")
def whole(lazy: LazyPopulation) -> DeviceBlock:
    return lazy.block(0, lazy.num_devices)


def _same_device(a: DeviceBlock, b: DeviceBlock, j: int) -> None:
    sa, sb = a.shard(j), b.shard(j)
    assert np.array_equal(sa.enroll, sb.enroll) and np.array_equal(sa.runtime, sb.runtime)
    assert np.array_equal(sa.speaker, sb.speaker)


def test_a_device_is_bit_identical_alone_or_in_any_block(lazy: LazyPopulation, whole: DeviceBlock) -> None:
    alone_pop = LazyPopulation(lazy.config, chunk_devices=256)  # other chunking too
    one_chunk = alone_pop.block(0, lazy.num_devices)
    for j in (0, 6, 7, 13, 39):
        alone = lazy.device(j)
        assert np.array_equal(alone.enroll, whole.shard(j).enroll)
        assert np.array_equal(alone.runtime, whole.shard(j).runtime)
        _same_device(whole, one_chunk, j)
    inner = LazyPopulation(lazy.config, chunk_devices=3).block(11, 29)
    for j in range(11, 29):
        _same_device(whole, inner, j)


def test_blocks_tile_the_fleet(lazy: LazyPopulation, whole: DeviceBlock) -> None:
    blocks = list(lazy.blocks(9))
    assert [(b.first, b.stop) for b in blocks] == [(0, 9), (9, 18), (18, 27), (27, 36), (36, 40)]
    assert np.array_equal(np.concatenate([b.x for b in blocks]), whole.x)
    assert np.array_equal(np.concatenate([b.y for b in blocks]), whole.y)
    assert np.array_equal(np.concatenate([b.n for b in blocks]), whole.n)
    assert whole.starts[0] == 0 and whole.starts[-1] == whole.x.shape[0] == whole.y.shape[0]
    with pytest.raises(IndexError, match="outside the fleet"):
        lazy.block(30, 41)


def test_same_draws_as_todays_fleet_to_float32_rounding(lazy: LazyPopulation, whole: DeviceBlock) -> None:
    """Same streams, same equations: today's device j, up to BLAS rounding (not bit for bit)."""
    eager = generate_population(40, seed=5, validation_speakers=20)
    worst = 0.0
    for j, shard in enumerate(eager.devices):
        mine = whole.shard(j)
        assert np.array_equal(mine.speaker, shard.speaker)
        assert (mine.enroll_model, mine.runtime_model) == (shard.enroll_model, shard.runtime_model)
        worst = max(worst, float(np.abs(mine.enroll - shard.enroll).max()),
                    float(np.abs(mine.runtime - shard.runtime).max()))
    assert worst < 1e-6
    # The world is the same, so today's evaluation and validation speakers still apply, bit for bit.
    assert lazy.model_ids == eager.model_ids
    for m in (OLD, NEW):
        np.testing.assert_array_equal(lazy.eval_set().emb(m), eager.eval.emb(m))
        np.testing.assert_array_equal(lazy.validation_set(20).emb(m), eager.validation.emb(m))


def test_speaker_ids_are_fleet_wide_and_below_the_evaluation_speakers(lazy: LazyPopulation,
                                                                      whole: DeviceBlock) -> None:
    ids = lazy.speaker_ids(whole)
    per_device = [np.unique(ids[whole.starts[j]:whole.starts[j + 1]]) for j in range(lazy.num_devices)]
    assert sum(u.size for u in per_device) == np.unique(ids).size  # no id shared by two devices
    assert ids.max() < EVAL_SPEAKER_OFFSET <= lazy.eval_set().speaker.min()
    block = lazy.block(20, 30)
    np.testing.assert_array_equal(lazy.speaker_ids(block), ids[whole.starts[20]:whole.starts[30]])
    with pytest.raises(ValueError, match="evaluation speakers' ids"):
        LazyPopulation.create(EVAL_SPEAKER_OFFSET // 6 + 1)


def _cosines(x: np.ndarray, speaker: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of random same-speaker and different-speaker pairs of rows."""
    i, j = rng.integers(0, len(x), size=(2, 20000))
    cos = np.einsum("ij,ij->i", x[i], x[j])
    same = (speaker[i] == speaker[j]) & (i != j)
    return cos[same], cos[speaker[i] != speaker[j]]


def _ridge_eer(x: np.ndarray, y: np.ndarray, ev_x: np.ndarray, ev_y: np.ndarray, ev) -> tuple[float, float]:  # noqa: ANN001
    """Cross-model ridge (runtime -> enrollment side) fitted on the pairs: held-out EER and mean cosine."""
    a = np.c_[y, np.ones(len(y))].astype(np.float64)
    w = np.linalg.solve(a.T @ a + 1e-3 * len(a) / a.shape[1] * np.eye(a.shape[1]), a.T @ x)
    pred = (np.c_[ev_y, np.ones(len(ev_y))] @ w).astype(np.float32)
    cos = np.einsum("ij,ij->i", pred / np.linalg.norm(pred, axis=1, keepdims=True), ev_x).mean()
    return evaluate_trials(ev_x, pred, ev.speaker, ev.utterance, k=10).eer, float(cos)


def test_same_distribution_as_todays_generator() -> None:
    """Independent draws (other seeds): households, cosines and the cross-model fit agree."""
    eager = generate_population(300, seed=11)
    lazy = LazyPopulation.create(300, seed=12)
    block = lazy.block(0, 300)
    ev = eager.eval
    n_eager = np.array([d.n for d in eager.devices])
    k_eager = np.array([d.num_speakers for d in eager.devices])
    k_lazy = np.array([np.unique(block.speaker[block.starts[j]:block.starts[j + 1]]).size for j in range(300)])
    assert stats.ks_2samp(n_eager, block.n).pvalue > 0.01
    assert stats.ks_2samp(k_eager, k_lazy).pvalue > 0.01
    rng = np.random.default_rng(0)
    eager_x = np.concatenate([d.enroll for d in eager.devices])
    eager_y = np.concatenate([d.runtime for d in eager.devices])
    eager_spk = np.repeat(np.arange(300), n_eager) * 6 + np.concatenate([d.speaker for d in eager.devices])
    lazy_spk = lazy.speaker_ids(block)
    for a, b in ((eager_x, block.x), (eager_y, block.y)):
        for ce, cl in zip(_cosines(a, eager_spk, rng), _cosines(b, lazy_spk, rng)):
            se = np.hypot(ce.std() / np.sqrt(ce.size), cl.std() / np.sqrt(cl.size))
            assert abs(ce.mean() - cl.mean()) < 4 * se, (ce.mean(), cl.mean(), se)
    ev_x, ev_y = ev.emb(OLD), ev.emb(NEW)
    eer_e, cos_e = _ridge_eer(eager_x, eager_y, ev_x, ev_y, ev)
    eer_l, cos_l = _ridge_eer(block.x, block.y, ev_x, ev_y, ev)
    assert abs(eer_e - eer_l) < 0.015 and abs(cos_e - cos_l) < 0.01, (eer_e, eer_l, cos_e, cos_l)


def _peak_streaming(devices: int) -> int:
    """Peak traced bytes while visiting a fleet block by block (holding nothing between blocks)."""
    pop = LazyPopulation.create(devices, seed=3, chunk_devices=8)
    tracemalloc.start()
    pairs = 0
    for block in pop.blocks(16):
        pairs += block.pairs
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert pairs > devices * 20
    return peak


def test_memory_does_not_grow_with_the_fleet() -> None:
    small, large = _peak_streaming(32), _peak_streaming(256)
    assert large < 1.5 * small, (small, large)
