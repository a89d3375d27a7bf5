"""The wire contract between ``server/`` and ``client/``: message keys, node-config keys, shard rule.

Both Flower apps import this module and nothing of each other, so a key is named once.

Messages per round:

* ``query`` with config record :data:`PLAN_RECORD`: ``phase``, ``round``,
  :data:`PROMISED_ARRIVALS_KEY` (g, the fewest arrivals the server will unmask), the
  federation's model ids (:data:`ENROLL_MODEL_KEY`, :data:`RUNTIME_MODEL_KEY`) and the
  fleet size (public; with the run config it fixes the Poisson rate and the calibrated
  sigmas, which every device accounts for as it uses them; it never sizes a noise share). The device
  answers ``status`` (:class:`~fed_nessa.config.ReplyStatus`), ``device_id`` and the
  :data:`REPLY_METRIC_KEYS`.
* ``train`` (SecAgg+ stages): the same three keys plus the codec in the fit config.
* A DP-SGD round may add the adaptive clip's C_t (:data:`CLIP_KEY`) and the loss centre
  (:data:`LOSS_CENTRE_KEY`), both public.

Node config (``--node-config`` in deployment; built per virtual device in simulation):
:data:`SHARD_PATH_KEY` / :data:`STATE_DIR_KEY` / :data:`DEVICE_ID_KEY` locate the device's
files; the keys of :data:`fed_nessa.config.POLICY_KEYS` are its own privacy policy.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.constant import NUM_PARTITIONS_KEY as NUM_PARTITIONS_KEY
from flwr.common.constant import PARTITION_ID_KEY as PARTITION_ID_KEY

from fed_nessa.config import FEDERATION_NAMES, FederationConfig
from fed_nessa.data.shards import SHARD_SUFFIX, ShardError, shard_paths
from fed_nessa.privacy.ledger import DEVICE_LEDGER_NAME, device_id_problem, device_key_folder

PLAN_RECORD = "plan"
PHASE_KEY = "phase"
ROUND_KEY = "round"
PROMISED_ARRIVALS_KEY = "guaranteed-arrivals"
FLEET_SIZE_KEY = "fleet-size"
STATUS_KEY = "status"
DEVICE_ID_REPLY_KEY = "device_id"
#: The server's federation-ledger key fingerprint, in every round config: a device pins the first
#: one it records and declines a round whose fingerprint differs.
SERVER_KEY_FINGERPRINT_KEY = "server-key-fingerprint"
#: The device's ledger key fingerprint, in its plan reply: the server pins it at first sight.
KEY_FINGERPRINT_REPLY_KEY = "key_fingerprint"
#: The federation's model ids (enrollment and runtime side), in every round config: a device whose
#: shard was embedded with other models declines the round before anything is reserved.
ENROLL_MODEL_KEY = "enroll-model-id"
RUNTIME_MODEL_KEY = "runtime-model-id"
#: The round's clip C_t under adaptive clipping (public: post-processing of released bit sums), in the
#: round config of every DP-SGD round of such a run; a device clips its delta to it and sizes its noise by it.
CLIP_KEY = "clip-norm"
#: A DP-SGD round's centre for the devices' loss (``loss-centre``): d_x float64s as bytes, public (released statistics).
LOSS_CENTRE_KEY = "loss-centre"
#: The device's ledger head after its round (seq and SHA-256 of its last entry), in its ``train`` reply:
#: the server signs it into the round's federation-ledger entry, anchoring the device ledger's tail.
LEDGER_SEQ_REPLY_KEY = "ledger_seq"
LEDGER_HEAD_REPLY_KEY = "ledger_head"
#: The only metrics a device's reply may carry (anything else is dropped on the device).
#: ``noise_arrivals`` is the g the device sized its noise share for (its policy's, public);
#: ``key_fingerprint`` is its ledger's public-key fingerprint (public); the ledger head is a
#: hash of signed entries the auditor reads anyway (public).
REPLY_METRIC_KEYS = frozenset({"epsilon_spent", "epsilon_if_run", "reason", "noise_arrivals",
                               KEY_FINGERPRINT_REPLY_KEY, LEDGER_SEQ_REPLY_KEY, LEDGER_HEAD_REPLY_KEY})

SHARD_PATH_KEY = "shard-path"
STATE_DIR_KEY = "state-dir"
DEVICE_ID_KEY = "device-id"
SHARDS_DIR = "shards"
DEVICES_DIR = "devices"
# Where each device's ledger lies in a run folder; summary.json records this pattern and the number
# of ledgers, not one path per device (80 % of a 30k-device summary).
DEVICE_LEDGER_PATTERN = f"{DEVICES_DIR}/{{device_id}}/{DEVICE_LEDGER_NAME}"


def round_config(phase: str, round_num: int, promised: int, fleet: int,
                 server_key_fingerprint: str | None = None, enroll_model: str | None = None,
                 runtime_model: str | None = None) -> dict[str, Any]:
    """What every device of a round is told (plan and fit config alike; the fit config adds the codec).

    ``enroll_model`` / ``runtime_model`` are the federation's model ids (public): a device checks
    them against its shard's. A key left out (None) is not on the wire and not checked. An adaptive
    clip's round adds its C_t (:func:`with_clip`).
    """
    config: dict[str, Any] = {PHASE_KEY: str(phase), ROUND_KEY: round_num, PROMISED_ARRIVALS_KEY: promised,
                              FLEET_SIZE_KEY: fleet}
    if server_key_fingerprint is not None:
        config[SERVER_KEY_FINGERPRINT_KEY] = server_key_fingerprint
    if enroll_model is not None:
        config[ENROLL_MODEL_KEY] = str(enroll_model)
    if runtime_model is not None:
        config[RUNTIME_MODEL_KEY] = str(runtime_model)
    return config


def with_clip(config: dict[str, Any], clip: float | None) -> dict[str, Any]:
    """``config`` stating the round's adaptive clip C_t (unchanged at a fixed clip: None)."""
    return config if clip is None else {**config, CLIP_KEY: float(clip)}


