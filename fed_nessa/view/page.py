"""The view's HTML: one page, its live part re-rendered on the server and swapped in by a few lines of script.

Every string that came from the run folder (a device id, a note, a reason, a config value) goes
through :func:`esc` (``html.escape`` with quotes): a ledger or a device may hold markup, and it is
shown as text. The page loads nothing from outside the viewer.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

from fed_nessa.view.run_state import RunState, obj, sample_note, spend_summary

#: Rounds shown in the table (the latest ones; the charts show all).
TABLE_ROUNDS = 15
#: Devices listed by most epsilon spent.
TOP_DEVICES = 10
#: Seconds between two refreshes of the live part.
REFRESH_SECONDS = 2

_STATEMENT_KEYS = ("unit", "level", "neighbouring_relation", "mode", "trust", "amplification", "group_privacy",
                   "noise_source")
_MECHANISM_KEYS = ("unit", "mode", "mechanism", "accountant", "delta", "epsilon_budget")
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;max-width:1200px}
h1{font-size:1.3em}h2{font-size:1.1em;border-bottom:1px solid #ccc;margin-top:1.4em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
.live{color:#b60}.done{color:#070}.refused,.skipped,.aborted,.fail{color:#b00}.applied,.pass{color:#070}
.grid{display:flex;flex-wrap:wrap;gap:1em}.note{color:#666;font-size:.85em}img{max-width:100%}
"""


def esc(value: Any) -> str:
    """``value`` as HTML text (markup in it is shown, never run)."""
    return html.escape("" if value is None else str(value), quote=True)


def num(value: Any, fmt: str = ".3g") -> str:
    """A number for a table cell; anything else escaped as text."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return esc(value)
    if isinstance(value, float) and not math.isfinite(value):
        return esc(value)
    return format(value, fmt)


def pct(value: Any) -> str:
    """A rate as a percentage (EER), or n/a."""
    return f"{100 * value:.2f} %" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of already-escaped cells (head cells escaped here)."""
    top = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{top}</tr>{body}</table>"


def _block(summary: dict[str, Any], key: str) -> dict[str, Any]:
    value = summary.get(key)
    return value if isinstance(value, dict) else {}


def header(state: RunState, name: str) -> str:
    cfg = _block(state.summary, "config")
    done = len(state.rounds)
    planned = cfg.get("num-server-rounds")
    status = ('<span class="done">finished</span>' if state.finished
              else '<span class="live">live: the run is writing this folder</span>')
    notes = "".join(f'<div class="note">{esc(n)}</div>' for n in state.notes)
    return (f"<h1>Run {esc(name)}</h1><p>{status}; {done} round(s) reported"
            f"{f' of {esc(planned)} planned' if planned is not None else ''}.</p>{notes}")


def rounds_section(state: RunState) -> str:
    rows = []
    for r in state.rounds[-TABLE_ROUNDS:]:
        rnd = r.get("round")
        led = state.ledger_rounds.get(rnd, {}) if isinstance(rnd, int) else {}
        status = str(r.get("status", led.get("status", "")))
        g = led.get("guaranteed_arrivals")
        rows.append([esc(r.get("round")), esc(r.get("phase")), f'<span class="{esc(status)}">{esc(status)}</span>',
                     esc(r.get("note", led.get("note"))),
                     f"{esc(r.get('participants'))} / g = {esc(g) if g is not None else '?'}",
                     esc(r.get("declined")), esc(r.get("failed")), pct(r.get("eer")),
                     num(r.get("epsilon_max")), num(r.get("seconds"))])
    earlier = len(state.rounds) - TABLE_ROUNDS
    more = (f'<p class="note">the latest {TABLE_ROUNDS}; {earlier} earlier round(s) in the charts</p>'
            if earlier > 0 else "")
    return ("<h2>Rounds</h2>" + more + table(
        ["round", "phase", "status", "why", "arrivals / promised", "declined", "failed", "EER", "epsilon max",
         "seconds"], reversed(rows)))


def quality_section(state: RunState, stamp: str) -> str:
    final = _block(state.summary, "final")
    rows = [[esc(label), pct(_block(final, key).get("eer") if key else final.get("eer"))]
            for label, key in (("current aligner", ""), ("linear start", "linear_start"),
                               ("DP NESSA", "dp_nessa"), ("not updating (sym_before)", "sym_before"),
                               ("non-DP reference (centralised NESSA)", "centralised_nessa"), ("ridge", "ridge"))
            if not key or key in final]
    gate = _block(final, "gate")
    gate_rows = [[esc(k), num(v, ".4g")] for k, v in gate.items() if not isinstance(v, dict | list)]
    gate_html = table(["gate", ""], gate_rows) if gate_rows else '<p class="note">no gate decision yet</p>'
    body = table(["aligner", "EER"], rows) if final else '<p class="note">final figures when the run ends</p>'
    return (f'<h2>Quality</h2><div class="grid"><img alt="EER per round" src="chart/quality.svg?v={stamp}">'
            f"<div>{body}{gate_html}</div></div>")


