"""The ridge-floor check: the same noisy statistics solved at several floors (paired), on a tuning population."""

from __future__ import annotations

import pytest

from simulations import ridge_floor_check


def test_each_floor_is_scored_on_the_same_noise_and_an_overwide_floor_costs(capsys: pytest.CaptureFixture[str]) -> None:
    result = ridge_floor_check.check(300, 1.0, 1, 2, (0.125, 1.0))
    eers = result["eers"]
    assert isinstance(eers, dict) and set(eers) == {0.125, 1.0}
    assert all(len(eers[f][k]) == 2 and all(0.0 < e < 0.5 for e in eers[f][k])
               for f in eers for k in ("validation", "held_out"))
    # a floor of the whole noise norm regularises the signal away too (23 % vs 39 % on these 300 devices)
    assert max(eers[0.125]["held_out"]) < min(eers[1.0]["held_out"])
    assert ridge_floor_check.main(["--devices", "300", "--draws", "1", "--floors", "0.125"]) == 0
    out = capsys.readouterr().out
    assert "population seed 1" in out and "| 0.125 |" in out


def test_a_budget_split_gives_the_statistics_round_only_its_share() -> None:
    whole = ridge_floor_check.check(300, 3.0, 1, 1, (0.125,))
    share = ridge_floor_check.check(300, 3.0, 1, 1, (0.125,), budget_split=0.15)
    sigma_whole, sigma_share = whole["sigma"], share["sigma"]
    assert isinstance(sigma_whole, float) and isinstance(sigma_share, float)
    # 15 % of epsilon buys the statistics round a larger noise multiplier than all of it
    assert sigma_share > 2.0 * sigma_whole
