"""The audit catches every tampering case, wrong report, over-budget device and missing spend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fed_nessa.cli import main
from fed_nessa.privacy import signing
from fed_nessa.privacy.accounting import compute_epsilon
from fed_nessa.privacy.audit import audit
from fed_nessa.privacy.chain import SignedChain, signed_bytes
from fed_nessa.privacy.events import DPEvent
from fed_nessa.privacy.ledger import (
    CHAIN_SCHEME,
    DEVICE_LEDGER_NAME,
    DeviceLedger,
    FederationLedger,
    config_sha256,
    model_sha256,
    received_chain,
)
from fed_nessa.privacy.statement import privacy_statement

torch.set_num_threads(1)
DELTA = 1e-5
BUDGET = 6.0


def _ev(r: int, steps: int = 10) -> DPEvent:
    return DPEvent(round=r, mechanism="dp-sgd", steps=steps, sample_rate=0.1, noise_multiplier=1.0,
                   clip_norm=1.0, delta=DELTA, mode="local")


def _sent(r: int) -> tuple[str, str]:
    """The (model, config) SHA-256 the server of these fixtures sends in round ``r``."""
    return model_sha256(np.full(4, float(r), np.float32)), config_sha256({"round": r})


def _received(r: int, fed: FederationLedger) -> dict:
    model, config = _sent(r)
    return {"round": r, "model_sha256": model, "config_sha256": config, "server_key_fingerprint": fed.key_fingerprint}


def _chain(first: int, last: int) -> dict:
    return {"scheme": CHAIN_SCHEME, "rounds": [[first, last]],
            "chain": received_chain((r, *_sent(r)) for r in range(first, last + 1))}


def _sent_extra(r: int, pins: dict[str, str]) -> dict:
    model, config = _sent(r)
    return {"model_sha256": model, "config_sha256": config, "device_key_fingerprints": pins}


def _run(tmp_path: Path, n_devices: int = 3, rounds: int = 3) -> Path:
    """A run folder laid out as the simulation writes it (the contract in the brief)."""
    run = tmp_path / "run"
    fed = FederationLedger.open(run / "federation-ledger.jsonl", tmp_path / "run.keys" / "server")
    pinned: set[str] = set()
    for r in range(1, rounds + 1):
        joined, pins = [], {}
        for i in range(n_devices):
            led = DeviceLedger.open(run / "devices" / f"dev{i}", f"dev{i}",
                                    key_folder=tmp_path / "run.keys" / f"dev{i}")
            if f"dev{i}" not in pinned:
                pins[f"dev{i}"] = led.key_fingerprint
                pinned.add(f"dev{i}")
            if led.check_budget(_ev(r), BUDGET, DELTA).allowed:
                led.complete(led.reserve(_ev(r), _received(r, fed)), led.epsilon(DELTA))
                joined.append(f"dev{i}")
        fed.record_round(r, joined, [], [], _sent_extra(r, pins))
    fed.record_end()
    statement = privacy_statement("local", DELTA, BUDGET, "rdp")
    statement["epsilon_max"] = compute_epsilon([_ev(1, 10 * rounds)], DELTA)
    (run / "summary.json").write_text(json.dumps({"privacy": statement}))
    return run


def _ledger(run: Path, i: int) -> Path:
    return run / "devices" / f"dev{i}" / DEVICE_LEDGER_NAME


def _fails(result) -> set[tuple[str, str | None, int | None]]:
    return {(f.check, f.device, f.seq) for f in result.failures}


def test_clean_run_passes_and_writes_the_report(tmp_path: Path) -> None:
    run = _run(tmp_path)
    result = audit(run)
    assert result.passed, [f.message for f in result.findings]
    out = run / "audit"
    data = json.loads((out / "audit.json").read_text())
    assert data["verdict"] == "pass" and data["counts"]["devices"] == 3
    dev = data["devices"][0]
    assert dev["epsilon"]["rdp"] == pytest.approx(4.848, abs=0.005)  # 30 steps, q=0.1, sigma=1
    assert dev["epsilon"]["pld"] == pytest.approx(4.19, abs=0.03)
    assert [p["round"] for p in dev["epsilon_per_round"]] == [1, 2, 3]
    report = (out / "report.md").read_text()
    for text in ("Verdict: PASS", "one utterance pair", "add/remove one", "participation",
                 "| dp-sgd | example | local | 0.1 | 1 | 1 | 1e-05 |", "epsilon-distribution.png", "Federation ledger"):
        assert text in report
    assert (out / "epsilon-distribution.png").stat().st_size > 1000
    assert (out / "epsilon-per-round.png").stat().st_size > 1000


def _rewrite(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


def test_edited_entry_is_named(tmp_path: Path) -> None:
    run = _run(tmp_path)
    # Lower the steps of dev1's second reservation (seq 3) to hide a spend.
    _rewrite(_ledger(run, 1), lambda ls: ls[:3] + [ls[3].replace('"steps":10', '"steps":2')] + ls[4:])
    result = audit(run)
    assert not result.passed
    assert ("chain.signature", "dev1", 3) in _fails(result)
    assert "entry seq 3" in (run / "audit" / "report.md").read_text()


def test_deleted_entry_is_named(tmp_path: Path) -> None:
    run = _run(tmp_path)
    _rewrite(_ledger(run, 0), lambda ls: ls[:3] + ls[4:])  # drop reserve seq 3
    fails = _fails(audit(run))
    assert ("chain.seq", "dev0", 4) in fails and ("chain.prev_hash", "dev0", 4) in fails


def test_reordered_entries_are_named(tmp_path: Path) -> None:
    run = _run(tmp_path)
    _rewrite(_ledger(run, 2), lambda ls: ls[:1] + [ls[3], ls[4], ls[1], ls[2]] + ls[5:])
    fails = _fails(audit(run))
    assert ("chain.seq", "dev2", 3) in fails and ("chain.seq", "dev2", 1) in fails


def test_entry_forged_with_another_key_is_named(tmp_path: Path) -> None:
    run = _run(tmp_path)
    path = _ledger(run, 1)
    entries = [json.loads(x) for x in path.read_text().splitlines()]
    other = signing.load_or_create_private_key(tmp_path / "o.pem", tmp_path / "o.pub", create=True)
    forged = dict(entries[6])  # replace the last complete entry, claiming a tiny epsilon
    forged["payload"] = {**forged["payload"], "epsilon_after": 0.1}
    forged["signature"] = signing.sign(other, signed_bytes(forged))
    path.write_text("\n".join(json.dumps(e) for e in entries[:6] + [forged]) + "\n")
    fails = _fails(audit(run))
    assert ("chain.signature", "dev1", 6) in fails
    assert ("reported", "dev1", 6) in fails


def test_wholesale_rekeyed_ledger_is_caught_by_the_public_key_file(tmp_path: Path) -> None:
    run = _run(tmp_path, n_devices=1, rounds=1)
    folder = run / "devices" / "dev0"
    pub = (folder / "device-key.pub.pem").read_bytes()
    (folder / DEVICE_LEDGER_NAME).unlink()
    (tmp_path / "run.keys" / "dev0" / "device-key.pem").unlink()  # (the key store is not in the run folder)
    led = DeviceLedger.open(folder, "dev0")  # a forger's fresh key and a fresh, smaller history
    led.check_budget(_ev(1, 1), BUDGET, DELTA)
    led.complete(led.reserve(_ev(1, 1)), led.epsilon(DELTA))
    (folder / "device-key.pub.pem").write_bytes(pub)  # the auditor's copy of the real key
    assert ("chain.key_mismatch", "dev0", 0) in _fails(audit(run))


def test_wrong_reported_epsilon_is_named(tmp_path: Path) -> None:
    run = tmp_path / "run"
    led = DeviceLedger.open(run / "devices" / "liar", "liar", epsilon_budget=BUDGET, delta=DELTA)
    led.complete(led.reserve(_ev(1)), led.epsilon(DELTA))
    led.complete(led.reserve(_ev(2)), 0.9 * led.epsilon(DELTA))  # under-reports by 10%
    result = audit(run / "devices")  # the collected device ledgers (a run folder would need its federation ledger)
    assert _fails(result) == {("reported", "liar", 4)}
    assert "liar" in (run / "devices" / "audit" / "report.md").read_text()


def test_an_overstated_epsilon_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    """A ledger reporting MORE epsilon than its events give (one written under an older, looser accountant) is
    conservative: a warning that says why, never a failure; under-reporting stays a failure (above)."""
    run = tmp_path / "run"
    led = DeviceLedger.open(run / "devices" / "old", "old", epsilon_budget=BUDGET, delta=DELTA)
    led.complete(led.reserve(_ev(1)), 1.1 * led.epsilon(DELTA))
    result = audit(run / "devices")
    assert _fails(result) == set()
    warned = [f for f in result.findings if f.severity == "warn" and f.check == "reported"]
    assert len(warned) == 1 and "conservative" in warned[0].message and warned[0].device == "old"


def _write_raw_ledger(folder: Path, device_id: str, budget: float, events: list[DPEvent]) -> None:
    """A ledger written by device software that ignored its budget (valid signatures)."""
    folder.mkdir(parents=True)
    key = signing.load_or_create_private_key(folder / "device-key.pem", folder / "device-key.pub.pem", True)
    b = {"epsilon": budget, "delta": DELTA, "accountant": "rdp"}
    chain = SignedChain.open(folder / DEVICE_LEDGER_NAME, key, {"role": "device", "device_id": device_id,
                                                               "budget": b})
    for i, ev in enumerate(events):
        seq = chain.append("reserve", {"event": ev.to_dict(), "budget": b})["seq"]
        eps = compute_epsilon(events[: i + 1], DELTA)
        chain.append("complete", {"reserve_seq": seq, "status": "done", "epsilon_after": eps,
                                  "accountant": "rdp", "delta": DELTA})


def test_over_budget_device_fails(tmp_path: Path) -> None:
    run = tmp_path / "fleet"
    _write_raw_ledger(run / "a", "a", 4.0, [_ev(1), _ev(2), _ev(3)])  # 4.85 > 4
    _write_raw_ledger(run / "b", "b", 5.0, [_ev(1), _ev(2), _ev(3)])  # 4.85 <= 5
    result = audit(run)
    assert _fails(result) == {("budget", "a", None)}
    assert "over the budget 4" in result.failures[0].message


def test_server_says_joined_but_the_ledger_lost_the_round(tmp_path: Path) -> None:
    run = _run(tmp_path)
    _rewrite(_ledger(run, 0), lambda ls: ls[:5])  # truncate: round 3's entries are gone
    result = audit(run)
    assert ("federation.joined", "dev0", None) in _fails(result)
    assert "round 3" in " ".join(f.message for f in result.failures)


def test_tampered_federation_ledger_is_caught(tmp_path: Path) -> None:
    run = _run(tmp_path)
    _rewrite(run / "federation-ledger.jsonl", lambda ls: ls[:1] + [ls[1].replace('"dev2"', '"devX"')] + ls[2:])
    assert ("federation.signature", "server", 1) in _fails(audit(run))


def test_crash_leaves_a_warning_not_a_failure_and_is_counted_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    led = DeviceLedger.open(run / "d", "d", epsilon_budget=BUDGET, delta=DELTA)
    led.complete(led.reserve(_ev(1)), led.epsilon(DELTA))
    led.reserve(_ev(2))  # crash during round 2's training
    led = DeviceLedger.open(run / "d", "d")  # restart
    led.complete(led.reserve(_ev(3)), led.epsilon(DELTA))
    result = audit(run)
    assert result.passed
    assert {(f.check, f.seq) for f in result.findings} == {("pending", 3)}
    assert result.devices[0].epsilon["rdp"] == pytest.approx(compute_epsilon([_ev(1, 30)], DELTA))


def test_single_ledger_file_copied_off_a_device(tmp_path: Path) -> None:
    run = _run(tmp_path, n_devices=1, rounds=2)
    copy = tmp_path / "copied"
    copy.mkdir()
    for name in (DEVICE_LEDGER_NAME, "device-key.pub.pem"):
        (copy / name).write_bytes((run / "devices" / "dev0" / name).read_bytes())
    result = audit(copy / DEVICE_LEDGER_NAME)
    assert result.passed and len(result.devices) == 1
    assert (copy / "audit" / "report.md").exists()


def test_summary_claim_is_checked_against_the_ledgers(tmp_path: Path) -> None:
    run = _run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["privacy"]["epsilon_max"] = 2.0
    (run / "summary.json").write_text(json.dumps(summary))
    assert ("summary.epsilon_max", None, None) in _fails(audit(run))


def test_cli_exit_status(tmp_path: Path, capsys) -> None:
    run = _run(tmp_path, n_devices=2, rounds=1)
    assert main(["audit", str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "audit.json").exists()
    _rewrite(_ledger(run, 1), lambda ls: ls[:1] + [ls[1].replace('"steps":10', '"steps":9')] + ls[2:])
    assert main(["audit", str(run)]) == 1
    assert "FAIL chain.signature device dev1 seq 1" in capsys.readouterr().out
    assert main(["audit", str(tmp_path / "nowhere")]) == 2
    assert main(["audit", str(run), "--accountants", "rdp"]) == 2


# ----------------------------------------------------------------------------- spans (fleet scale)
SPAN_ROUNDS = 50


def _gs() -> DPEvent:
    return DPEvent(round=0, mechanism="gaussian-sum", steps=1, sample_rate=1.0, noise_multiplier=5.0,
                   clip_norm=1.0, delta=DELTA, mode="distributed")


def _span(first: int, last: int, q: float = 0.02) -> DPEvent:
    return DPEvent(round=first, last_round=last, mechanism="dp-sgd", steps=last - first + 1, sample_rate=q,
                   noise_multiplier=1.5, clip_norm=1.0, delta=DELTA, mode="distributed")


def _span_run(tmp_path: Path, spans: dict[str, DPEvent], dropped: dict | None = None,
              declined: tuple[str, ...] = ()) -> Path:
    """Fleet layout: a gaussian-sum in round 0, then one span reservation per device and ONE server span."""
    run = tmp_path / "run"
    fed = FederationLedger.open(run / "federation-ledger.jsonl", tmp_path / "run.keys" / "server")
    pins = {}
    for device_id, span in spans.items():
        led = DeviceLedger.open(run / "devices" / device_id, device_id, epsilon_budget=BUDGET, delta=DELTA,
                                key_folder=tmp_path / "run.keys" / device_id)
        pins[device_id] = led.key_fingerprint
        led.complete(led.reserve(_gs(), _received(0, fed)), led.epsilon(DELTA))
        seq = led.reserve(span, {"server_key_fingerprint": fed.key_fingerprint})
        # the chain covers the rounds the server ran (a span may reserve beyond them)
        led.complete(seq, led.epsilon(DELTA), received=_chain(span.round, min(span.end_round, SPAN_ROUNDS)))
    joined = [d for d in spans if d not in declined]
    rounds = range(0, SPAN_ROUNDS + 1)
    fed.record_span(0, SPAN_ROUNDS, joined, list(declined), [],
                    {"dropped": dropped or {}, "models": {str(r): list(_sent(r)) for r in rounds},
                     "model_chain": received_chain((r, *_sent(r)) for r in rounds),
                     "device_key_fingerprints": pins})
    fed.record_end()
    return run


def test_consistent_span_run_passes_with_one_accounting_per_accountant(tmp_path: Path) -> None:
    run = _span_run(tmp_path, {f"dev{i}": _span(1, SPAN_ROUNDS) for i in range(4)}, dropped={7: ["dev1"]})
    result = audit(run)
    assert result.passed and result.findings == [], [f.message for f in result.findings]
    assert result.performance["accounting"] == {"misses": 2, "hits": 6}  # 4 identical histories, 2 accountants
    want = compute_epsilon([_gs(), _span(1, SPAN_ROUNDS)], DELTA)
    data = json.loads((run / "audit" / "audit.json").read_text())
    dev = data["devices"][0]
    assert dev["epsilon"]["rdp"] == pytest.approx(want)
    assert (dev["rounds_covered"], dev["round_spans"]) == (SPAN_ROUNDS + 1, [[0, SPAN_ROUNDS]])
    assert [p["round"] for p in dev["epsilon_per_round"]] == [0, 1, SPAN_ROUNDS]
    assert data["federation"]["spans"][0] | {"seq": 1} == {"seq": 1, "first_round": 0, "last_round": SPAN_ROUNDS,
                                                          "joined": 4, "declined": 0, "failed": 0, "dropouts": 1}
    assert f"| 0..{SPAN_ROUNDS} | 4 | 0 | 0 | 1 |" in (run / "audit" / "report.md").read_text()


def test_span_that_misses_a_joined_round_fails_and_names_it(tmp_path: Path) -> None:
    spans = {"dev0": _span(1, SPAN_ROUNDS), "dev1": _span(1, SPAN_ROUNDS - 5), "dev2": _span(1, SPAN_ROUNDS - 1)}
    run = _span_run(tmp_path, spans, dropped={SPAN_ROUNDS: ["dev2"]})  # dev2 dropped out of the last round
    result = audit(run)
    assert _fails(result) == {("federation.joined", "dev1", None)}
    [finding] = result.failures
    assert f"rounds {SPAN_ROUNDS - 4}..{SPAN_ROUNDS}" in finding.message


def test_span_declined_and_unrecorded_reservations_fail(tmp_path: Path) -> None:
    """Issue 17 (6): a reservation the server's signed record does not account for (declined, or not
    listed at all) is two signed records that disagree: FAIL, not a warning."""
    spans = {"dev0": _span(1, SPAN_ROUNDS + 3), "dev1": _span(1, SPAN_ROUNDS)}
    result = audit(_span_run(tmp_path, spans, declined=("dev1",)))
    assert not result.passed
    # As for round records, a declined-yet-reserved device is also unrecorded for those rounds.
    assert _fails(result) == {("federation.declined", "dev1", 1), ("federation.unrecorded", "dev1", 1),
                              ("federation.unrecorded", "dev1", 3), ("federation.unrecorded", "dev0", 3)}
    unrecorded = next(f for f in result.findings if f.check == "federation.unrecorded" and f.device == "dev0")
    assert f"rounds {SPAN_ROUNDS + 1}..{SPAN_ROUNDS + 3}" in unrecorded.message


def test_round_records_and_spans_mix_in_one_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fed = FederationLedger.open(run / "federation-ledger.jsonl", tmp_path / "keys")
    led = DeviceLedger.open(run / "devices" / "d", "d", epsilon_budget=BUDGET, delta=DELTA)
    led.complete(led.reserve(_gs(), _received(0, fed)), led.epsilon(DELTA))  # an old-style single-round phase...
    fed.record_round(0, ["d"], [], [], _sent_extra(0, {"d": led.key_fingerprint}))
    led.complete(led.reserve(_span(1, 10)), led.epsilon(DELTA), received=_chain(1, 10))  # ...then the fleet's span
    fed.record_span(1, 10, ["d"], [], [], {"models": {str(r): list(_sent(r)) for r in range(1, 11)}})
    fed.record_end()
    assert audit(run).passed, [f.message for f in audit(run).failures]
    fed.record_round(11, ["d"], [], [], _sent_extra(11, {}))  # the server claims a round the device never reserved
    fed.record_end()
    result = audit(run)
    assert _fails(result) == {("federation.joined", "d", None)} and "round 11" in result.failures[0].message


def test_malformed_span_entry_is_a_schema_failure(tmp_path: Path) -> None:
    run = _span_run(tmp_path, {"dev0": _span(1, SPAN_ROUNDS)})
    fed = FederationLedger.open(run / "federation-ledger.jsonl", tmp_path / "run.keys" / "server")
    fed._chain.append("span", {"first_round": 9, "last_round": 3, "joined": ["dev0"], "declined": [],
                               "failed": [], "extra": {}})  # signed, but not a span record_span would write
    assert ("federation.schema", "server", 3) in _fails(audit(run))  # after the span (1) and the end record (2)


def test_memoised_audit_gives_each_device_its_own_epsilons(tmp_path: Path) -> None:
    from fed_nessa.privacy.accounting import epsilon_curve

    spans = {"a": _span(1, SPAN_ROUNDS), "b": _span(1, SPAN_ROUNDS), "c": _span(1, SPAN_ROUNDS, q=0.05),
             "d": _span(1, 20)}
    run = _span_run(tmp_path, spans, dropped={r: ["d"] for r in range(21, SPAN_ROUNDS + 1)})
    result = audit(run, write=False)
    assert result.passed, [f.message for f in result.findings]
    assert result.performance["accounting"] == {"misses": 6, "hits": 2}  # a and b share; c and d do not
    for dev in result.devices:
        for acc in ("rdp", "pld"):
            assert dev.epsilon[acc] == epsilon_curve(dev.events, DELTA, acc)[-1]  # no memo
    eps = {d.device_id: d.epsilon["rdp"] for d in result.devices}
    assert eps["a"] == eps["b"] and eps["c"] > eps["a"] > eps["d"]


def test_the_library_audit_refuses_unreadable_inputs_with_the_file_named(tmp_path: Path) -> None:
    """The CLI checks these first; the library function says the same when called directly."""
    run = tmp_path / "run"
    (run / "federation-ledger.jsonl").mkdir(parents=True)
    with pytest.raises(ValueError, match="federation-ledger.jsonl: not a file"):
        audit(run, write=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text("[1, 2]")
    (other / "devices").mkdir()
    with pytest.raises(ValueError, match="summary.json: a run summary is a JSON object"):
        audit(other, write=False)
