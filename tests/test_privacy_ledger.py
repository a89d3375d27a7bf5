"""DeviceLedger / FederationLedger: two-phase spends, restarts, refusing tampered ledgers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fed_nessa.config import DevicePolicy
from fed_nessa.privacy.accounting import compute_epsilon
from fed_nessa.privacy.budget import BudgetExceededError
from fed_nessa.privacy.chain import LedgerError
from fed_nessa.privacy.events import DPEvent
from fed_nessa.privacy.ledger import DEVICE_LEDGER_NAME, DeviceLedger, FederationLedger

torch.set_num_threads(1)
DELTA = 1e-5


def _ev(r: int, steps: int = 10) -> DPEvent:
    return DPEvent(round=r, mechanism="dp-sgd", steps=steps, sample_rate=0.1, noise_multiplier=1.0,
                   clip_norm=1.0, delta=DELTA, mode="local")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reserve_complete_and_reopen_continue_one_chain(tmp_path: Path) -> None:
    led = DeviceLedger.open(tmp_path, "dev-1")
    s = led.reserve(_ev(1))
    led.complete(s, led.epsilon(DELTA))
    assert (tmp_path / "device-key.pem").exists() and (tmp_path / "device-key.pub.pem").exists()
    again = DeviceLedger.open(tmp_path, "dev-1")  # a new ClientApp object / process
    s2 = again.reserve(_ev(2))
    again.complete(s2, again.epsilon(DELTA))
    entries = _lines(tmp_path / DEVICE_LEDGER_NAME)
    assert [e["kind"] for e in entries] == ["header", "reserve", "complete", "reserve", "complete"]
    assert [e["seq"] for e in entries] == list(range(5))
    assert all(e["schema_version"] == 1 for e in entries)
    assert entries[0]["payload"]["key_fingerprint"] == again.key_fingerprint
    assert again.epsilon(DELTA) == pytest.approx(compute_epsilon([_ev(1, 20)], DELTA))


def test_crash_between_reserve_and_complete_is_counted_once(tmp_path: Path) -> None:
    led = DeviceLedger.open(tmp_path, "d")
    led.reserve(_ev(1))  # the process dies while the mechanism runs: no complete
    restarted = DeviceLedger.open(tmp_path, "d")
    assert restarted.pending() == [1]
    assert len(restarted.events()) == 1  # counted, conservatively
    s = restarted.reserve(_ev(2))
    restarted.complete(s, restarted.epsilon(DELTA))
    final = DeviceLedger.open(tmp_path, "d")
    assert len(final.events()) == 2  # neither lost nor double-counted
    assert final.epsilon(DELTA) == pytest.approx(compute_epsilon([_ev(1), _ev(2)], DELTA))
    # The dangling reservation can still be closed later, once only.
    final.complete(1, final.epsilon(DELTA), status="failed")
    with pytest.raises(ValueError, match="already completed"):
        final.complete(1, final.epsilon(DELTA))


def test_torn_tail_from_a_crash_mid_write_is_set_aside(tmp_path: Path) -> None:
    led = DeviceLedger.open(tmp_path, "d")
    led.reserve(_ev(1))
    path = tmp_path / DEVICE_LEDGER_NAME
    with open(path, "ab") as fh:
        fh.write(b'{"kind":"reserve","payl')  # no newline: the write never finished
    again = DeviceLedger.open(tmp_path, "d")
    assert len(again.events()) == 1
    assert (tmp_path / f"{DEVICE_LEDGER_NAME}.torn-0").read_bytes() == b'{"kind":"reserve","payl'
    again.reserve(_ev(2))
    assert len(DeviceLedger.open(tmp_path, "d").events()) == 2


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "rekey"])
def test_a_tampered_ledger_is_never_extended(tmp_path: Path, tamper: str) -> None:
    led = DeviceLedger.open(tmp_path, "d")
    for r in range(3):
        led.complete(led.reserve(_ev(r)), led.epsilon(DELTA))
    path = tmp_path / DEVICE_LEDGER_NAME
    lines = path.read_text().splitlines()
    if tamper == "edit":
        lines[3] = lines[3].replace('"steps":10', '"steps":1')
    elif tamper == "delete":
        del lines[3]
    elif tamper == "reorder":
        lines[3], lines[5] = lines[5], lines[3]
    else:
        (tmp_path / "device-key.pem").unlink()
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises((LedgerError, ValueError)) as err:
        DeviceLedger.open(tmp_path, "d")
    assert str(path) in str(err.value) or "device-key.pem" in str(err.value)
    if tamper != "rekey":
        assert "seq 3" in str(err.value) or "seq 5" in str(err.value)


def test_another_device_key_cannot_continue_the_ledger(tmp_path: Path) -> None:
    DeviceLedger.open(tmp_path / "a", "a").reserve(_ev(1))
    DeviceLedger.open(tmp_path / "b", "b")
    (tmp_path / "a" / "device-key.pem").write_bytes((tmp_path / "b" / "device-key.pem").read_bytes())
    with pytest.raises(LedgerError, match="key_mismatch"):
        DeviceLedger.open(tmp_path / "a", "a")


def test_wrong_device_id_is_refused(tmp_path: Path) -> None:
    DeviceLedger.open(tmp_path, "a")
    with pytest.raises(LedgerError, match="belongs to device 'a'"):
        DeviceLedger.open(tmp_path, "b")


def test_concurrent_writer_is_detected(tmp_path: Path) -> None:
    one = DeviceLedger.open(tmp_path, "d")
    two = DeviceLedger.open(tmp_path, "d")
    one.reserve(_ev(1))
    with pytest.raises(LedgerError, match="changed on disk"):
        two.reserve(_ev(2))


def test_budget_is_recorded_enforced_and_fixed(tmp_path: Path) -> None:
    led = DeviceLedger.open(tmp_path, "d", epsilon_budget=4.0, delta=DELTA)
    assert led.check_budget(_ev(1), 4.0, DELTA).allowed
    led.complete(led.reserve(_ev(1)), led.epsilon(DELTA))  # eps 3.44
    decision = led.check_budget(_ev(2), 4.0, DELTA)  # would be 4.22
    assert not decision.allowed and "declined" in decision.reason
    assert decision.epsilon_now == pytest.approx(3.44, abs=0.01)
    with pytest.raises(BudgetExceededError):
        led.reserve(_ev(2))
    # A larger budget (or delta) asked by a run is declined with the reason, never adopted.
    larger = led.check_budget(_ev(2), 5.0, DELTA)
    assert not larger.allowed and "beyond this device's policy (epsilon 4" in larger.reason
    assert not led.check_budget(_ev(2), 4.0, 1e-4).allowed
    assert led.budget.epsilon == 4.0
    with pytest.raises(ValueError, match="fixed"):
        DeviceLedger.open(tmp_path, "d", epsilon_budget=9.0, delta=DELTA)
    entries = _lines(tmp_path / DEVICE_LEDGER_NAME)
    assert entries[0]["payload"]["budget"] == {"epsilon": 4.0, "delta": DELTA, "accountant": "rdp"}
    assert entries[1]["payload"]["budget"]["epsilon"] == 4.0


def test_the_policy_is_written_at_first_open_and_restored_on_every_reopen(tmp_path: Path) -> None:
    """Defect 1: a device's policy lives in its ledger header; a later, looser policy changes nothing."""
    own = DevicePolicy(epsilon_budget=4.0, delta=DELTA, guaranteed_arrivals=20)
    led = DeviceLedger.open(tmp_path, "d", policy=own)
    assert led.policy == own and led.budget.epsilon == 4.0
    header = _lines(tmp_path / DEVICE_LEDGER_NAME)[0]["payload"]
    assert header["policy"] == own.to_dict() and header["budget"]["epsilon"] == 4.0
    led.complete(led.reserve(_ev(1)), led.epsilon(DELTA))
    looser = DevicePolicy(epsilon_budget=100.0, delta=1e-3, guaranteed_arrivals=1, allow_non_dp=True)
    again = DeviceLedger.open(tmp_path, "d", policy=looser)
    assert again.policy == own and again.budget.epsilon == 4.0 and again.budget.delta == DELTA
    assert not again.check_budget(_ev(2), 100.0, DELTA).allowed
    with pytest.raises(BudgetExceededError):
        again.reserve(_ev(2))  # 4.22 > 4: the header's budget binds reserve() too
    assert _lines(tmp_path / DEVICE_LEDGER_NAME)[0]["payload"]["policy"] == own.to_dict()


