"""The centralised result tables' pure parts: voice folds, the DP width, table and summary formatting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from fed_nessa.evaluation.centralised import CentralisedConfig
from fed_nessa.evaluation.reference_tables import (
    dp_hidden,
    hunger_markdown,
    hunger_summary,
    mean_table_markdown,
    voice_folds,
)


@dataclass
class _Set:
    voice: np.ndarray

    def subset(self, mask: np.ndarray) -> _Set:
        return _Set(self.voice[mask])


def test_every_voice_is_held_out_exactly_once_and_never_trained_on() -> None:
    es = _Set(np.repeat(np.arange(7), 3))
    folds = voice_folds(es, 3, seed=1)
    held = np.concatenate([np.unique(f.test.voice) for f in folds])
    assert sorted(held) == list(range(7))
    for f in folds:
        assert not set(f.train.voice) & set(f.test.voice)
        assert len(f.train.voice) + len(f.test.voice) == len(es.voice)
    assert [f.name for f in folds] == ["fold0", "fold1", "fold2"]


@pytest.mark.parametrize("n_folds", [1, 8])
def test_a_fold_count_outside_two_to_the_voices_is_one_clear_error(n_folds: int) -> None:
    with pytest.raises(ValueError, match=rf"folds must be in \[2, 7\] for 7 voices, got {n_folds}"):
        voice_folds(_Set(np.repeat(np.arange(7), 3)), n_folds)


def test_the_dp_residual_is_at_most_64_wide() -> None:
    cfg = CentralisedConfig()
    assert dp_hidden(cfg) == min(cfg.nessa.hidden, 64)


def _metric(mean: float, std: float = 0.0, folds: int = 1) -> dict[str, Any]:
    return {"mean": mean, "std": std, "folds": folds}


def test_the_mean_table_shows_std_only_over_several_folds_and_flags_a_negative_gap() -> None:
    row = {"eer": _metric(0.1234, 0.01, 3), "min_dcf": _metric(0.5), "sid_top1": _metric(0.9),
           "gap_closure": _metric(-0.25)}
    result = {"old_model": "a", "new_model": "b", "scenarios": {"runtime-upgrade": {"mean": {"asym_nessa": row}}}}
    text = mean_table_markdown(result, "T")
    assert "### runtime-upgrade (a -> b), mean over 3 voice folds" in text
    assert "| asym_nessa | 12.34 ± 1.00 | 0.500 | 90.0 | -0.25 (worse than not updating) |" in text
    single = {**row, "eer": _metric(0.1234, 0.01, 1), "gap_closure": None}
    result["scenarios"]["runtime-upgrade"]["mean"] = {"asym_nessa": single}
    text = mean_table_markdown(result, "T")
    assert "held-out speakers" in text and "| asym_nessa | 12.34 | 0.500 | 90.0 | n/a |" in text


def test_the_hunger_summary_averages_over_splits_per_voices_data_and_method() -> None:
    rows = [{"split": s, "voices": 5, "data": "voices", "method": "ridge", "speakers": 5 + i, "pairs": 50 + i,
             "eer": e, "gap_closure": None} for i, (s, e) in enumerate([("fold0", 0.2), ("fold1", 0.4)])]
    [summary] = hunger_summary(rows)
    assert summary == {"voices": 5, "data": "voices", "method": "ridge", "eer_mean": pytest.approx(0.3),
                       "eer_std": pytest.approx(0.1), "splits": 2, "speakers": 5, "pairs": 50}
    assert "| 5 | voices | 5 | 50 | ridge | 30.00 ± 10.00 |" in hunger_markdown([summary], "H")
