"""The one population type: a data source's train side, held-out set, validation set and devices."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fed_nessa.config import FederationConfig
from fed_nessa.data.datasets import EmbeddingSet
from fed_nessa.data.extract.evalset import write_eval_set
from fed_nessa.data.population import (
    EVAL_FILE,
    SCENARIO,
    Population,
    Scenario,
    federation_population,
    folder_federation,
    load_eval_file,
)
from fed_nessa.data.registry import load_federation_data, resolve
from fed_nessa.data.shards import Shard, make_shard, shard_paths

ENROLL, RUNTIME = "campp:aaaaaaaaaaaa", "vfl_dvec:bbbbbbbbbbbb"


def _shard(seed: int = 0, speakers: tuple[int, ...] = (0, 0, 0, 1, 1, 2, 2)) -> Shard:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(speakers), 6)).astype(np.float32)
    y = rng.standard_normal((len(speakers), 4)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return make_shard(x, y, np.array(speakers), ENROLL, RUNTIME)


def _held_out() -> EmbeddingSet:
    s = _shard(seed=9)
    return EmbeddingSet({"campp": s.enroll, "vfl_dvec": s.runtime}, s.speaker, s.speaker, [0, 1, 2, 0, 1, 0, 1],
                        {"campp": ENROLL, "vfl_dvec": RUNTIME}, "held-out")


def test_a_scenario_is_the_runtime_upgrade_unless_named() -> None:
    assert Scenario("old", "new") == Scenario("old", "new", SCENARIO) and SCENARIO == "runtime-upgrade"


def test_a_federation_keeps_its_devices_in_memory_or_writes_them(tmp_path: Path) -> None:
    devices = [_shard(0), _shard(1)]
    held, scenario = _held_out(), Scenario("campp", "vfl_dvec")
    memory = federation_population("src", devices, None, held, None, scenario)
    assert memory.devices == tuple(devices) and memory.shards == []
    assert (memory.d_x, memory.d_y, memory.enroll_model, memory.runtime_model) == (6, 4, ENROLL, RUNTIME)
    assert memory.evaluation() == (held, scenario)
    on_disk = federation_population("src", devices, tmp_path / "shards", held, held, scenario)
    assert on_disk.devices == () and on_disk.shards == shard_paths(tmp_path / "shards") and len(on_disk.shards) == 2
    assert on_disk.validation is held
    np.testing.assert_array_equal(on_disk.pooled()[0], np.concatenate([d.enroll for d in devices]))


def test_each_side_refuses_what_it_does_not_hold() -> None:
    """A centralised population has no scenario (the command names the models); a federation's train side
    is on its devices, never pooled on the server."""
    centralised = Population("c", None, train=_held_out())
    assert centralised.train_set() is centralised.train
    with pytest.raises(ValueError, match="c: no held-out evaluation set and scenario"):
        centralised.evaluation()
    federation = federation_population("f", [_shard()], None, _held_out(), None, Scenario("campp", "vfl_dvec"))
    with pytest.raises(ValueError, match="f: no pooled train side"):
        federation.train_set()
    with pytest.raises(ValueError, match="no device shards on the server"):
        federation.pooled()


def test_an_eval_file_is_a_held_out_set_and_its_scenario(tmp_path: Path) -> None:
    shard = _shard()
    held, scenario = load_eval_file(write_eval_set(shard, tmp_path / EVAL_FILE))
    assert scenario == Scenario(ENROLL, RUNTIME)
    np.testing.assert_array_equal(held.emb(ENROLL), shard.enroll)
    np.testing.assert_array_equal(held.emb(RUNTIME), shard.runtime)
    assert held.speaker.tolist() == shard.speaker.tolist() and held.utterance.tolist() == [0, 1, 2, 0, 1, 0, 1]


def test_a_broken_eval_file_names_itself(tmp_path: Path) -> None:
    """The held-out type's own checks (here a repeated row) come back as one error naming the file."""
    path = write_eval_set(_shard(), tmp_path / EVAL_FILE)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["utterance"] = np.zeros_like(arrays["utterance"])
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*duplicate \(speaker, utterance\)"):
        load_eval_file(path)


def test_a_shard_folder_federation_reads_its_eval_file(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    federation_population("src", [_shard(0), _shard(1)], folder, _held_out(), None, Scenario("campp", "vfl_dvec"))
    write_eval_set(_shard(5), folder / EVAL_FILE)
    pop = folder_federation(folder)
    held, scenario = pop.evaluation()
    assert scenario == Scenario(ENROLL, RUNTIME) and pop.validation is None and len(pop.shards) == 2
    assert (pop.d_x, pop.d_y, pop.enroll_model, pop.runtime_model, pop.name) == (6, 4, ENROLL, RUNTIME, str(folder))
    np.testing.assert_array_equal(held.emb(ENROLL), _shard(5).enroll)


def test_the_registry_returns_one_type_for_both_sides() -> None:
    centralised = resolve("synthetic", num_devices=8, seed=1)
    federation = load_federation_data(FederationConfig(num_devices=8, seed=1), None)
    assert type(centralised) is type(federation) is Population
    assert centralised.train is not None and centralised.held_out is not None and centralised.scenario is None
    held, scenario = federation.evaluation()
    assert len(federation.devices) == 8 and scenario.name == SCENARIO
    assert {scenario.old_model, scenario.new_model} <= set(held.models)
