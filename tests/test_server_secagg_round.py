"""Real Flower SecAgg+ over the in-process Grid: the server gets the SUM, never one update.

The device round logic here is a small stand-in (a deterministic, clipped
vector per shard) recorded on the way out, so the test knows every device's
true update and can compare it with what the secure sum revealed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.app import build_client_app
from client.device import DeviceRuntime
from fed_nessa.config import from_run_config
from fed_nessa.data.shards import make_shard, shard_paths, write_shard
from fed_nessa.federated.codec import SecAggCodec, make_codec
from fed_nessa.federated.protocol import FLEET_SIZE_KEY, PHASE_KEY, PROMISED_ARRIVALS_KEY, ROUND_KEY, device_id_of
from fed_nessa.sim.grid import InProcessGrid
from server.secagg_round import secure_sum

torch.set_num_threads(1)
DIM = 40
BOUND = 0.5  # the stand-in clips every coordinate to +-BOUND (its payload bound)


@dataclass(frozen=True)
class Outcome:
    status: str
    vector: np.ndarray | None
    metrics: dict


class StandInRounds:
    """Deterministic per-device update from its shard; records what each device produced."""

    def __init__(self) -> None:
        self.sent: dict[str, np.ndarray] = {}

    def plan_round(self, req, shard, cfg, ledger, policy):  # noqa: ANN001
        return Outcome("ok", None, {"epsilon_spent": 0.0})

    def client_round(self, req, shard, global_vector, cfg, ledger, policy):  # noqa: ANN001
        v = shard.enroll[:, :DIM].mean(axis=0) * 3.0 + global_vector[:DIM] * 0.0
        v = np.clip(v, -BOUND, BOUND).astype(np.float32)
        self.sent[ledger] = v
        return Outcome("ok", v, {"epsilon_spent": 0.5, "n": shard.n})  # "n" must be dropped by the client

    def runtime(self) -> DeviceRuntime:
        return DeviceRuntime(self.plan_round, self.client_round,
                             open_ledger=lambda folder, dev, policy, key_dir=None: dev)


def write_devices(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.integers(5, 30))
        shard = make_shard(rng.normal(size=(n, 64)), rng.normal(size=(n, 48)), rng.integers(0, 3, n), "x", "y")
        write_shard(folder / f"dev-{i:03d}.shard.safetensors", shard)
    return shard_paths(folder)


def run_config(tmp_path: Path, clients: int, shares: int = 7) -> dict:
    return {"data-source": str(tmp_path / "shards"), "run-dir": str(tmp_path / "run"), "clients-per-round": clients,
            "num-devices": clients, "secagg-num-shares": shares, "secagg-reconstruction-threshold": 4,
            "min-arrivals": 3, "distributed-mechanism": "gaussian"}  # Flower's quantizer (skellam: test_skellam_*)


def fit_config(g: int = 3, fleet: int = 8) -> dict:
    return {PHASE_KEY: "dpsgd", ROUND_KEY: 1, PROMISED_ARRIVALS_KEY: g, FLEET_SIZE_KEY: fleet}


def stage_of(msg) -> str | None:  # noqa: ANN001
    rec = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    return None if rec is None else rec.get(Key.STAGE)


def run_round(tmp_path: Path, clients: int, drop=None, corrupt: int | None = None, shares: int = 7,  # noqa: ANN001
              min_release: int = 3):
    paths = write_devices(tmp_path / "shards", clients)
    if corrupt is not None:
        paths[corrupt].write_bytes(b"not a shard")
    rounds = StandInRounds()
    wire: list[tuple[str, object, str | None]] = []  # (kind, message, SecAgg+ stage as sent)
    rc = run_config(tmp_path, clients, shares)
    grid = InProcessGrid(build_client_app(rounds.runtime()), clients, rc, drop=drop,
                         tap=lambda kind, m: wire.append((kind, m, stage_of(m))))
    cfg = from_run_config(rc)
    codec = make_codec(BOUND, cfg.secagg_clipping_range, cfg.secagg_quantization_range, clients)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc)
    cohort = list(grid.get_node_ids())
    result = secure_sum(grid, ctx, cfg, 1, cohort, np.zeros(DIM, np.float32), fit_config(min_release, clients), codec,
                        min_release=min_release)
    ids = {nid: device_id_of(p) for nid, p in zip(cohort, paths)}
    return result, rounds, wire, codec, ids


def test_secure_sum_equals_sum_of_clipped_updates_and_no_update_is_readable(tmp_path: Path) -> None:
    np.random.seed(0)  # SecAgg+'s stochastic rounding draws from numpy's global generator
    result, rounds, wire, codec, ids = run_round(tmp_path, 8)
    assert result.completed and result.n_arrived == 8 and result.saturated == 0
    expected = np.sum([rounds.sent[ids[n]] for n in result.arrived], axis=0)
    err = np.abs(result.sum_vector - expected).max()
    assert err <= codec.sum_error_bound(8), err
    assert err < 1e-4
    # The mean of the clipped updates, as FedAvg with equal weights would compute it.
    np.testing.assert_allclose(result.sum_vector / 8, expected / 8, atol=codec.sum_error_bound(8) / 8)
    # No contract-external metric left a device.
    assert all("n" not in m for m in result.metrics.values())
    assert all(m["epsilon_spent"] == 0.5 for m in result.metrics.values())
    # On the wire: collect-stage replies hold masked integers only, no plain arrays.
    masked = [m for kind, m, _ in wire if kind == "reply" and m.has_content()
              and Key.MASKED_PARAMETERS in m.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    assert len(masked) == 8
    for m in masked:
        assert all(len(rec) == 0 for rec in m.content.array_records.values())
        vec = bytes_to_ndarray(m.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS][1])
        plain = rounds.sent[ids[m.metadata.src_node_id]]
        quantized = (plain * codec.scale + codec.clipping_range) * codec.quantization_range / (2 * codec.clipping_range)
        # Masks are uniform in [0, 2**32): the masked vector looks nothing like the plain one.
        assert np.abs(vec[:DIM].astype(np.float64) - quantized).min() > 1000
        assert abs(np.corrcoef(vec[:DIM].astype(np.float64), plain)[0, 1]) < 0.6


def test_dropouts_below_threshold_leave_the_sum_correct(tmp_path: Path) -> None:
    """2 devices vanish before sending, 1 has a corrupt shard, 1 vanishes after sending."""
    np.random.seed(1)
    random.seed(1)  # SecAgg+ draws its neighbour ring with random.shuffle
    clients = 12
    node_ids = list(range(1001, 1001 + clients))
    vanish_before = {node_ids[0], node_ids[5]}
    vanish_after = {node_ids[7]}

    def drop(msg) -> bool:  # noqa: ANN001
        node, stage = msg.metadata.dst_node_id, stage_of(msg)
        return (node in vanish_before and stage == Stage.COLLECT_MASKED_VECTORS) or (
            node in vanish_after and stage == Stage.UNMASK)

    # Every device holds shares of all 11 others: 4 losses leave >= 8 shares >= threshold 4 for
    # any neighbour ring (a 7-share ring can lose 4 of one node's neighbours and must abort).
    result, rounds, _, codec, ids = run_round(tmp_path, clients, drop=drop, corrupt=3, shares=clients)
    assert result.completed
    assert set(result.arrived) == set(node_ids) - vanish_before - {node_ids[3]}
    assert result.n_arrived == 9
    expected = np.sum([rounds.sent[ids[n]] for n in result.arrived], axis=0)
    assert np.abs(result.sum_vector - expected).max() <= codec.sum_error_bound(9)
    assert any("dev-003" in f and "unreadable" in f for f in result.failures), result.failures


def test_too_many_dropouts_halt_without_revealing_anything(tmp_path: Path) -> None:
    clients = 8
    node_ids = list(range(1001, 1001 + clients))
    dead = set(node_ids[:6])

    def drop(msg) -> bool:  # noqa: ANN001
        return msg.metadata.dst_node_id in dead and stage_of(msg) == Stage.COLLECT_MASKED_VECTORS

    result, _, _, _, _ = run_round(tmp_path, clients, drop=drop)
    assert not result.completed
    assert result.sum_vector is None and result.n_arrived == 0


def test_train_outside_secagg_is_refused(tmp_path: Path) -> None:
    write_devices(tmp_path / "shards", 3)
    rounds = StandInRounds()
    rc = run_config(tmp_path, 3)
    grid = InProcessGrid(build_client_app(rounds.runtime()), 3, rc)
    from flwr.app import Message
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(DIM)]), fit_config(fleet=3)), True)
    [reply] = grid.send_and_receive([Message(content, 1001, "train")])
    assert reply.has_error() and "outside a SecAgg+ round" in reply.error.reason
    assert rounds.sent == {}


@pytest.mark.parametrize("clients", [3])
def test_smallest_cohort(tmp_path: Path, clients: int) -> None:
    np.random.seed(2)
    rc = run_config(tmp_path, clients) | {"secagg-num-shares": 3, "secagg-reconstruction-threshold": 2,
                                          "min-arrivals": 2}
    paths = write_devices(tmp_path / "shards", clients)
    rounds = StandInRounds()
    grid = InProcessGrid(build_client_app(rounds.runtime()), clients, rc)
    cfg = from_run_config(rc)
    codec = make_codec(BOUND, cfg.secagg_clipping_range, cfg.secagg_quantization_range, clients)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc)
    res = secure_sum(grid, ctx, cfg, 1, list(grid.get_node_ids()), np.zeros(DIM, np.float32), fit_config(2, clients),
                     codec, min_release=2)
    expected = np.sum([rounds.sent[device_id_of(p)] for p in paths], axis=0)
    assert res.completed and np.abs(res.sum_vector - expected).max() <= codec.sum_error_bound(clients)


def _spy_decode(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = SecAggCodec.decode

    def spy(self, mean_payload, n_arrived):  # noqa: ANN001, ANN202
        calls.append(n_arrived)
        return real(self, mean_payload, n_arrived)

    monkeypatch.setattr(SecAggCodec, "decode", spy)
    return calls


def test_nothing_is_unmasked_below_the_promised_arrivals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 3: fewer masked vectors than g arrive -> no unmask message, no sum decoded.

    Two of 8 devices vanish at the collect-masked-vectors stage, so 6 masked vectors arrive
    for a round that promised g = 7. SecAgg+ alone could still unmask (threshold 4), and
    c5b415a did, decoding the sum before it checked the arrivals; the guarded workflow
    refuses before it asks for a single unmasking share.
    """
    np.random.seed(3)
    random.seed(3)
    clients = 8
    node_ids = list(range(1001, 1001 + clients))
    gone = set(node_ids[:2])

    def drop(msg) -> bool:  # noqa: ANN001
        return msg.metadata.dst_node_id in gone and stage_of(msg) == Stage.COLLECT_MASKED_VECTORS

    decoded = _spy_decode(monkeypatch)
    result, rounds, wire, _, _ = run_round(tmp_path, clients, drop=drop, min_release=7)
    assert result.refused is not None and "only 6 masked vector(s) arrived" in result.refused
    assert result.masked_arrivals == 6
    assert not result.completed and result.sum_vector is None and result.n_arrived == 0
    assert decoded == []
    sent = [stage for kind, _, stage in wire if kind == "instruction"]
    assert sent.count(Stage.COLLECT_MASKED_VECTORS) == clients and Stage.UNMASK not in sent
    assert len(rounds.sent) == 6  # the devices did compute; nothing of theirs was released