def request_clip(config: dict[str, Any]) -> float | None:
    """The round's clip as a round config states it (None: not stated; the run's fixed clip)."""
    value = config.get(CLIP_KEY)
    return None if value is None else float(value)


def with_centre(config: dict[str, Any], centre: np.ndarray | None) -> dict[str, Any]:
    """``config`` stating the round's loss centre (unchanged without one: None), as little-endian float64 bytes:
    a fit config travels as Flower's legacy ``Config``, whose values are scalars (bytes, not lists)."""
    if centre is None:
        return config
    return {**config, LOSS_CENTRE_KEY: np.asarray(centre, dtype="<f8").reshape(-1).tobytes()}


def request_centre(config: Mapping[str, Any]) -> np.ndarray | None:
    """The round's loss centre as a round config states it (None: not stated; the plain cosine loss)."""
    value = config.get(LOSS_CENTRE_KEY)
    if value is None:
        return None
    if not isinstance(value, bytes | bytearray) or len(value) % 8:
        raise ValueError(f"round config key {LOSS_CENTRE_KEY!r} is not float64 bytes: {str(value)[:60]!r}")
    return np.frombuffer(bytes(value), dtype="<f8").astype(np.float64)


@dataclass(frozen=True)
class DevicePaths:
    """The files of one device: its shard, its ledger folder, its stable id and its private-key folder.

    ``key_dir`` is the state dir in deployment (the node's own data folder) and the run's key
    store in simulation (:func:`fed_nessa.privacy.ledger.device_key_folder`): never the run folder.
    """

    device_id: str
    shard: Path
    state_dir: Path
    key_dir: Path | None = None


def shard_folder(cfg: FederationConfig) -> Path:
    """The run's shard folder in simulation (same rule on server and clients)."""
    if cfg.data_source not in FEDERATION_NAMES:
        return Path(cfg.data_source)
    return Path(cfg.run_dir) / SHARDS_DIR


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
    """Resolve this node's shard and ledger folder from its node config.

    Deployment: ``shard-path`` (a shard file, or a folder holding exactly one) and
    ``state-dir`` (the folder that keeps the ledger across restarts), and optionally
    ``device-id`` (default: the shard's name); an id that is not a safe folder name
    (:func:`fed_nessa.privacy.ledger.device_id_problem`) is refused. Simulation: only
    ``partition-id``: the device is that shard of the run's shard folder and its ledger
    lives in ``<run-dir>/devices/<device_id>/``, its private key in the run's key store.
    """
    if SHARD_PATH_KEY in node_config:
        shard = _single_shard(Path(str(node_config[SHARD_PATH_KEY])))
        if STATE_DIR_KEY not in node_config:
            raise ValueError(f"node config has {SHARD_PATH_KEY!r} but no {STATE_DIR_KEY!r} for the privacy ledger")
        given = node_config.get(DEVICE_ID_KEY)
        device_id = device_id_of(shard) if given is None else str(given)
        problem = device_id_problem(device_id)
        if problem:
            source = f"node config {DEVICE_ID_KEY!r}" if given is not None else f"shard {shard}"
            raise ValueError(f"{source}: {problem}")
        state_dir = Path(str(node_config[STATE_DIR_KEY]))
        return DevicePaths(device_id, shard, state_dir, state_dir)
    if PARTITION_ID_KEY not in node_config:
        raise ValueError(f"node config has neither {SHARD_PATH_KEY!r} nor {PARTITION_ID_KEY!r}: no shard to train on")
    pid = int(node_config[PARTITION_ID_KEY])
    shards = _partition_table(shard_folder(cfg))
    if not 0 <= pid < len(shards):
        raise ShardError(shard_folder(cfg), f"no shard for partition {pid} ({len(shards)} shard(s) in the folder)")
    device_id = device_id_of(shards[pid])
    problem = device_id_problem(device_id)
    if problem:
        raise ShardError(shards[pid], problem)
    return DevicePaths(device_id, shards[pid], Path(cfg.run_dir) / DEVICES_DIR / device_id,
                       device_key_folder(cfg.run_dir, device_id))
