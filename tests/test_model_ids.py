"""Issue 12, part 4: one model per federation. The server states its enroll/runtime model ids in
every round config; a device whose shard was embedded with other models declines the round, with
a reason naming both pairs of ids, before its ledger reserves anything (both engines).

On the code before this change the round config carried no model ids and a shard of other models
joined silently: every test below fails there (no key on the wire, no decline, epsilon spent).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from test_federated_device import POLICY, Cfg, _ledger, _model, _shards
from test_simulation import POLICY as SIM_POLICY
from test_simulation import make_folder, overrides, simulate

from fed_nessa.config import Phase, ReplyStatus
from fed_nessa.data.shards import load_shard, write_shard
from fed_nessa.federated.device import RoundRequest, client_round, plan_round, shard_refusal
from fed_nessa.federated.protocol import ENROLL_MODEL_KEY, RUNTIME_MODEL_KEY, round_config
from fed_nessa.privacy.ledger import DEVICE_LEDGER_NAME, DeviceLedger


def _req(enroll: str | None, runtime: str | None, phase: Phase = Phase.SUFFSTATS) -> RoundRequest:
    return RoundRequest(phase, 1, 4, 4, enroll_model=enroll, runtime_model=runtime)


def test_a_round_for_other_models_is_declined_naming_both_ids_before_anything_is_reserved(tmp_path: Path) -> None:
    shard = _shards(1)[0]  # embedded with models "X" (enroll) and "Y" (runtime)
    for i, (enroll, runtime) in enumerate((("X", "Z"), ("W", "Y"), ("W", "Z"))):
        ledger = _ledger(tmp_path / f"d{i}")
        planned = plan_round(_req(enroll, runtime), shard, Cfg(), ledger, POLICY)
        assert planned.status == ReplyStatus.DECLINED
        reason = str(planned.metrics["reason"])
        assert f"{enroll} (enroll) / {runtime} (runtime)" in reason and "X (enroll) / Y (runtime)" in reason
        out = client_round(_req(enroll, runtime), shard, _model(Cfg()), Cfg(), ledger, POLICY)
        assert out.status == ReplyStatus.DECLINED and out.vector is None
        assert ledger.events() == []  # nothing reserved, nothing spent
        assert not (tmp_path / f"d{i}" / DEVICE_LEDGER_NAME).read_text().count('"reserve"')


def test_matching_or_unstated_model_ids_change_nothing(tmp_path: Path) -> None:
    shard = _shards(1)[0]
    assert shard_refusal(_req("X", "Y"), shard) is None
    assert shard_refusal(_req(None, None), shard) is None  # older servers: not checked
    assert shard_refusal(_req("X", None), shard) is None
    out = client_round(_req("X", "Y"), shard, _model(Cfg()), Cfg(), _ledger(tmp_path / "d"), POLICY)
    assert out.status == ReplyStatus.OK and out.vector is not None


def test_the_round_config_carries_the_model_ids_and_the_client_parses_them() -> None:
    from client.app import _request
    wire = round_config(str(Phase.DPSGD), 3, 7, 8, "f" * 64, "campp:aa", "vfl_dvec:bb")  # the round loop's
    assert (wire[ENROLL_MODEL_KEY], wire[RUNTIME_MODEL_KEY]) == ("campp:aa", "vfl_dvec:bb")
    req = _request(wire)
    assert (req.enroll_model, req.runtime_model, req.server_key_fingerprint) == ("campp:aa", "vfl_dvec:bb",
                                                                                 "f" * 64)
    bare = _request(round_config("dpsgd", 3, 7, 8))
    assert (bare.enroll_model, bare.runtime_model) == (None, None)


def test_flower_engine_a_shard_of_other_models_declines_and_the_federation_ledger_names_it(
        tmp_path: Path) -> None:
    """8 devices, models "mx"/"my"; dev-005's shard says "mz" on the enroll side. The run goes on
    with 7, dev-005 spends nothing, the federation ledger records its decline with both ids."""
    from fed_nessa.sim.runner import build_config

    data = make_folder(tmp_path / "data")
    bad = data / "dev-005.shard.safetensors"
    write_shard(bad, dataclasses.replace(load_shard(bad), enroll_model="mz"))
    summary = simulate(build_config(None, overrides(tmp_path, num_server_rounds=1, clients_per_round=0)),
                       policy=SIM_POLICY, quiet=True)
    [r] = summary["rounds"]
    assert (r["status"], r["participants"], r["declined"]) == ("applied", 7, 1)
    run = tmp_path / "run"
    [entry] = [json.loads(line)["payload"] for line in (run / "federation-ledger.jsonl").read_text().splitlines()
               if json.loads(line)["payload"].get("round") == 1]
    assert entry["declined"] == ["dev-005"]
    [reason] = entry["extra"]["decline_reasons"]
    assert "mx (enroll) / my (runtime)" in reason and "mz (enroll) / my (runtime)" in reason
    assert DeviceLedger.open(run / "devices" / "dev-005", "dev-005").events() == []
    assert all(DeviceLedger.open(run / "devices" / d, d).events() for d in ("dev-000", "dev-004", "dev-007"))


def test_fleet_engine_a_device_of_other_models_declines_every_round(tmp_path: Path) -> None:
    from test_sim_fleet import POLICY as FLEET_POLICY
    from test_sim_fleet import _cfg

    from fed_nessa.data.registry import load_federation_data
    from fed_nessa.sim.fleet import FleetEngine

    cfg = _cfg(tmp_path, "fleet", **{"num-server-rounds": 2})
    data = load_federation_data(cfg, None)
    devices = list(data.devices)
    devices[3] = dataclasses.replace(devices[3], runtime_model="other:123")
    summary = FleetEngine(cfg, FLEET_POLICY, dataclasses.replace(data, devices=tuple(devices))).run()
    assert [(r["status"], r["participants"]) for r in summary["rounds"]] == [("applied", 11), ("applied", 11)]
    run = tmp_path / "fleet"
    assert DeviceLedger.open(run / "devices" / "device-00003", "device-00003").events() == []
    entries = [json.loads(line)["payload"] for line in (run / "federation-ledger.jsonl").read_text().splitlines()]
    reasons = [r for e in entries for r in e.get("extra", {}).get("decline_reasons", {})]
    assert len(reasons) == 2  # the statistics round and the DP-SGD span
    assert all(f"{data.runtime_model} (runtime)" in r and "other:123 (runtime)" in r for r in reasons)
    assert np.isfinite(summary["rounds"][-1]["eer"])