def test_the_same_round_with_enough_arrivals_is_unmasked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control for the test above: the same drop-outs with g = 6 unmask and decode once."""
    np.random.seed(3)
    random.seed(3)
    node_ids = list(range(1001, 1009))
    gone = set(node_ids[:2])

    def drop(msg) -> bool:  # noqa: ANN001
        return msg.metadata.dst_node_id in gone and stage_of(msg) == Stage.COLLECT_MASKED_VECTORS

    decoded = _spy_decode(monkeypatch)
    result, rounds, wire, codec, ids = run_round(tmp_path, 8, drop=drop, min_release=6)
    assert result.completed and result.refused is None and result.n_arrived == 6 and decoded == [6]
    assert [stage for kind, _, stage in wire if kind == "instruction"].count(Stage.UNMASK) == 6
    expected = np.sum([rounds.sent[ids[n]] for n in result.arrived], axis=0)
    assert np.abs(result.sum_vector - expected).max() <= codec.sum_error_bound(6)


def test_a_saturating_device_fails_alone_and_the_round_goes_on(tmp_path: Path) -> None:
    """Defect 4: a device whose vector would saturate fails locally; the others' sum is released."""
    np.random.seed(4)
    random.seed(4)
    clients = 8
    paths = write_devices(tmp_path / "shards", clients)
    bad = device_id_of(paths[2])

    class Saturating(StandInRounds):
        def client_round(self, req, shard, global_vector, cfg, ledger, policy):  # noqa: ANN001
            out = super().client_round(req, shard, global_vector, cfg, ledger, policy)
            if ledger == bad:
                self.sent.pop(ledger)
                return Outcome("ok", np.full(DIM, 100 * BOUND, np.float32), out.metrics)
            return out

    rounds = Saturating()
    rc = run_config(tmp_path, clients)
    grid = InProcessGrid(build_client_app(rounds.runtime()), clients, rc)
    cfg = from_run_config(rc)
    codec = make_codec(BOUND, cfg.secagg_clipping_range, cfg.secagg_quantization_range, clients)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc)
    result = secure_sum(grid, ctx, cfg, 1, list(grid.get_node_ids()), np.zeros(DIM, np.float32),
                        fit_config(fleet=clients), codec, min_release=3)
    assert result.completed and result.n_arrived == clients - 1 and result.saturated == 0
    assert 1003 not in result.arrived
    assert any("SaturationError" in f or "exceed SecAgg+'s clipping range" in f for f in result.failures), \
        result.failures
    expected = np.sum(list(rounds.sent.values()), axis=0)
    assert np.abs(result.sum_vector - expected).max() <= codec.sum_error_bound(clients - 1)


