"""Held-out shard -> the server's eval.npz: readable by the server and usable by the evaluation protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fed_nessa.data.extract.evalset import eval_arrays, write_eval_set
from fed_nessa.data.shards import make_shard


def _shard(enroll_model: str = "campp:aaaaaaaaaaaa", runtime_model: str = "vfl_dvec:bbbbbbbbbbbb"):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 192)).astype(np.float32)
    y = rng.standard_normal((7, 256)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return make_shard(x, y, np.array([0, 0, 0, 1, 1, 2, 2]), enroll_model, runtime_model)


def test_utterance_index_restarts_per_speaker_and_models_are_named() -> None:
    arrays = eval_arrays(_shard())
    assert arrays["utterance"].tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert arrays["speaker"].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert str(arrays["old_model"]) == "campp:aaaaaaaaaaaa" and str(arrays["new_model"]) == "vfl_dvec:bbbbbbbbbbbb"
    assert arrays["emb:campp:aaaaaaaaaaaa"].shape == (7, 192) and arrays["emb:vfl_dvec:bbbbbbbbbbbb"].shape == (7, 256)


def test_the_server_reads_it(tmp_path: Path) -> None:
    from fed_nessa.data.population import load_eval_file

    shard = _shard()
    ev, scenario = load_eval_file(write_eval_set(shard, tmp_path / "eval.npz"))
    assert (scenario.old_model, scenario.new_model) == (shard.enroll_model, shard.runtime_model)
    np.testing.assert_array_equal(ev.emb(shard.enroll_model), shard.enroll)
    np.testing.assert_array_equal(ev.emb(shard.runtime_model), shard.runtime)
    np.testing.assert_array_equal(ev.speaker, shard.speaker)


def test_rejects_same_model_and_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two different models"):
        eval_arrays(_shard("m:1", "m:1"))
    with pytest.raises(ValueError, match=r"must end with '\.npz'"):
        write_eval_set(_shard(), tmp_path / "eval.json")
    assert not list(tmp_path.iterdir())