def test_a_device_with_a_policy_refuses_a_ledger_made_without_one(tmp_path: Path) -> None:
    DeviceLedger.open(tmp_path, "d")
    with pytest.raises(LedgerError, match="holds no device policy"):
        DeviceLedger.open(tmp_path, "d", policy=DevicePolicy())


def test_budget_given_only_to_check_budget_is_recorded_in_reserves(tmp_path: Path) -> None:
    led = DeviceLedger.open(tmp_path, "d")
    led.check_budget(_ev(1), 6.0, DELTA)
    led.reserve(_ev(1))
    assert _lines(tmp_path / DEVICE_LEDGER_NAME)[1]["payload"]["budget"]["epsilon"] == 6.0


def test_complete_validates_its_arguments(tmp_path: Path) -> None:
    led = DeviceLedger.open(tmp_path, "d")
    s = led.reserve(_ev(1))
    with pytest.raises(ValueError, match="not a reserve"):
        led.complete(0, 1.0)
    with pytest.raises(ValueError, match="status"):
        led.complete(s, 1.0, status="ok")
    with pytest.raises(ValueError, match="epsilon_after"):
        led.complete(s, float("nan"))


def test_federation_ledger_records_rounds_and_rejects_overlaps(tmp_path: Path) -> None:
    fed = FederationLedger.open(tmp_path / "run" / "federation-ledger.jsonl", tmp_path / "keys")
    fed.record_round(1, ["a", "b"], ["c"], [], {"eer": 0.1})
    with pytest.raises(ValueError, match="both joined and failed"):
        fed.record_round(2, ["a"], [], ["a"])
    again = FederationLedger.open(tmp_path / "run" / "federation-ledger.jsonl", tmp_path / "keys")
    again.record_round(2, ["a"], [], ["b"])
    assert [r["round"] for r in again.rounds()] == [1, 2]
    assert (tmp_path / "run" / "server-key.pub.pem").exists()
    assert not (tmp_path / "run" / "server-key.pem").exists()


