"""Where a device's shard and privacy ledger live, and which round logic it runs.

One ClientApp serves two worlds:

* **deployment**: a real SuperNode started with
  ``--node-config "shard-path='...' state-dir='...'"``: the shard file (or a
  folder holding exactly one shard) and the folder that keeps the device's
  privacy ledger across process restarts;
* **simulation** (Flower's engine or :mod:`simulations.grid`): the node config
  holds only ``partition-id``; the device is the ``partition-id``-th shard of
  the run's shard folder (``data-source`` when it is a folder, else
  ``<run-dir>/shards`` written by the server before round 1) and its ledger
  lives in ``<run-dir>/devices/<device_id>/``.

The round maths is the lead's ``fed_nessa.rounds`` (``plan_round`` /
``client_round``) and the ledger is ``fed_nessa.privacy.ledger.DeviceLedger``;
:class:`DeviceRuntime` binds them lazily so tests can inject their own.
"""

from __future__ import annotations

import functools

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common.constant import PARTITION_ID_KEY

from fed_nessa.config import BUILTIN_DATA_SOURCES, FederationConfig
from fed_nessa.shards import SHARD_SUFFIX, Shard, ShardError, load_shard, shard_paths

SHARD_PATH_KEY = "shard-path"
STATE_DIR_KEY = "state-dir"
DEVICE_ID_KEY = "device-id"


@dataclass(frozen=True)
class DevicePaths:
    """The files of one device: its shard, its ledger folder, and its stable id."""

    device_id: str
    shard: Path
    state_dir: Path


def shard_folder(cfg: FederationConfig) -> Path:
    """The run's shard folder in simulation (same rule on server and clients)."""
    if cfg.data_source not in BUILTIN_DATA_SOURCES:
        return Path(cfg.data_source)
    return Path(cfg.run_dir) / "shards"


def device_id_of(shard_path: Path) -> str:
    """A device's id: its shard file name without the suffix (stable across restarts)."""
    name = shard_path.name
    return name[: -len(SHARD_SUFFIX)] if name.endswith(SHARD_SUFFIX) else shard_path.stem


def _single_shard(path: Path) -> Path:
    if path.is_dir():
        found = shard_paths(path)
        if len(found) != 1:
            raise ShardError(path, f"expected exactly one *{SHARD_SUFFIX} in the folder, found {len(found)}")
        return found[0]
    return path


def _partition_table(folder: Path) -> tuple[Path, ...]:
    """The folder's sorted shard list, listed once per change of the folder (not once per message).

    Globbing and sorting N paths for each of N devices' messages made a 1000-device round
    quadratic in the fleet; the directory's mtime changes whenever a shard is added or removed.
    """
    if not folder.is_dir():
        return tuple(shard_paths(folder))  # raises the clear "shard folder not found" error
    return _listed(str(folder), folder.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _listed(folder: str, mtime_ns: int) -> tuple[Path, ...]:
    return tuple(shard_paths(folder))


def locate(node_config: dict[str, Any], cfg: FederationConfig) -> DevicePaths:
    """Resolve this node's shard and ledger folder from its node config (see module doc)."""
    if SHARD_PATH_KEY in node_config:
        shard = _single_shard(Path(str(node_config[SHARD_PATH_KEY])))
        if STATE_DIR_KEY not in node_config:
            raise ValueError(f"node config has {SHARD_PATH_KEY!r} but no {STATE_DIR_KEY!r} for the privacy ledger")
        device_id = str(node_config.get(DEVICE_ID_KEY) or device_id_of(shard))
        return DevicePaths(device_id, shard, Path(str(node_config[STATE_DIR_KEY])))
    if PARTITION_ID_KEY not in node_config:
        raise ValueError(f"node config has neither {SHARD_PATH_KEY!r} nor {PARTITION_ID_KEY!r}: no shard to train on")
    pid = int(node_config[PARTITION_ID_KEY])
    shards = _partition_table(shard_folder(cfg))
    if not 0 <= pid < len(shards):
        raise ShardError(shard_folder(cfg), f"no shard for partition {pid} ({len(shards)} shard(s) in the folder)")
    device_id = device_id_of(shards[pid])
    return DevicePaths(device_id, shards[pid], Path(cfg.run_dir) / "devices" / device_id)


@dataclass(frozen=True)
class DeviceRuntime:
    """The device-side operations the ClientApp delegates to (injectable for tests)."""

    plan_round: Callable[..., Any]
    client_round: Callable[..., Any]
    open_ledger: Callable[[Path, str], Any]
    load_shard: Callable[[Path], Shard] = load_shard


def default_runtime() -> DeviceRuntime:
    """The production runtime: the lead's round maths and the persistent device ledger."""
    from fed_nessa import rounds
    from fed_nessa.privacy.ledger import DeviceLedger

    def open_ledger(folder: Path, device_id: str) -> Any:
        folder.mkdir(parents=True, exist_ok=True)
        return DeviceLedger.open(folder, device_id)

    return DeviceRuntime(plan_round=rounds.plan_round, client_round=rounds.client_round, open_ledger=open_ledger)
