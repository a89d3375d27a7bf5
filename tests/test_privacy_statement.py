"""The privacy statement says the unit, relation, trust, and both caveats."""

from __future__ import annotations

import json
import math

import pytest

from fed_nessa.privacy.statement import group_privacy, privacy_statement


def test_local_statement_needs_no_trust() -> None:
    s = privacy_statement("local", 1e-5, 8.0, "rdp")
    assert s["unit"] == "one utterance pair (x_i, y_i) on one device"
    assert "add/remove one utterance pair" in s["neighbouring_relation"]
    assert "no trust in SecAgg+" in s["trust"]
    assert "no privacy amplification" in s["amplification"]
    assert "group privacy" in s["group_privacy"]
    assert "participation" in s["secure_aggregation_does_not_hide"]
    json.dumps(s)  # goes into summary.json as is


def test_distributed_statement_names_its_assumptions_and_failure_mode() -> None:
    s = privacy_statement("distributed", 1e-5, 3.0, "pld", min_arrivals=20, reconstruction_threshold=8)
    assert "reconstruction threshold 8" in s["trust"]
    assert "fewer than max(20, ceil(min-arrival-fraction x cohort size)) devices" in s["trust"]
    assert "If SecAgg+ fails" in s["trust"]


@pytest.mark.parametrize("kw", [dict(mode="central"), dict(delta=0.0), dict(accountant="x"),
                                dict(epsilon_budget=-1.0)])
def test_bad_arguments(kw) -> None:
    args = dict(mode="local", delta=1e-5, epsilon_budget=1.0, accountant="rdp") | kw
    with pytest.raises(ValueError):
        privacy_statement(**args)


def test_group_privacy_bound() -> None:
    assert group_privacy(1.0, 1e-5, 1) == (1.0, 1e-5)
    eps, delta = group_privacy(1.0, 1e-5, 3)
    assert eps == 3.0 and delta == pytest.approx(3 * math.e ** 2 * 1e-5)
    assert group_privacy(8.0, 1e-5, 50)[1] == 1.0


@pytest.mark.parametrize(("mode", "mechanism", "covered"), [("distributed", "gaussian", False),
                                                            ("distributed", "skellam", True),
                                                            ("local", "gaussian", True)])
def test_the_statement_says_whether_the_accounting_covers_what_is_released(mode: str, mechanism: str,
                                                                          covered: bool) -> None:
    """Distributed Gaussian shares are rounded by Flower's quantizer after the noise: that rounding is outside
    the accounting, and the output says so; the integer mechanism and local mode release what is accounted."""
    s = privacy_statement(mode, 1e-5, 8.0, "rdp", min_arrivals=20, reconstruction_threshold=8, mechanism=mechanism)
    assert s["accounting_covers_release"] is covered and s["mechanism"] == mechanism
    assert ("NOT covered by the accounting" in s["noise_source"]) is not covered
