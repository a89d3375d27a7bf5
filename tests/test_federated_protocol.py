"""The wire contract's shard rule: where a device's shard and ledger are, and its stable id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY

from fed_nessa.config import FederationConfig
from fed_nessa.data.shards import ShardError, make_shard, write_shard
from fed_nessa.federated.protocol import (
    DEVICE_ID_KEY,
    DEVICES_DIR,
    SHARD_PATH_KEY,
    SHARDS_DIR,
    STATE_DIR_KEY,
    device_id_of,
    locate,
    shard_folder,
)


def _write(folder: Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        write_shard(folder / f"{name}.shard.safetensors",
                    make_shard(rng.normal(size=(3, 4)), rng.normal(size=(3, 5)), np.arange(3), "x", "y"))


def test_simulation_devices_are_the_sorted_shards_of_the_folder(tmp_path: Path) -> None:
    _write(tmp_path / "data", ["dev-b", "dev-a"])
    cfg = FederationConfig().replace(data_source=str(tmp_path / "data"), run_dir=str(tmp_path / "run"))
    assert shard_folder(cfg) == tmp_path / "data"
    assert shard_folder(cfg.replace(data_source="synthetic")) == tmp_path / "run" / SHARDS_DIR
    paths = locate({PARTITION_ID_KEY: 0, NUM_PARTITIONS_KEY: 2}, cfg)
    assert paths.device_id == "dev-a" and paths.shard.name == "dev-a.shard.safetensors"
    assert paths.state_dir == tmp_path / "run" / DEVICES_DIR / "dev-a"
    with pytest.raises(ShardError, match="no shard for partition 2"):
        locate({PARTITION_ID_KEY: 2}, cfg)
    with pytest.raises(ValueError, match="no shard to train on"):
        locate({}, cfg)


def test_deployment_devices_name_their_shard_and_state_folder(tmp_path: Path) -> None:
    _write(tmp_path / "mine", ["dev-7"])
    cfg = FederationConfig()
    shard = tmp_path / "mine" / "dev-7.shard.safetensors"
    assert device_id_of(shard) == "dev-7"
    for where in (shard, tmp_path / "mine"):  # a file, or a folder holding exactly one
        paths = locate({SHARD_PATH_KEY: str(where), STATE_DIR_KEY: str(tmp_path / "st")}, cfg)
        assert (paths.device_id, paths.shard, paths.state_dir) == ("dev-7", shard, tmp_path / "st")
    named = locate({SHARD_PATH_KEY: str(shard), STATE_DIR_KEY: "st", DEVICE_ID_KEY: "phone-1"}, cfg)
    assert named.device_id == "phone-1"
    with pytest.raises(ValueError, match="no 'state-dir'"):
        locate({SHARD_PATH_KEY: str(shard)}, cfg)
    _write(tmp_path / "mine", ["dev-8"])
    with pytest.raises(ShardError, match="exactly one"):
        locate({SHARD_PATH_KEY: str(tmp_path / "mine"), STATE_DIR_KEY: "st"}, cfg)
