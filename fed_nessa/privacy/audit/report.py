"""Writes the audit's evidence: ``audit.json``, ``report.md`` and two PNG plots.

Kept apart from :mod:`.verify` so the checks stay readable and the report can
change shape without touching what is verified. The Markdown is for a human
reviewer: the claim first, then the threat model, the parameters, the numbers,
and every discrepancy with the entry it concerns.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from fed_nessa.privacy.audit.findings import FAIL, RDP_SLACK, REPORT_TOLERANCE, TIGHT_OVER_RDP, AuditResult

DISTRIBUTION_PNG = "epsilon-distribution.png"
CURVES_PNG = "epsilon-per-round.png"
_MAX_TABLE_ROWS = 1000


def write_report(result: AuditResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    (out_dir / "audit.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    plots = _plots(result, out_dir)
    (out_dir / "report.md").write_text(_markdown(result, plots))


def _plots(result: AuditResult, out_dir: Path) -> list[str]:
    devices = [d for d in result.devices if d.epsilon]
    if not devices:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for acc in result.accountants:
        values = [d.epsilon[acc] for d in devices if acc in d.epsilon]
        ax.hist(values, bins=min(40, max(5, len(values) // 5)), alpha=0.55, label=acc.upper())
    budgets = sorted({float(d.budget["epsilon"]) for d in devices if d.budget})
    for b in budgets:
        ax.axvline(b, color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("epsilon per device (recomputed)")
    ax.set_ylabel("devices")
    ax.set_title(f"Epsilon per device, {len(devices)} devices" + (" (red: budget)" if budgets else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / DISTRIBUTION_PNG, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    alpha = 0.9 if len(devices) <= 10 else max(0.05, 3.0 / len(devices))
    # One line per *distinct* curve: a fleet of 10,000 devices on one schedule draws one
    # line, not 10,000 (which took most of the report's time); the title says how many.
    curves = Counter(tuple(d.curve_by_round) for d in devices if d.curve_by_round)
    for curve in curves:
        rounds, eps = zip(*curve)
        ax.plot(rounds, eps, color="tab:blue", alpha=0.9 if len(curves) <= 10 else alpha, linewidth=1,
                marker="." if len(rounds) < 30 else None)
    for b in budgets:
        ax.axhline(b, color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon after the round (RDP)")
    ax.set_title(f"Epsilon per device across rounds ({len(curves)} distinct curve(s))")
    fig.tight_layout()
    fig.savefig(out_dir / CURVES_PNG, dpi=110)
    plt.close(fig)
    return [DISTRIBUTION_PNG, CURVES_PNG]


def _by_unit(result: AuditResult) -> list[str]:
    """Max epsilon over devices for every guarantee the ledgers support (example- and device-level)."""
    units = sorted({u for d in result.devices for u in d.epsilon_by_unit})
    if not units or units == ["example"]:
        return []
    out = ["| guarantee | devices | " + " | ".join(f"max eps {x}" for x in ("rdp", "pld", "gaussian")) + " |",
           "|---|---|---|---|---|"]
    for unit in units:
        held = [d.epsilon_by_unit[unit] for d in result.devices if unit in d.epsilon_by_unit]
        cells = []
        for acc in ("rdp", "pld", "gaussian"):
            vals = [v[acc] for v in held if acc in v]
            cells.append(f"{max(vals):.4g}" if vals else "-")
        out.append(f"| per {unit} | {len(held)} | " + " | ".join(cells) + " |")
    return out + ["", "Per device: RDP (Opacus) and PLD (dp_accounting) re-derived from the events; gaussian = "
                  "the closed-form analytic Gaussian (Balle & Wang 2018) of the composed q = 1 Gaussian sums, "
                  "which both accountants must bound from above.", ""]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _markdown(result: AuditResult, plots: list[str]) -> str:
    data = result.to_dict()
    s = result.statement
    a, b = result.accountants
    fails = result.failures
    warns = [f for f in result.findings if f.severity != FAIL]
    lines = [
        "# Privacy audit report", "",
        f"**Verdict: {'PASS' if result.passed else 'FAIL'}**: {len(result.devices)} device ledger(s), "
        f"{len(fails)} failed check(s), {len(warns)} warning(s).", "",
        f"Audited: `{result.path}`. Re-run: `fed-nessa audit {result.path}`.", "",
        *([f"**Not checked** (scope of this audit): {'; '.join(result.not_checked)}.", ""]
          if result.not_checked else []),
        "## What is claimed", "",
        f"- **Privacy unit**: {s.get('unit')}",
        f"- **Neighbouring relation**: {s.get('neighbouring_relation')}",
        f"- **Level**: {s.get('level', 'example-level')}",
        f"- **Mode**: {s.get('mode')}",
        f"- **Trust assumption**: {s.get('trust')}",
        f"- **delta**: {s.get('delta')}; **budget** epsilon: {s.get('epsilon_budget')}; "
        f"**device accountant**: {s.get('accountant')}",
        f"- **Amplification**: {s.get('amplification')}",
        f"- **Group privacy**: {s.get('group_privacy')}",
    ]
    if s.get("reconstructed_from_ledgers"):
        lines.append("- (No summary.json claim found: the statement above is rebuilt from the ledgers.)")
    lines += ["", "## Threat model", "",
              f"- {data['threat_model']['secure_aggregation_hides']}.",
              f"- {data['threat_model']['secure_aggregation_does_not_hide']}.",
              "- The ledgers are signed by each device's own Ed25519 key and hash-chained: an edited, forged, "
              "deleted or reordered entry is detected. Dropping the newest entries of a ledger is caught across "
              "parties: the server signs each participating device's ledger head into its record of the round "
              "(of a fleet span: once, after the span completed) and ends its "
              "federation ledger with a signed end-of-run record; each device event's public parameters are "
              "held against the server's signed round parameters. Whoever holds every key can still sign a "
              "consistent false history (docs/privacy.md, \"What an insider with keys can still do\").", "",
              "## Mechanisms and parameters", "",
              "| mechanism | unit | mode | sample rate q | noise multiplier | clip norm | delta | events | steps "
              "| devices |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    groups: Counter = Counter()
    steps: Counter = Counter()
    devs: dict = {}
    for d in result.devices:
        for ev in d.events:
            key = (ev.mechanism, ev.unit, ev.mode, ev.sample_rate, ev.noise_multiplier, ev.clip_norm, ev.delta)
            groups[key] += 1
            steps[key] += ev.steps
            devs.setdefault(key, set()).add(d.device_id)
    rows = sorted(groups)
    for key in rows[:_MAX_TABLE_ROWS]:
        m, unit, mode, q, sigma, c, delta = key
        lines.append(f"| {m} | {unit} | {mode} | {q:.4g} | {sigma:.4g} | {c:.4g} | {delta:g} | {groups[key]} | "
                     f"{steps[key]} | {len(devs[key])} |")
    if len(rows) > _MAX_TABLE_ROWS:
        lines.append(f"| ... {len(rows) - _MAX_TABLE_ROWS} more (see audit.json) |")
    lines += ["", "Every event is listed with all its fields in `audit.json` (devices[].events_detail).", "",
              "## Epsilon per device", "",
              f"Recomputed from the logged events with two independent accountants: **{a.upper()}** and "
              f"**{b.upper()}**, at each device's delta. Reported = the device's own last `epsilon_after`.", ""]
    eps_a = [d.epsilon[a] for d in result.devices if a in d.epsilon]
    eps_b = [d.epsilon[b] for d in result.devices if b in d.epsilon]
    if eps_a:
        lines.append(f"{a.upper()}: max {max(eps_a):.4g}, median {np.median(eps_a):.4g}; {b.upper()}: max "
                     f"{max(eps_b):.4g}, median {np.median(eps_b):.4g} (each device in the unit of its own "
                     "budget).")
        lines.append("")
    lines += _by_unit(result)
    failed_devices = {f.device for f in fails}
    lines += [f"| device | rounds | events | steps | pending | budget | eps {a} | eps {b} | reported | status |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for d in sorted(result.devices, key=lambda d: d.device_id)[:_MAX_TABLE_ROWS]:
        budget = d.budget["epsilon"] if d.budget else None
        status = "FAIL" if d.device_id in failed_devices else "ok"
        lines.append(f"| {d.device_id} | {d.rounds_covered()} | {len(d.events)} | "
                     f"{sum(e.steps for e in d.events)} | {len(d.pending)} | {_fmt(budget)} | "
                     f"{_fmt(d.epsilon.get(a))} | {_fmt(d.epsilon.get(b))} | {_fmt(d.reported_final)} | {status} |")
    if len(result.devices) > _MAX_TABLE_ROWS:
        lines.append(f"| ... {len(result.devices) - _MAX_TABLE_ROWS} more devices (see audit.json) |")
    lines.append("")
    for png in plots:
        lines += [f"![{png}]({png})", ""]
    rel_r, abs_r = REPORT_TOLERANCE["rdp"]
    lines += ["## Tolerances", "",
              f"- Reported vs recomputed epsilon (same accountant as the device used): "
              f"|diff| <= abs + rel x eps, RDP: rel {rel_r:g}, abs {abs_r:g}; PRV/PLD: rel "
              f"{REPORT_TOLERANCE['pld'][0]:g}, abs {REPORT_TOLERANCE['pld'][1]:g} (discretisation).",
              f"- Accountant agreement: the tight accountant may exceed the RDP upper bound by at most "
              f"{TIGHT_OVER_RDP[0]:g} x eps + {TIGHT_OVER_RDP[1]:g} (else FAIL); RDP above "
              f"{RDP_SLACK[0]:g} x tight + {RDP_SLACK[1]:g} is flagged (RDP's conversion slack, largest for few "
              "compositions).",
              "- Budget: epsilon by the device's budget accountant must not exceed the budget recorded in its "
              "ledger.", ""]
    if result.federation is not None:
        fed = result.federation
        spans = fed.get("spans", [])
        lines += ["## Federation ledger cross-check", "",
                  f"`{fed['path']}`: chain {'verified' if fed['chain_ok'] else 'FAILED'}, "
                  f"{len(fed['rounds'])} round record(s), {len(spans)} span record(s). Every device the server "
                  "lists as joining round r (or a span, except the rounds it dropped out of) must hold "
                  "reserve entries covering those rounds.",
                  f"Devices that joined but whose ledger was not provided: {len(fed['devices_without_ledger'])}.",
                  ""]
        if fed["rounds"]:
            lines += ["| round | joined | declined | failed |", "|---|---|---|---|"]
            for rec in fed["rounds"][:_MAX_TABLE_ROWS]:
                lines.append(f"| {rec.get('round')} | {len(rec.get('joined', []))} | "
                             f"{len(rec.get('declined', []))} | {len(rec.get('failed', []))} |")
            lines.append("")
        if spans:
            lines += ["| rounds | joined | declined | failed | drop-outs |", "|---|---|---|---|---|"]
            for sp in spans[:_MAX_TABLE_ROWS]:
                lines.append(f"| {sp['first_round']}..{sp['last_round']} | {sp['joined']} | {sp['declined']} | "
                             f"{sp['failed']} | {sp['dropouts']} |")
            lines.append("")
    lines += ["## Discrepancies", ""]
    if not result.findings:
        lines.append("None.")
    for f in fails + warns:
        where = ", ".join(x for x in [f"device {f.device}" if f.device else "",
                                      f"entry seq {f.seq}" if f.seq is not None else ""] if x)
        lines.append(f"- **{f.severity.upper()}** `{f.check}`{' (' + where + ')' if where else ''}: {f.message}")
    lines += ["", "## Verdict", "",
              ("PASS: every chain and signature verifies, every reported epsilon matches its recomputation, "
               "the accountants agree within tolerance and no device is over its budget."
               if result.passed else
               f"FAIL: {len(fails)} check(s) failed (listed above)."), ""]
    return "\n".join(lines)