def privacy_section(state: RunState, stamp: str) -> str:
    priv = _block(state.summary, "privacy")
    plan = _block(state.summary, "noise_plan")
    spend = spend_summary(state.devices, state.devices_total)
    sampled = sample_note(state)
    spend_rows = [[esc(k), num(v)] for k, v in spend.items()]
    top = sorted(state.devices, key=lambda d: -d.epsilon if math.isfinite(d.epsilon) else -math.inf)[:TOP_DEVICES]
    dev_rows = [[esc(d.device), num(d.epsilon), num(d.budget),
                 num(d.budget - d.epsilon) if d.budget is not None else "n/a", esc(d.reserved)] for d in top]
    declines = [[esc(reason), esc(n)] for reason, n in state.declines.most_common()]
    mech = [[esc(k), esc(priv[k])] for k in _MECHANISM_KEYS if k in priv]
    mech += [[esc(f"noise plan: {k}"), esc(v)] for k, v in plan.items() if not isinstance(v, dict | list)]
    statement = "".join(f"<p><b>{esc(k)}</b>: {esc(priv[k])}</p>" for k in _STATEMENT_KEYS if k in priv)
    return ("<h2>Privacy</h2>"
            f'<div class="grid"><img alt="epsilon over devices" src="chart/epsilon.svg?v={stamp}">'
            f"<div>{table(['spent epsilon over devices', ''], spend_rows)}</div></div>"
            f"<h3>Devices with the most epsilon spent (ledgers as written, not verified"
            f"{'; ' + esc(sampled) if sampled else ''})</h3>"
            f"{table(['device', 'epsilon', 'budget', 'left', 'reservations'], dev_rows)}"
            f"<h3>Declines by reason</h3>"
            f"{table(['reason', 'devices'], declines) if declines else '<p class=note>none</p>'}"
            f"<h3>Mechanism and unit</h3>{table(['', ''], mech)}"
            f"<h3>Privacy statement</h3>{statement or '<p class=note>in the summary when the run ends</p>'}"
            f"<h3>Audit</h3>{audit_html(state)}")


def audit_html(state: RunState) -> str:
    if state.audit is None:
        return '<p class="note">no audit folder: run <code>fed-nessa audit RUN_DIR</code> to verify the ledgers</p>'
    verdict = str(state.audit.get("verdict", "unknown"))
    counts = obj(state.audit.get("counts"))
    return (f'<p>verdict: <b class="{esc(verdict)}">{esc(verdict.upper())}</b> '
            f"({', '.join(f'{esc(k)} {esc(v)}' for k, v in counts.items())})</p>")


def engine_section(state: RunState, stamp: str) -> str:
    eng = _block(state.summary, "engine")
    rows = [[esc(k), num(v) if isinstance(v, int | float) else esc(v)] for k, v in eng.items()
            if not isinstance(v, dict | list)]
    peak = max((r["peak_rss_mib"] for r in state.rounds if isinstance(r.get("peak_rss_mib"), int | float)),
               default=None)
    if peak is not None:
        rows.append([esc("peak memory (MiB, rounds so far)"), num(peak, ".0f")])
    timing = _block(state.summary, "timing")
    rows += [[esc(f"timing: {k}"), num(v)] for k, v in timing.items() if isinstance(v, int | float)]
    return (f'<h2>Engine and cost</h2><div class="grid"><img alt="seconds per round" '
            f'src="chart/seconds.svg?v={stamp}"><div>{table(["", ""], rows)}</div></div>')


def fragment(state: RunState, name: str, stamp: str) -> str:
    """The live part of the page (re-fetched every few seconds)."""
    return "".join([header(state, name), quality_section(state, stamp), privacy_section(state, stamp),
                    engine_section(state, stamp), rounds_section(state)])


def page(state: RunState, name: str, stamp: str, nonce: str) -> str:
    """The whole page: the live part and the script (allowed by ``nonce``) that refreshes it."""
    script = (f"setInterval(async()=>{{try{{const r=await fetch('fragment',{{cache:'no-store'}});"
              f"if(r.ok){{const t=await r.text();const c=document.getElementById('live');"
              f"if(c.dataset.last!==t){{c.innerHTML=t;c.dataset.last=t;}}}}}}catch(e){{}}}},"
              f"{REFRESH_SECONDS * 1000});")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>fed-nessa view: {esc(name)}</title>'
            f"<style>{_CSS}</style></head><body><div id=\"live\">{fragment(state, name, stamp)}</div>"
            f'<script nonce="{esc(nonce)}">{script}</script></body></html>')
