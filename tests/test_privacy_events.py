"""DPEvent: validation and JSON round-trip."""

from __future__ import annotations

import json

import pytest

from fed_nessa.privacy.events import DPEvent, EventError


def _event(**kw) -> DPEvent:
    base = dict(round=1, mechanism="dp-sgd", steps=10, sample_rate=0.1, noise_multiplier=1.0,
                clip_norm=1.0, delta=1e-5, mode="local")
    base.update(kw)
    return DPEvent(**base)


def test_round_trip_through_json_is_exact() -> None:
    ev = _event(note="x")
    assert DPEvent.from_dict(json.loads(json.dumps(ev.to_dict()))) == ev


def test_event_is_immutable() -> None:
    ev = _event()
    with pytest.raises(AttributeError):
        ev.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("field,value", [
    ("steps", -1), ("steps", 1.5), ("sample_rate", 0.0), ("sample_rate", 1.2),
    ("noise_multiplier", 0.0), ("noise_multiplier", float("nan")), ("clip_norm", -1.0),
    ("delta", 0.0), ("delta", 1.0), ("mode", "central"), ("mechanism", "laplace"),
    ("round", -2), ("round", True),
])
def test_out_of_range_values_are_rejected(field: str, value: object) -> None:
    with pytest.raises(EventError, match=field):
        _event(**{field: value})


def test_gaussian_sum_must_be_one_full_batch_step() -> None:
    DPEvent(round=0, mechanism="gaussian-sum", steps=1, sample_rate=1.0, noise_multiplier=2.0,
            clip_norm=1.0, delta=1e-5, mode="distributed")
    with pytest.raises(EventError, match="gaussian-sum"):
        _event(mechanism="gaussian-sum", steps=2, sample_rate=1.0)


def test_from_dict_rejects_unknown_and_missing_fields() -> None:
    data = _event().to_dict()
    with pytest.raises(EventError, match="unknown"):
        DPEvent.from_dict({**data, "epsilon": 1.0})
    del data["delta"]
    with pytest.raises(EventError, match="lacks"):
        DPEvent.from_dict(data)


# ----------------------------------------------------------------------------- spans
def test_a_span_covers_its_rounds_and_round_trips() -> None:
    ev = _event(round=3, last_round=7, steps=5)
    assert (ev.end_round, ev.n_rounds, list(ev.covered_rounds())) == (7, 5, [3, 4, 5, 6, 7])
    assert ev.to_dict()["last_round"] == 7
    assert DPEvent.from_dict(json.loads(json.dumps(ev.to_dict()))) == ev
    single = _event(round=3)
    assert (single.last_round, single.end_round, single.n_rounds) == (None, 3, 1)
    assert _event(round=3, last_round=3).n_rounds == 1


def test_old_format_events_without_last_round_stay_valid_and_unchanged() -> None:
    old = {"round": 2, "mechanism": "dp-sgd", "steps": 10, "sample_rate": 0.1, "noise_multiplier": 1.0,
           "clip_norm": 1.0, "delta": 1e-5, "mode": "local", "note": ""}
    ev = DPEvent.from_dict(dict(old))
    assert ev.last_round is None and ev.end_round == 2
    assert ev.to_dict() == old  # a single-round event serialises exactly as before spans existed


@pytest.mark.parametrize("value", [2, -1, 4.0, True, "9"])
def test_last_round_before_round_or_mistyped_is_rejected(value: object) -> None:
    with pytest.raises(EventError, match="last_round"):
        _event(round=3, last_round=value)


def test_gaussian_sum_span_is_one_sum_per_round() -> None:
    ev = DPEvent(round=1, last_round=4, mechanism="gaussian-sum", steps=4, sample_rate=1.0,
                 noise_multiplier=2.0, clip_norm=1.0, delta=1e-5, mode="distributed")
    assert ev.n_rounds == 4
    with pytest.raises(EventError, match="gaussian-sum"):
        DPEvent(round=1, last_round=4, mechanism="gaussian-sum", steps=1, sample_rate=1.0,
                noise_multiplier=2.0, clip_norm=1.0, delta=1e-5, mode="distributed")
