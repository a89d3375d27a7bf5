"""Issue 17, the evidence part: what two parties signed is held against each other.

* public-seed noise (reproducible-noise) never PASSes the audit;
* ledger tails are anchored: the server signs each device's ledger head per round and an
  end-of-run record; the keyless tail cut (drop the newest round everywhere, edit the summary
  to agree) FAILs on both engines;
* an honest device-level run with min-separation PASSes its own audit, with and without a
  statistics round first, and its devices train in the DP-SGD rounds they kept;
* an insider's re-signed device ledger (another sigma), a device cut from a re-signed
  federation ledger and a summary with edited participant counts all FAIL.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_device_level import DEVICE_POLICY
from test_device_level import _fleet_cfg as _device_cfg
from test_privacy_audit import DELTA, _ev, _fails, _run
from test_sim_fleet import POLICY as FLEET_POLICY
from test_sim_fleet import _cfg as _fleet_cfg
from test_simulation import make_folder, overrides, simulate

from fed_nessa.cli import main
from fed_nessa.config import DevicePolicy
from fed_nessa.privacy import signing
from fed_nessa.privacy.audit import audit
from fed_nessa.privacy.chain import HEADER, SignedChain
from fed_nessa.privacy.events import OS_CSPRNG, PUBLIC_SEED, DPEvent, EventError
from fed_nessa.privacy.ledger import (
    COMPLETE,
    DEVICE_KEY_NAME,
    DEVICE_LEDGER_NAME,
    END,
    LEDGER_HEADS,
    PUBLIC_PARAMETERS,
    RESERVE,
    SERVER_KEY_NAME,
    DeviceLedger,
    FederationLedger,
    key_store,
)
from fed_nessa.randomness import REPRODUCIBLE_WARNING
from fed_nessa.sim.fleet import run_fleet
from fed_nessa.sim.runner import build_config

torch.set_num_threads(1)
FED = "federation-ledger.jsonl"


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _checks(result: Any) -> set[str]:
    return {f.check for f in result.failures}


def _secure_fleet(tmp_path: Path, name: str = "fleet", **over: Any) -> Path:
    run_fleet(_fleet_cfg(tmp_path, name, **{"reproducible-noise": False, **over}), FLEET_POLICY)
    return tmp_path / name


# ----------------------------------------------------------------------------- 1. public-seed noise
def test_a_reproducible_noise_run_fails_its_audit_with_the_reason(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    run_fleet(_fleet_cfg(tmp_path, "replay"), FLEET_POLICY)  # reproducible-noise = true
    run = tmp_path / "replay"
    ledger = DeviceLedger.open(run / "devices" / "device-00000", "device-00000")
    assert {ev.noise_source for ev in ledger.events()} == {PUBLIC_SEED}  # data, not only a note
    result = audit(run, write=False)
    assert {"noise.public_seed", "summary.guarantee"} <= _checks(result)
    assert all(f.check in ("noise.public_seed", "summary.guarantee") for f in result.failures)
    assert main(["audit", str(run)]) == 1
    assert "FAIL noise.public_seed" in capsys.readouterr().out


def test_a_ledger_written_before_the_field_is_still_read_by_its_note(tmp_path: Path) -> None:
    """Old events carry no ``noise_source``; the fixed warning every public-seed note holds decides."""
    legacy = DPEvent.from_dict({**_ev(1).to_dict(), "note": f"dp-sgd; {REPRODUCIBLE_WARNING}"})
    assert "noise_source" not in legacy.to_dict()  # serialised exactly as before the field existed
    run = _run(tmp_path, n_devices=1, rounds=1)
    led = DeviceLedger.open(run / "devices" / "dev0", "dev0", key_folder=tmp_path / "run.keys" / "dev0")
    led.complete(led.reserve(DPEvent.from_dict({**_ev(2, 1).to_dict(), "note": REPRODUCIBLE_WARNING})),
                 led.epsilon(DELTA))
    assert "noise.public_seed" in _checks(audit(run, write=False))
    assert DPEvent.from_dict({**_ev(1).to_dict(), "noise_source": OS_CSPRNG}).to_dict()["noise_source"] == OS_CSPRNG
    with pytest.raises(EventError, match="noise_source"):
        DPEvent.from_dict({**_ev(1).to_dict(), "noise_source": "dice"})


# ----------------------------------------------------------------------------- 2. anchored tails
def _cut_from(run: Path, first_round: int) -> None:
    """The keyless attack: drop every entry from round ``first_round`` on in every ledger (what remains
    is a valid signed prefix), then make the unsigned summary agree (rounds and epsilon)."""
    for path in sorted((run / "devices").glob(f"*/{DEVICE_LEDGER_NAME}")):
        entries = path.read_text().splitlines(keepends=True)
        cut = next((i for i, line in enumerate(entries) if json.loads(line)["kind"] == RESERVE
                    and json.loads(line)["payload"]["event"]["round"] >= first_round), len(entries))
        path.write_text("".join(entries[:cut]))
    fed = run / FED
    entries = fed.read_text().splitlines(keepends=True)

    def first(entry: dict[str, Any]) -> int:
        p = entry["payload"]
        return p.get("round", p.get("first_round", -1)) if entry["kind"] != END else 10**9

    cut = next(i for i, line in enumerate(entries) if first(json.loads(line)) >= first_round)
    fed.write_text("".join(entries[:cut]))
    summary = json.loads((run / "summary.json").read_text())
    summary["rounds"] = [r for r in summary["rounds"] if r["round"] < first_round]
    unit = summary["privacy"].get("privacy_unit", "example")
    honest = audit(run, write=False)
    summary["privacy"]["epsilon_max"] = max(d.epsilon_by_unit[unit]["rdp"] for d in honest.devices)
    (run / "summary.json").write_text(json.dumps(summary))


def test_fleet_keyless_tail_cut_fails_on_the_end_record(tmp_path: Path) -> None:
    run = _secure_fleet(tmp_path)
    assert audit(run, write=False).passed
    before = json.loads((run / "summary.json").read_text())["privacy"]["epsilon_max"]
    _cut_from(run, 2)  # the whole DP-SGD span (rounds 2-3): devices and server alike
    assert json.loads((run / "summary.json").read_text())["privacy"]["epsilon_max"] < before  # understated
    result = audit(run, write=False)
    assert _checks(result) == {"federation.end"}, [f.message for f in result.failures]


def test_a_device_ledger_shorter_than_the_head_the_server_signed_fails(tmp_path: Path) -> None:
    run = _secure_fleet(tmp_path)
    fed = _lines(run / FED)
    assert fed[-1]["kind"] == END and fed[-1]["payload"]["last_round"] == 3
    heads = {d: h for e in fed[1:-1] for d, h in e["payload"]["extra"][LEDGER_HEADS].items()}
    assert len(heads) == 12
    path = run / "devices" / "device-00003" / DEVICE_LEDGER_NAME
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # its last complete entry
    result = audit(run, write=False)
    assert ("evidence.ledger_head", "device-00003", None) in _fails(result)


def test_a_federation_ledger_without_its_end_record_fails(tmp_path: Path) -> None:
    run = _secure_fleet(tmp_path)
    fed = run / FED
    fed.write_text("".join(fed.read_text().splitlines(keepends=True)[:-1]))
    assert ("federation.end", "server", None) in _fails(audit(run, write=False))


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


def test_flower_keyless_tail_cut_and_a_dropped_last_round_fail(tmp_path: Path, data: Path) -> None:
    """Flower engine: devices reply with their ledger head, the server signs it; cutting the newest
    round everywhere (summary edited to agree), or only the federation ledger's, FAILS."""
    simulate(build_config(None, overrides(tmp_path, num_server_rounds=3)), quiet=True)
    run = tmp_path / "run"
    fed = _lines(run / FED)
    assert fed[-1]["kind"] == END
    for e in fed[1:-1]:
        heads = e["payload"]["extra"][LEDGER_HEADS]
        assert set(heads) == set(e["payload"]["joined"]) and heads  # every arrived device's head, signed
        assert e["payload"]["extra"][PUBLIC_PARAMETERS]["noise_multiplier"] == 1.0
    assert audit(run, write=False).passed
    copy = shutil.copytree(run, tmp_path / "fed-only")
    lines = (copy / FED).read_text().splitlines(keepends=True)
    (copy / FED).write_text("".join(lines[:-2]))  # the last round and the end record
    assert "federation.end" in _checks(audit(copy, write=False))  # was a PASS with warnings
    one = shutil.copytree(run, tmp_path / "one-device")
    device = fed[-2]["payload"]["joined"][0]
    path = one / "devices" / device / DEVICE_LEDGER_NAME
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # its last complete entry
    assert ("evidence.ledger_head", device, None) in _fails(audit(one, write=False))
    _cut_from(run, 3)
    result = audit(run, write=False)
    assert _checks(result) == {"federation.end"}, [f.message for f in result.failures]


