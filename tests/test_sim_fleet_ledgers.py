"""The fleet's ledger book (fed_nessa.sim.fleet_ledgers): span schedules and the evidence of what each round sent.
The spans' ledgers end to end are tests/test_sim_fleet.py's (audited runs)."""

from __future__ import annotations

import numpy as np

from fed_nessa.config import DevicePolicy
from fed_nessa.federated.engine import Pins
from fed_nessa.privacy.ledger import CHAIN_SCHEME, config_sha256, model_sha256
from fed_nessa.sim.fleet_ledgers import DeviceBook, _runs, _separated


def test_runs_of_consecutive_rounds() -> None:
    assert _runs((2, 3, 4, 7, 9, 10)) == [(2, 4), (7, 7), (9, 10)]
    assert _runs(()) == []


def test_min_separation_keeps_the_earliest_rounds_apart_from_the_ledgers_rounds() -> None:
    every = DevicePolicy(min_separation=1)
    assert _separated([1, 2, 3], {2}, every) == [1, 3]  # a round already joined is not joined twice
    two = DevicePolicy(min_separation=2)
    assert _separated([2, 3, 4, 5, 6], set(), two) == [2, 4, 6]
    assert _separated([2, 3, 4, 5], {1}, two) == [3, 5]  # round 1 (statistics) keeps round 2 out


def test_what_a_round_sent_is_hashed_once_and_each_pin_recorded_once() -> None:
    book = DeviceBook([], [], server_fp="server")
    model = np.arange(4, dtype=np.float32)
    for r in (2, 3):
        received = book.send(r, {"round": r}, model)
        assert received == {"round": r, "model_sha256": model_sha256(model),
                            "config_sha256": config_sha256({"round": r}), "server_key_fingerprint": "server"}
    pins = Pins({})
    pins.offer("d0", "k0")
    one = book.sent_extra([2], pins)
    assert one["model_sha256"] == model_sha256(model) and one["device_key_fingerprints"] == {"d0": "k0"}
    span = book.sent_extra([2, 3], pins, span=True)
    assert span["model_chain_scheme"] == CHAIN_SCHEME and set(span["models"]) == {"2", "3"}
    assert span["device_key_fingerprints"] == {}  # already recorded with round 2
