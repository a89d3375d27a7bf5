"""Evidence an auditor can trust without trusting the server (issue 12, parts 1-3).

* pinned identities: the server pins each device's ledger key at first sight, each device
  pins the server's; a ledger re-keyed wholesale, a device answering with another key, a
  server with another key are all caught; no private key lives in a run folder;
* evidence-complete audit: a run folder without its federation ledger, a joined device
  without its ledger, a file the summary references that is gone: FAIL, named;
* one model per round: a server sending one device another model (Pasquini et al., CCS 2022)
  is named by round and device.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_privacy_audit import BUDGET, DELTA, _ev, _fails, _run
from test_simulation import make_folder, overrides, simulate

from fed_nessa.config import FederationConfig, Phase, ReplyStatus
from fed_nessa.data.shards import make_shard
from fed_nessa.federated.device import RoundRequest, plan_round
from fed_nessa.privacy.audit import audit
from fed_nessa.privacy.ledger import (
    DEVICE_LEDGER_NAME,
    DeviceLedger,
    FederationLedger,
    key_store,
)
from fed_nessa.sim.runner import build_config

torch.set_num_threads(1)


def _entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- 1. pinned identities
def test_a_ledger_rekeyed_wholesale_fails_against_the_servers_pin(tmp_path: Path) -> None:
    """New key in the header AND in device-key.pub.pem, a fresh history: only the server's pin catches it."""
    run = _run(tmp_path, n_devices=2, rounds=1)
    folder = run / "devices" / "dev0"
    (folder / DEVICE_LEDGER_NAME).unlink()
    (folder / "device-key.pub.pem").unlink()
    forged = DeviceLedger.open(folder, "dev0", key_folder=tmp_path / "forger")  # new key, new public key file
    forged.check_budget(_ev(1, 1), BUDGET, DELTA)
    forged.complete(forged.reserve(_ev(1, 1)), forged.epsilon(DELTA))
    fails = _fails(audit(run))
    assert ("federation.key", "dev0", None) in fails
    assert not any(check.startswith("chain.") for check, _, _ in fails)  # the forgery itself verifies