# ----------------------------------------------------------------------------- 3. min-separation
@pytest.mark.parametrize("linear_start", ["none", "suffstats"])
def test_an_honest_device_level_run_with_min_separation_passes_its_audit(tmp_path: Path, linear_start: str) -> None:
    policy = DevicePolicy(**{**DEVICE_POLICY.to_dict(), "min_separation": 2})
    summary = run_fleet(_device_cfg(tmp_path, "run", **{"num-server-rounds": 5, "linear-start": linear_start}),
                        policy)
    run = tmp_path / "run"
    rounds = sorted(DeviceLedger.open(run / "devices" / "device-00000", "device-00000").rounds())
    assert rounds == [1, 3, 5]  # the statistics round (or DP round) 1, then the DP-SGD rounds kept
    trained = [r["round"] for r in summary["rounds"] if r["phase"] == "dpsgd" and r["participants"] == 12]
    assert trained == ([3, 5] if linear_start == "suffstats" else [1, 3, 5])
    spans = [(e["payload"]["first_round"], e["payload"]["last_round"]) for e in _lines(run / FED)
             if e["kind"] == "span"]
    assert all(first == last for first, last in spans)  # the signed spans list exactly the rounds reserved
    result = audit(run, write=False)
    assert result.passed, [f.message for f in result.failures]
    assert main(["audit", str(run)]) == 0