def test_a_huge_count_coordinate_cannot_halt_the_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 4: a device writing a huge value into the diagnostic count coordinate: the sum is
    still released (the count is reported, never acted on). c5b415a raised for the whole round."""
    np.random.seed(5)
    random.seed(5)
    clients = 6
    paths = write_devices(tmp_path / "shards", clients)
    bad = device_id_of(paths[1])
    real_encode = SecAggCodec.encode
    state = {"device": None}

    class Marking(StandInRounds):
        def client_round(self, req, shard, global_vector, cfg, ledger, policy):  # noqa: ANN001
            state["device"] = ledger
            return super().client_round(req, shard, global_vector, cfg, ledger, policy)

    def dishonest(self, vector):  # noqa: ANN001, ANN202
        payload, count = real_encode(self, vector)
        if state["device"] == bad:
            payload[-1] = self.clipping_range  # the largest value SecAgg+ carries
        return payload, count

    monkeypatch.setattr(SecAggCodec, "encode", dishonest)
    rounds = Marking()
    rc = run_config(tmp_path, clients, shares=5)
    grid = InProcessGrid(build_client_app(rounds.runtime()), clients, rc)
    cfg = from_run_config(rc)
    codec = make_codec(BOUND, cfg.secagg_clipping_range, cfg.secagg_quantization_range, clients)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc)
    result = secure_sum(grid, ctx, cfg, 1, list(grid.get_node_ids()), np.zeros(DIM, np.float32),
                        fit_config(fleet=clients), codec, min_release=3)
    assert result.completed and result.n_arrived == clients and result.saturated > 0
    expected = np.sum(list(rounds.sent.values()), axis=0)
    assert np.abs(result.sum_vector - expected).max() <= codec.sum_error_bound(clients)
