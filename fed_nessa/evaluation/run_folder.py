"""The run folder: ``summary.json``, ``report.md`` and the per-round plots.

``summary.json`` is the machine-readable record every report and benchmark
reads; its top-level keys are fixed (issue 4): ``config``, ``rounds``,
``final``, ``privacy``, ``secure_aggregation``. It is rewritten atomically
after every round, so a crashed run still has an up-to-date summary.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from fed_nessa.atomic import atomic_write_text
from fed_nessa.config import DPMode, FederationConfig, LossCentre
from fed_nessa.evaluation.gate import KEEP, decision_sentence
from fed_nessa.privacy.statement import UNIT as PRIVACY_UNIT
from fed_nessa.privacy.store import FILES, STORE_NAME

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
EER_PLOT = "eer-per-round.png"
EPSILON_PLOT = "epsilon-per-round.png"

TRUST_NONE = "no differential privacy: SecAgg+ hides individual updates, the aggregate is not private"


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def privacy_block(cfg: FederationConfig, device_epsilons: dict[str, float], num_ledgers: int,
                  accountant: str = "rdp", noise_source: str | None = None,
                  ledger_layout: str = FILES) -> dict[str, Any]:
    """The ``privacy`` block: the privacy statement plus measured epsilon max/median and the ledgers
    (their layout, where they are and how many the run folder holds; the audit checks they are there)."""
    from fed_nessa.federated.protocol import DEVICE_LEDGER_PATTERN
    from fed_nessa.privacy.statement import privacy_statement

    eps = sorted(device_epsilons.values())
    if cfg.dp_mode == DPMode.NONE:
        block: dict[str, Any] = {"unit": PRIVACY_UNIT, "mode": "none", "mechanism": cfg.noise_mechanism,
                                 "trust": TRUST_NONE, "delta": cfg.delta, "epsilon_budget": None,
                                 "accountant": accountant}
    else:
        block = privacy_statement(cfg.dp_mode, cfg.delta, cfg.epsilon_budget, accountant,
                                  min_arrivals=cfg.min_arrivals,
                                  reconstruction_threshold=cfg.secagg_reconstruction_threshold,
                                  reproducible_noise=cfg.reproducible_noise, unit=cfg.privacy_unit,
                                  mechanism=cfg.noise_mechanism)
        if noise_source is not None and not cfg.reproducible_noise:
            block["noise_source"] = noise_source
    block.update({
        "epsilon_max": eps[-1] if eps else 0.0,
        "epsilon_median": statistics.median(eps) if eps else 0.0,
        "devices_within_budget": cfg.dp_mode == "none" or all(e <= cfg.epsilon_budget + 1e-9 for e in eps),
        "num_devices_with_spend": sum(1 for e in eps if e > 0),
        "ledger_layout": ledger_layout,
        **({"device_ledger_pattern": DEVICE_LEDGER_PATTERN} if ledger_layout == FILES
           else {"ledger_store": STORE_NAME}),
        "num_device_ledgers": num_ledgers,
    })
    return block


def epsilon_phrase(priv: dict[str, Any]) -> str:
    """The run's epsilon as people read it: a run without DP has no epsilon at all, not an epsilon of 0
    (the block's 0.0 counts spend, which is nil; printing it as "epsilon 0" would claim perfect privacy)."""
    if priv["mode"] == "none":
        return "none (no DP: nothing is guaranteed)"
    return f"max {priv['epsilon_max']:.3f}"


#: What SecAgg+ sums under ``distributed-mechanism = skellam`` (its ranges come from the round's field, not the config).
INTEGER_FIELD = ("Z_2^b: each device's integer field elements, b per round as its ledger event records "
                 "(skellam.bits); clipping range 2^(b-1), quantization range 2^b, Flower's quantizer the identity")


def secagg_block(cfg: FederationConfig, saturated_total: int) -> dict[str, Any]:
    """The ``secure_aggregation`` block: the Gaussian's quantization ranges, or the integer mechanism's field."""
    ranges: dict[str, Any] = ({"field": INTEGER_FIELD} if cfg.integer_noise else
                              {"clipping_range": cfg.secagg_clipping_range,
                               "quantization_range": cfg.secagg_quantization_range})
    return {
        "protocol": "SecAgg+ (Flower SecAggPlusWorkflow + " + (
            "exact_secaggplus_mod)" if cfg.integer_noise else "secaggplus_mod)"),
        "num_shares": cfg.secagg_num_shares,
        "reconstruction_threshold": cfg.secagg_reconstruction_threshold,
        **ranges,
        "min_arrivals": cfg.min_arrivals,
        "weighting": "constant (every device weight 1; no num_examples)",
        "saturated_coordinates": int(saturated_total),
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    atomic_write_text(path, json.dumps(_finite(summary), indent=2, sort_keys=False) + "\n")
    return path


def write_plots(run_dir: Path, rounds: list[dict[str, Any]]) -> list[Path]:
    """EER and epsilon (max and median over devices) per round, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rounds]
    out: list[Path] = []
    for name, series, ylabel in (
        (EER_PLOT, [("EER (%)", [100 * r["eer"] if r.get("eer") is not None else float("nan") for r in rounds])],
         "EER (%)"),
        (EPSILON_PLOT, [("max over devices", [r.get("epsilon_max", 0.0) for r in rounds]),
                        ("median over devices", [r.get("epsilon_median", 0.0) for r in rounds])], "epsilon"),
    ):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, ys in series:
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(run_dir) / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    return out


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f}"


def _num(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(float(x), fmt)


def noise_plan_block(plan: Any) -> dict[str, Any]:
    """The sigmas, q and aligner decision the run actually used (``NoisePlan``), for the summary."""
    return {"suffstats_sigma": plan.suffstats_sigma, "dpsgd_sigma": plan.dpsgd_sigma,
            "sample_rate": plan.sample_rate, "dpsgd_rounds_per_device": plan.dpsgd_rounds_per_device,
            "signal": plan.signal, "aligner": str(plan.aligner), "reason": plan.reason}


def _phase_lines(cfg: dict[str, Any], mode: str, plan: dict[str, Any] | None = None,
                 rounds: list[dict[str, Any]] | None = None) -> list[str]:
    """What each phase of the run did, with only the parameters that phase used.

    The sigmas come from the run's noise plan when the summary has one (a budget split
    calibrates them), else from the config keys.
    """
    stats_rounds = int(cfg.get("suffstats-rounds", 1)) if cfg.get("linear-start") == "suffstats" else 0
    sgd_rounds = (sum(1 for r in rounds if r.get("phase") == "dpsgd") if rounds is not None
                  else int(cfg["num-server-rounds"]) - stats_rounds)
    s_sigma = plan["suffstats_sigma"] if plan else cfg["suffstats-noise-multiplier"]
    sigma = plan["dpsgd_sigma"] if plan else cfg["noise-multiplier"]
    lines = [f"- DP mode: **{mode}**"]
    if stats_rounds:
        noise = "" if mode == "none" else f", noise multiplier {s_sigma:.4g} (L2 sensitivity 1)"
        lines.append(f"- private linear start: {stats_rounds} statistics round(s) over every device{noise}")
    if sgd_rounds > 0:
        noise = "" if mode == "none" else f", noise multiplier {sigma:.4g}, clip {cfg['clip-norm']}"
        who = ("every device in every round" if int(cfg.get("clients-per-round", 0)) == 0
               else f"{cfg['clients-per-round']} devices sampled per round")
        rate = f", Poisson rate q {plan['sample_rate']:.4g}" if plan and plan.get("sample_rate") else ""
        centre = cfg.get("loss-centre", LossCentre.NONE)
        about = ("" if centre == LossCentre.NONE else
                 "; the devices' cosine loss taken about the mean enrollment embedding of the released statistics"
                 f" (loss-centre = {centre}; post-processing, no privacy cost)")
        lines.append(f"- DP-SGD: {sgd_rounds} round(s), {who}{rate}{noise}{about}")
    if plan and plan.get("reason"):
        lines.append(f"- {plan['reason']}")
    return lines


def render_report(summary: dict[str, Any]) -> str:
    """A human-readable ``report.md`` from the summary (no numbers that are not in it)."""
    cfg, priv, sa, final = summary["config"], summary["privacy"], summary["secure_aggregation"], summary["final"]
    gate = [decision_sentence(final["gate"]), ""] if final.get("gate") else []
    lines = [
        "# Federated NESSA run",
        "",
        *gate,
        f"- data: {cfg['data-source']} ({cfg['num-devices']} devices), {cfg['num-server-rounds']} round(s)",
        *_phase_lines(cfg, priv["mode"], summary.get("noise_plan"), summary.get("rounds")),
        "",
        "## Rounds",
        "",
        "| round | phase | status | EER (%) | minDCF | SID top-1 (%) | joined | declined | failed | eps max | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rounds"]:
        lines.append(
            f"| {r['round']} | {r.get('phase', '')} | {r.get('status', '')} | {_pct(r['eer'])} | "
            f"{_num(r['min_dcf'])} | {_pct(r['sid_top1'])} | {r['participants']} | {r['declined']} | "
            f"{r['failed']} | {_num(r.get('epsilon_max'), '.2f')} | {_num(r['seconds'], '.1f')} |"
        )
    lines += ["", "## Final aligner (held-out speakers)", "",
              "| system | EER (%) | minDCF | SID top-1 (%) | gap closure |", "|---|---|---|---|---|"]
    shipped = ("not updating (nothing shipped)" if (final.get("gate") or {}).get("shipped") == KEEP
               else "shipped aligner")
    for name, key in ((shipped, None), ("DP linear start", "linear_start"), ("DP NESSA", "dp_nessa"),
                      ("centralised non-DP NESSA", "centralised_nessa"),
                      ("centralised ridge", "ridge"), ("sym_before", "sym_before"), ("sym_after", "sym_after")):
        row = final if key is None else final.get(key)
        if not row:
            continue
        lines.append(f"| {name} | {_pct(row.get('eer'))} | {_num(row.get('min_dcf'))} | "
                     f"{_pct(row.get('sid_top1'))} | {_num(row.get('gap_closure'), '.2f')} |")
    if final.get("share_of_centralised_gap_closure") is not None:
        lines.append("")
        lines.append(f"Federated keeps {100 * final['share_of_centralised_gap_closure']:.0f}% of the centralised "
                     "non-DP NESSA gap closure.")
    lines += [
        "", "## Privacy", "",
        *([f"- **{priv['noise_source']}**"] if priv.get("guarantee_holds") is False else []),
        f"- unit: {priv['unit']} ({priv.get('privacy_unit', 'example')}-level); "
        f"{priv.get('group_privacy', '')}",
        *([f"- level: {priv['level']}"] if priv.get("privacy_unit") == "device" else []),
        f"- mode: {priv['mode']}, noise mechanism: {priv.get('mechanism', 'gaussian')}. Trust: {priv['trust']}",
        f"- accountant: {priv['accountant']}, delta {priv['delta']:g}, budget epsilon {priv['epsilon_budget']} "
        "per device (the run's request; each device's own policy, fixed in its ledger header, decides)",
        *([f"- noise: {priv['noise_source']}"] if priv.get("guarantee_holds", True) and "noise_source" in priv
          else []),  # a run without DP (dp-mode none) has no noise to state
        f"- epsilon per {priv.get('privacy_unit', 'example')} over devices: {epsilon_phrase(priv)}"
        + ("" if priv["mode"] == "none" else f", median {priv['epsilon_median']:.3f}; all within budget: "
           f"{priv['devices_within_budget']}"),
        *([f"- implied example-level epsilon (one changed pair moves a device's clipped contribution by <= 2 C): "
           f"max {priv['epsilon_example_max']:.3f}"] if "epsilon_example_max" in priv else []),
        f"- per-device ledgers: {priv.get('num_device_ledgers', 0)} at `{priv.get('device_ledger_pattern')}`",
        "", "## Secure aggregation", "",
        f"- {sa['protocol']}: {sa['num_shares']} shares, reconstruction threshold {sa['reconstruction_threshold']}, "
        + (f"field {sa['field']}; " if "field" in sa else
         f"clipping range {sa['clipping_range']:g}, {sa['quantization_range']} levels; ") + f"{sa['weighting']}",
        f"- aggregates released only with >= {sa['min_arrivals']} devices; saturated coordinates: "
        f"{sa['saturated_coordinates']}",
        "", f"Plots: `{EER_PLOT}`, `{EPSILON_PLOT}`.", "",
    ]
    return "\n".join(lines)


def write_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(run_dir) / REPORT_FILE
    atomic_write_text(path, render_report(summary))
    return path


def write_outputs(run_dir: Path, summary: dict[str, Any]) -> None:
    """The end of a run's folder, every engine alike: summary.json, report.md and the plots."""
    write_summary(run_dir, summary)
    write_report(run_dir, summary)
    write_plots(run_dir, summary["rounds"])


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run config as a report should carry it: paths relative to the working directory.

    Simulations resolve ``run-dir`` (and a shard folder) to absolute paths to run; a summary that
    is shared or committed should not name the machine it ran on.
    """
    out = dict(config)
    for key in ("run-dir", "data-source"):
        value = str(out.get(key, ""))
        if value.startswith("/"):
            path = Path(value)
            try:
                out[key] = str(path.relative_to(Path.cwd()))
            except ValueError:
                out[key] = path.name
    return out