# ----------------------------------------------------------------------------- 4. insiders with keys
def _resign_device(run: Path, device_id: str, sigma: float) -> None:
    """An insider re-signs a device's ledger with its own key from the key store, at another sigma."""
    folder = run / "devices" / device_id
    old = _lines(folder / DEVICE_LEDGER_NAME)
    policy = DevicePolicy.from_dict(old[0]["payload"]["policy"])
    (folder / DEVICE_LEDGER_NAME).unlink()
    led = DeviceLedger.open(folder, device_id, policy=policy, key_folder=key_store(run) / "devices" / device_id)
    assert (key_store(run) / "devices" / device_id / DEVICE_KEY_NAME).exists()
    seqs: dict[int, int] = {}
    for e in old[1:]:
        p = e["payload"]
        if e["kind"] == RESERVE:
            event = DPEvent.from_dict({**p["event"], "noise_multiplier": sigma})
            seqs[e["seq"]] = led.reserve(event, p.get("received"))
        elif e["kind"] == COMPLETE:
            led.complete(seqs[p["reserve_seq"]], float(led.epsilon(policy.delta)), p["status"],
                         received=p.get("received"))


def _resign_federation(run: Path, drop_device: str) -> None:
    """An insider re-signs the federation ledger with the server's key, leaving one device out."""
    path = run / FED
    old = _lines(path)
    keys = key_store(run) / "server"
    key = signing.load_or_create_private_key(keys / SERVER_KEY_NAME, keys / "server-key.pub.pem", create=False)
    header = {k: v for k, v in old[0]["payload"].items()
              if k not in ("public_key_hex", "public_key_pem", "key_fingerprint")}
    path.unlink()
    chain = SignedChain.open(path, key, header)
    for e in old[1:]:
        if e["kind"] == END:
            FederationLedger(chain).record_end()
            continue
        p = dict(e["payload"])
        for name in ("joined", "declined", "failed"):
            p[name] = [d for d in p[name] if d != drop_device]
        extra = dict(p["extra"])
        extra[LEDGER_HEADS] = {d: h for d, h in extra.get(LEDGER_HEADS, {}).items() if d != drop_device}
        p["extra"] = extra
        chain.append(e["kind"], p)
    assert old[0]["kind"] == HEADER


