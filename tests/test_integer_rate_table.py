"""The rate table behind the fleet rule's q under the integer mechanism (docs/results.md "The integer mechanism at
small epsilon"): one chosen q per mechanism, the rule's own, and the committed rows reproduce."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations import integer_rate_table

ROOT = Path(__file__).resolve().parents[1]


def test_at_epsilon_3_both_mechanisms_keep_q_and_the_docs_rows_reproduce() -> None:
    """Under the symmetric subsampling bound (no factor 3) skellam's plan keeps the Gaussian's q 0.04."""
    cells = integer_rate_table.cells(10_000, 3.0)
    chosen = {c["mechanism"]: c["q"] for c in cells if c["chosen"]}
    assert chosen == {"gaussian": pytest.approx(0.04), "skellam": pytest.approx(0.04)}
    for mech in integer_rate_table.MECHANISMS:  # the chosen q holds the most signal under its mechanism
        rows = [c for c in cells if c["mechanism"] == mech]
        best = max(rows, key=lambda c: float(c["signal"]))
        assert best["chosen"]
    docs = set((ROOT / "docs" / "results.md").read_text().splitlines())
    lines = integer_rate_table.markdown(10_000, [3.0]).splitlines()
    assert [line for line in lines if line not in docs] == []