def test_a_ledger_the_server_never_pinned_fails(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fed = FederationLedger.open(run / "federation-ledger.jsonl", tmp_path / "keys")
    led = DeviceLedger.open(run / "devices" / "d", "d", epsilon_budget=BUDGET, delta=DELTA)
    led.complete(led.reserve(_ev(1)), led.epsilon(DELTA))
    fed.record_round(1, ["d"], [], [])
    assert ("federation.unpinned", "d", None) in _fails(audit(run))


def test_a_device_declines_a_server_whose_key_is_not_the_one_it_pinned(tmp_path: Path) -> None:
    led = DeviceLedger.open(tmp_path / "d", "d", epsilon_budget=BUDGET, delta=DELTA)
    led.complete(led.reserve(_ev(1), {"round": 1, "server_key_fingerprint": "a" * 64}), led.epsilon(DELTA))
    assert led.pinned_server_fingerprint == "a" * 64
    rng = np.random.default_rng(0)
    shard = make_shard(rng.normal(size=(20, 16)), rng.normal(size=(20, 12)), np.repeat([0, 1], 10), "mx", "my")
    cfg = FederationConfig().replace(epsilon_budget=BUDGET, num_devices=8, secagg_num_shares=5,
                                     secagg_reconstruction_threshold=3, min_arrivals=3)
    from fed_nessa.config import DevicePolicy

    policy = DevicePolicy(epsilon_budget=BUDGET, guaranteed_arrivals=3)
    ok = plan_round(RoundRequest(Phase.DPSGD, 2, 7, 8, server_key_fingerprint="a" * 64), shard, cfg, led, policy)
    assert ok.status == ReplyStatus.OK
    other = plan_round(RoundRequest(Phase.DPSGD, 2, 7, 8, server_key_fingerprint="b" * 64), shard, cfg, led, policy)
    assert other.status == ReplyStatus.DECLINED and "pinned" in str(other.metrics["reason"])


def test_a_device_that_recorded_another_server_key_fails_the_audit(tmp_path: Path) -> None:
    run = _run(tmp_path, n_devices=2, rounds=1)
    led = DeviceLedger.open(run / "devices" / "dev1", "dev1", key_folder=tmp_path / "run.keys" / "dev1")
    led.complete(led.reserve(_ev(2, 1), {"server_key_fingerprint": "f" * 64}), led.epsilon(DELTA))
    assert any(c == "device.server_pin" and d == "dev1" for c, d, _ in _fails(audit(run)))


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


def test_simulation_keeps_private_keys_out_of_the_run_folder_and_pins_both_ways(tmp_path: Path, data: Path) -> None:
    simulate(build_config(None, overrides(tmp_path, num_server_rounds=2)), quiet=True)
    run = tmp_path / "run"
    assert not [p for p in run.rglob("*.pem") if not p.name.endswith(".pub.pem")]  # public keys only
    store = key_store(run)
    assert store == tmp_path / "run.keys" and (store / "server" / "server-key.pem").exists()
    assert len(list((store / "devices").glob("*/device-key.pem"))) == 8
    fed = _entries(run / "federation-ledger.jsonl")
    server_fp = fed[0]["payload"]["key_fingerprint"]
    assert fed[-1]["kind"] == "end"  # the signed end-of-run record
    pins = {d: fp for e in fed[1:-1] for d, fp in e["payload"]["extra"]["device_key_fingerprints"].items()}
    for dev_dir in sorted((run / "devices").iterdir()):
        header = _entries(dev_dir / DEVICE_LEDGER_NAME)[0]["payload"]
        assert pins[dev_dir.name] == header["key_fingerprint"]
        reserves = [e for e in _entries(dev_dir / DEVICE_LEDGER_NAME) if e["kind"] == "reserve"]
        assert reserves and all(e["payload"]["received"]["server_key_fingerprint"] == server_fp for e in reserves)
    assert audit(run).passed


def test_the_server_refuses_a_device_whose_key_changed(tmp_path: Path, data: Path) -> None:
    simulate(build_config(None, overrides(tmp_path, num_server_rounds=1, clients_per_round=0)), quiet=True)
    run = tmp_path / "run"
    victim = "dev-003"  # its ledger and key are replaced: a new identity under the same id
    shutil.rmtree(run / "devices" / victim)
    shutil.rmtree(key_store(run) / "devices" / victim)
    summary = simulate(build_config(None, overrides(tmp_path, num_server_rounds=2, resume="true",
                                                    clients_per_round=0)), quiet=True)
    assert summary["rounds"][1]["failed"] >= 1
    round2 = _entries(run / "federation-ledger.jsonl")[-2]["payload"]  # before the end-of-run record
    assert round2["round"] == 2 and victim in round2["failed"] and victim in round2["extra"]["key_mismatch"]
    assert ("federation.key", victim, None) in _fails(audit(run))


# ----------------------------------------------------------------------------- 2. evidence-complete
def _with_summary_ledgers(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    summary["privacy"]["device_ledgers"] = {d.name: f"devices/{d.name}/{DEVICE_LEDGER_NAME}"
                                            for d in sorted((run / "devices").iterdir())}
    (run / "summary.json").write_text(json.dumps(summary))


def test_a_run_folder_without_its_federation_ledger_fails(tmp_path: Path) -> None:
    run = _run(tmp_path)
    assert audit(run).passed
    (run / "federation-ledger.jsonl").unlink()
    result = audit(run)
    assert ("evidence.federation_ledger", None, None) in _fails(result)
    assert result.not_checked


def test_a_joined_device_without_its_ledger_and_a_missing_referenced_file_fail(tmp_path: Path) -> None:
    run = _run(tmp_path)
    _with_summary_ledgers(run)
    assert audit(run).passed
    shutil.rmtree(run / "devices" / "dev2")
    fails = _fails(audit(run))
    assert {("evidence.missing_ledger", "dev2", None), ("evidence.missing_file", "dev2", None)} <= fails


def test_every_device_ledger_deleted_fails_instead_of_passing(tmp_path: Path) -> None:
    run = _run(tmp_path)
    shutil.rmtree(run / "devices")
    fails = _fails(audit(run))
    assert {("evidence.missing_ledger", f"dev{i}", None) for i in range(3)} <= fails


def test_one_ledger_alone_is_audited_and_says_what_it_cannot_check(tmp_path: Path) -> None:
    run = _run(tmp_path, n_devices=1, rounds=2)
    result = audit(run / "devices" / "dev0" / DEVICE_LEDGER_NAME)
    assert result.passed and any("federation ledger" in x for x in result.not_checked)
    report = (run / "devices" / "dev0" / "audit" / "report.md").read_text()
    assert "Not checked" in report and "pins" in report


# ----------------------------------------------------------------------------- 3. one model per round
def test_a_server_sending_one_device_another_model_is_named_by_round_and_device(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pasquini et al. (CCS 2022): the server gives one device a different model in round 2."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    import server.secagg_round as sr

    real = sr._CohortStrategy.configure_fit
    victims: dict[int, int] = {}

    def evil(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN202
        pairs = real(self, server_round, parameters, client_manager)
        if self._fit_config.get("round") != 2:
            return pairs
        proxy, ins = pairs[0]
        vec = parameters_to_ndarrays(ins.parameters)[0]
        victims[2] = int(proxy.node_id)
        bad = type(ins)(parameters=ndarrays_to_parameters([vec + np.float32(1e-3)]), config=ins.config)
        return [(proxy, bad)] + pairs[1:]

    monkeypatch.setattr(sr._CohortStrategy, "configure_fit", evil)
    simulate(build_config(None, overrides(tmp_path, num_server_rounds=3)), quiet=True)
    run = tmp_path / "run"
    victim = f"dev-{victims[2] - 1001:03d}"
    result = audit(run)
    assert not result.passed
    named = {(f.check, f.device) for f in result.failures}
    assert named == {("model.mismatch", victim), ("model.split", victim)}, [f.message for f in result.failures]
    assert all("round 2" in f.message for f in result.failures)


def test_fleet_run_folders_carry_pins_and_model_chains_and_pass(tmp_path: Path) -> None:
    """The fleet engine: keys in the key store, every device pinned, each span's received-model chain
    equal to the server's span chain, and the whole run folder passes the audit."""
    from test_sim_fleet import POLICY as FLEET_POLICY
    from test_sim_fleet import _cfg

    from fed_nessa.sim.fleet import run_fleet

    run_fleet(_cfg(tmp_path, "fleet", **{"reproducible-noise": False}), FLEET_POLICY)  # a guarantee to audit
    run = tmp_path / "fleet"
    assert not [p for p in run.rglob("*.pem") if not p.name.endswith(".pub.pem")]
    fed = _entries(run / "federation-ledger.jsonl")
    assert fed[-1]["kind"] == "end"  # the signed end-of-run record
    pins = {d: fp for e in fed[1:-1] for d, fp in e["payload"]["extra"].get("device_key_fingerprints", {}).items()}
    chains = {e["payload"]["extra"]["model_chain"] for e in fed if e["kind"] == "span"}
    assert len(chains) == 1
    for dev_dir in sorted((run / "devices").iterdir()):
        entries = _entries(dev_dir / DEVICE_LEDGER_NAME)
        assert pins[dev_dir.name] == entries[0]["payload"]["key_fingerprint"]
        spans = [e["payload"]["received"]["chain"] for e in entries
                 if e["kind"] == "complete" and "received" in e["payload"]]
        assert spans == list(chains)
    assert audit(run).passed