def test_a_device_ledger_resigned_at_another_sigma_fails(tmp_path: Path) -> None:
    """The Gaussian event carries sigma alone, so the server's signed parameters are what catch the forgery (a
    skellam event's mu would no longer match its sigma: tests/test_skellam_round.py)."""
    run = _secure_fleet(tmp_path, **{"distributed-mechanism": "gaussian"})
    _resign_device(run, "device-00005", 20.0)
    result = audit(run, write=False)
    mismatch = [f for f in result.failures if f.check == "params.mismatch"]
    assert mismatch and {f.device for f in mismatch} == {"device-00005"}
    assert "noise_multiplier 20.0" in mismatch[0].message
    assert not any(f.check.startswith("chain.") for f in result.failures)  # the forgery itself verifies


def test_a_device_cut_from_a_resigned_federation_ledger_fails(tmp_path: Path) -> None:
    run = _secure_fleet(tmp_path)
    _resign_federation(run, "device-00007")
    result = audit(run, write=False)
    assert ("federation.unrecorded", "device-00007") in {(f.check, f.device) for f in result.failures}
    assert "summary.participants" in _checks(result)  # the summary still counts the device


def test_a_summary_with_edited_participant_counts_fails(tmp_path: Path) -> None:
    run = _secure_fleet(tmp_path)
    path = run / "summary.json"
    summary = json.loads(path.read_text())
    summary["rounds"][1]["participants"] -= 1
    path.write_text(json.dumps(summary))
    result = audit(run, write=False)
    assert _checks(result) == {"summary.participants"} and "round 2" in result.failures[0].message


def test_the_end_record_must_match_what_precedes_it(tmp_path: Path) -> None:
    run = _run(tmp_path, n_devices=1, rounds=2)
    fed = FederationLedger.open(run / FED, tmp_path / "run.keys" / "server")
    fed._chain.append(END, {"last_round": 1, "rounds": 1, "devices": 0, "heads_digest": "0" * 64})
    assert any(f.check == "federation.end" and f.seq == 4 for f in audit(run, write=False).failures)


@pytest.mark.parametrize("over", [{"sample-rate": 0.2}, {"sample-rate": 0.0}, {"dp-mode": "local"},
                                  {"privacy-unit": "device"},
                                  {"budget-split": 0.3, "epsilon-budget": 4.0, "sample-rate": 0.1}])
@pytest.mark.parametrize("phase", ["suffstats", "dpsgd"])
def test_the_servers_public_parameters_are_what_every_device_spends(over: dict[str, Any], phase: str) -> None:
    """What the server signs per round and what a device's event carries come from one config: they agree."""
    from fed_nessa.config import Phase, from_run_config
    from fed_nessa.federated.device import RoundRequest, planned_event
    from fed_nessa.federated.mechanism import public_parameters
    from fed_nessa.federated.noise_plan import noise_plan
    from fed_nessa.privacy.events import PUBLIC_FIELDS

    cfg = from_run_config({"num-devices": 20, "min-arrivals": 8, "clients-per-round": 10, "secagg-num-shares": 5,
                           "secagg-reconstruction-threshold": 3, "distributed-mechanism": "gaussian", **over})
    params = public_parameters(Phase(phase), cfg, noise_plan(cfg, 20))
    assert params is not None and set(params) == set(PUBLIC_FIELDS)
    for n in (7, 30, 400):
        event = planned_event(RoundRequest(Phase(phase), 2, 8, 20), n, cfg, DevicePolicy(guaranteed_arrivals=8))
        assert event is not None
        assert {k: getattr(event, k) for k in PUBLIC_FIELDS if params[k] is not None} == \
            {k: v for k, v in params.items() if v is not None}
    none = cfg.replace(dp_mode="none", budget_split=0.0)
    assert public_parameters(Phase(phase), none, noise_plan(none, 20)) is None