# ----------------------------------------------------------------------------- spans
def _span(first: int, last: int) -> DPEvent:
    return DPEvent(round=first, last_round=last, mechanism="dp-sgd", steps=last - first + 1, sample_rate=0.02,
                   noise_multiplier=1.5, clip_norm=1.0, delta=DELTA, mode="distributed")


def test_a_span_reservation_covers_all_its_rounds_and_one_complete_closes_it(tmp_path: Path) -> None:
    led = DeviceLedger.open(tmp_path, "d", epsilon_budget=10.0, delta=DELTA)
    led.complete(led.reserve(_ev(0, steps=1)), led.epsilon(DELTA))
    seq = led.reserve(_span(1, 100))
    assert led.pending() == [seq] and led.rounds() == set(range(0, 101)) and led.participations() == 101
    led.complete(seq, led.epsilon(DELTA), status="failed")  # dropped out: still counted in full
    again = DeviceLedger.open(tmp_path, "d")
    assert again.pending() == [] and again.participations() == 101
    assert again.events()[1] == _span(1, 100)
    per_round = [_ev(0, steps=1)] + [DPEvent(round=r, mechanism="dp-sgd", steps=1, sample_rate=0.02,
                                             noise_multiplier=1.5, clip_norm=1.0, delta=DELTA,
                                             mode="distributed") for r in range(1, 101)]
    assert again.epsilon(DELTA) == pytest.approx(compute_epsilon(per_round, DELTA), rel=1e-9)
    lines = _lines(tmp_path / DEVICE_LEDGER_NAME)
    assert len(lines) == 5 and "last_round" not in lines[1]["payload"]["event"]
    assert lines[3]["payload"]["event"]["last_round"] == 100


def test_record_span_writes_one_entry_and_reads_back_equal(tmp_path: Path) -> None:
    from fed_nessa.privacy.ledger import dropped_by_round

    path = tmp_path / "run" / "federation-ledger.jsonl"
    fed = FederationLedger.open(path, tmp_path / "keys")
    fed.record_round(0, ["a", "b", "c"], [], [])
    ids = [f"d{i}" for i in range(12)]
    seq = fed.record_span(1, 1000, ["a", "b", *ids], ["c"], [], {"dropped": {17: ["b"], 9: ["a", "b"]}, "q": 0.02})
    assert seq == 2 and len(_lines(path)) == 3
    again = FederationLedger.open(path, tmp_path / "keys")
    assert again.spans() == fed.spans() and again.rounds() == fed.rounds() == [fed.rounds()[0]]
    [span] = again.spans()
    assert (span["first_round"], span["last_round"], span["declined"], span["failed"]) == (1, 1000, ["c"], [])
    assert span["extra"]["dropped"] == {"9": ["a", "b"], "17": ["b"]} and span["extra"]["q"] == 0.02
    assert dropped_by_round(span) == {9: ["a", "b"], 17: ["b"]}
    again.record_span(1001, 1001, ["a"], [], [])  # a one-round span, no drop-outs
    assert dropped_by_round(again.spans()[-1]) == {}


@pytest.mark.parametrize("args,match", [
    ((5, 4, ["a"], [], []), "before first_round"),
    ((-1, 4, ["a"], [], []), "first_round"),
    ((1, 4, ["a"], ["a"], []), "both joined and declined"),
    ((1, 4, ["a"], [], [], {"dropped": {5: ["a"]}}), "outside the span"),
    ((1, 4, ["a"], [], [], {"dropped": {2: ["z"]}}), "did not join"),
    ((1, 4, ["a"], [], [], {"dropped": {"x": ["a"]}}), "not a round"),
    ((1, 4, ["a"], [], [], {"dropped": {2: "a"}}), "list of device ids"),
])
def test_record_span_validates(tmp_path: Path, args: tuple, match: str) -> None:
    fed = FederationLedger.open(tmp_path / "federation-ledger.jsonl", tmp_path)
    with pytest.raises(ValueError, match=match):
        fed.record_span(*args)
    assert fed.spans() == []
