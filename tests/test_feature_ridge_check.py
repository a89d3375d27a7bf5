"""simulations/feature_ridge_check.py: the noise-free random-feature ridge behind issue 20's linear-ceiling finding."""

from __future__ import annotations

import numpy as np

from fed_nessa.data.synthetic import generate_population
from fed_nessa.federated import suffstats
from simulations.feature_ridge_check import check, feature_sets, fit, markdown


def test_the_linear_row_is_the_protocols_noise_free_start() -> None:
    pop = generate_population(6, seed=1, eval_speakers=10, eval_utterances=6)
    x = np.concatenate([d.enroll for d in pop.devices])
    y = np.concatenate([d.runtime for d in pop.devices])
    model = fit(feature_sets(y.shape[1], [], [])["linear"], x, y)
    gram, cross = suffstats.unpack(suffstats.device_vector(x, y), x.shape[1], y.shape[1])
    w, b = suffstats.solve(gram, cross, suffstats.DEFAULT_ALPHA)
    np.testing.assert_allclose(model.w, w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.b, b, rtol=1e-4, atol=1e-5)


def test_every_feature_set_keeps_y_and_adds_its_own_columns() -> None:
    sets = feature_sets(5, [3], [4])
    y = np.random.default_rng(0).standard_normal((7, 5))
    assert list(sets) == ["linear", "relu-3", "abs-3", "quad-4"]
    assert [sets[k](y).shape[1] for k in sets] == [5, 8, 8, 5 + 10]
    for phi in sets.values():
        np.testing.assert_array_equal(phi(y)[:, :5], y)
    assert np.all(sets["abs-3"](-y)[:, 5:] == sets["abs-3"](y)[:, 5:])  # the abs features are even


def test_the_table_has_one_row_per_feature_set() -> None:
    rows = check(8, 1, [4], [])
    assert [r.features for r in rows] == ["linear", "relu-4", "abs-4"]
    assert [r.size for r in rows] == [192, 196, 196]
    assert all(0.0 <= r.eer <= 1.0 for r in rows)
    assert markdown(rows, 8, 1).count("\n| ") == 1 + 3  # the header and three rows
