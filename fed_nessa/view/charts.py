"""The view's charts, drawn on the server as SVG with matplotlib (no JavaScript, nothing fetched).

Why server-side: matplotlib is already a dependency, an SVG in an ``<img>`` runs no script,
and the page then needs no chart library at all.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

from fed_nessa.view.run_state import RunState, obj, sample_note


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 2.6), dpi=96)
    return plt, fig, ax


def _svg(plt: Any, fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    return buf.getvalue()


def _eer(entry: Any) -> float | None:
    eer = entry.get("eer") if isinstance(entry, dict) else None
    return 100 * float(eer) if isinstance(eer, int | float) and math.isfinite(eer) else None


def quality(state: RunState) -> bytes:
    """EER per round of the current aligner, against the linear start, not updating and the non-DP reference."""
    plt, fig, ax = _figure()
    points = [(r.get("round"), _eer(r)) for r in state.rounds]
    points = [(x, y) for x, y in points if isinstance(x, int) and y is not None]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label="current aligner")
    final = obj(state.summary.get("final"))
    for key, label, style in (("linear_start", "linear start", "--"), ("sym_before", "not updating", ":"),
                              ("centralised_nessa", "non-DP reference", "-.")):
        y = _eer(final.get(key))
        if y is not None:
            ax.axhline(y, linestyle=style, color="grey" if key == "sym_before" else None, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("EER (%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _svg(plt, fig)


def epsilon(state: RunState) -> bytes:
    """Spent epsilon over devices (histogram) with the budget marked."""
    plt, fig, ax = _figure()
    spent = [d.epsilon for d in state.devices if math.isfinite(d.epsilon)]
    if spent:
        ax.hist(spent, bins=min(40, max(5, len(set(spent)))))
    budgets = {d.budget for d in state.devices if d.budget is not None}
    for b in sorted(budgets)[:3]:
        ax.axvline(b, color="red", linestyle="--", label=f"budget {b:g}")
    ax.set_xlabel("epsilon spent (per device ledger)")
    ax.set_ylabel(f"devices (sample of {len(state.devices)} of {state.devices_total})"
                  if sample_note(state) else "devices")
    if budgets:
        ax.legend(fontsize=7)
    return _svg(plt, fig)


def seconds(state: RunState) -> bytes:
    """Seconds per round (the engines' own timing)."""
    plt, fig, ax = _figure()
    points = [(r.get("round"), r.get("seconds")) for r in state.rounds]
    points = [(x, y) for x, y in points if isinstance(x, int) and isinstance(y, int | float)]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    return _svg(plt, fig)


#: The charts the page may ask for, by name (anything else is refused).
CHARTS: dict[str, Callable[[RunState], bytes]] = {"quality": quality, "epsilon": epsilon, "seconds": seconds}
