"""The federated canary audit: canaries inside the devices of two real runs, the DP run and its positive control.

Both runs go through :func:`fed_nessa.sim.runner.run_engine`, the code path of
``fed-nessa simulate`` (either engine), with the runner's planting hook
(:func:`fed_nessa.canary.federated.planter`); nothing of the protocol is
re-implemented here. Each run folder is then scored from what it published (its
aligner) against the auditor's secret beside it (``<run-dir>.canaries.npz``), and its
claim is re-derived from the canary devices' ledgers.

The positive control is the DP run's config with the noise switched off
(``dp-mode = none``, ``budget-split = 0``, devices' ``allow-non-dp = true``) and its
``aligner`` pinned to the phases the DP run's noise plan chose, so both runs run the
same rounds; same population, same canaries, same coins. Its bound must be clearly above
the DP run's, or the attack would be too weak to see leakage and a low DP bound would
mean nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fed_nessa.canary.empirical import canary_cosines, control_clearly_above, score_histogram
from fed_nessa.canary.federated import (
    ASSIGNMENT_RULE,
    MIN_CANARIES,
    CanaryError,
    CanarySpec,
    canary_scores,
    check_canaries,
    claimed_epsilon,
    load_released,
    planter,
    spec_path,
)
from fed_nessa.canary.stats import one_run_audit
from fed_nessa.config import DPMode, FederationConfig, LinearStart, RoundStatus, from_run_config
from fed_nessa.federated.layout import build_net
from fed_nessa.privacy.ledger import key_store
from fed_nessa.sim.runner import ENGINES, build_config, build_policy, decline_reasons, run_engine

DEFAULT_CONFIG = "canary-audit"
DP_RUN, CONTROL_RUN = "dp", "control"
#: What turns the DP run into its positive control (run-config keys, then device-policy keys).
CONTROL_SET = ('dp-mode="none"', "budget-split=0")
CONTROL_DEVICE_SET = ("allow-non-dp=true",)
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class FederatedAudit:
    """What the audit's outcome depends on besides the config file (all written into the report)."""

    config: str = DEFAULT_CONFIG
    overrides: tuple[str, ...] = ()
    device_overrides: tuple[str, ...] = ()
    engine: str = "fleet"
    canaries: int = 1000
    seed: int = 0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        check_canaries(self.canaries)
        if self.engine not in ENGINES:
            raise CanaryError(f"--engine {self.engine!r}: allowed values {', '.join(ENGINES)}")
        if not 0 < self.confidence < 1:
            raise CanaryError(f"--confidence {self.confidence}: must be in (0, 1)")


# ----------------------------------------------------------------------------- one run folder
def initial_cosines(cfg: FederationConfig, spec: CanarySpec) -> np.ndarray | None:
    """The canaries' cosines under the run's initial network, where that network's linear map survives.

    The initial network is built from the seed alone (:func:`build_net`, as every party
    builds it), so it cannot depend on a canary. With ``linear-start = suffstats`` the
    statistics round replaces its linear map (and the residual branch starts at zero), so
    its cosine would only add independent noise to the score: None.
    """
    if cfg.linear_start != LinearStart.NONE:
        return None
    return canary_cosines(build_net(cfg, spec.x.shape[1], spec.y.shape[1]), spec.x, spec.y).astype(np.float64)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run folder's ``summary.json`` (its config, rounds and noise plan)."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {SUMMARY_FILE}: not a finished run folder")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise ValueError(f"{path}: not a run summary (no 'config' object)")
    return summary


def _run_facts(summary: dict[str, Any]) -> dict[str, Any]:
    """What the report states about a run: rounds, phases, noise plan, utility, size."""
    rounds = summary.get("rounds", [])
    final = summary.get("final", {})
    gate = final.get("gate") or {}
    return {
        "rounds": len(rounds),
        "rounds_applied": sum(1 for r in rounds if r.get("status") == "applied"),
        "phases": sorted({str(r.get("phase")) for r in rounds}),
        "noise_plan": summary.get("noise_plan"),
        "pairs": (summary.get("engine") or {}).get("pairs"),
        "eer": final.get("eer"),
        "gate_shipped": gate.get("shipped"),
        "seconds": (summary.get("timing") or {}).get("total_seconds"),
    }


def score_run(run_dir: Path | str, label: str, confidence: float = 0.95) -> dict[str, Any]:
    """Score one finished run folder with canaries: its claim, the attack, the bound."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    spec = CanarySpec.load(spec_path(run_dir))
    released = load_released(run_dir)
    summary = read_summary(run_dir)
    try:
        cfg = from_run_config(summary["config"])
    except ValueError as exc:
        raise ValueError(f"{run_dir / SUMMARY_FILE}: {exc}") from None
    baseline = initial_cosines(cfg, spec)
    scores = canary_scores(released, spec, baseline)
    claim = claimed_epsilon(run_dir, spec)
    attack = one_run_audit(scores, spec.included, claim.delta, confidence)
    return {
        "label": label, "run_dir": str(run_dir), "dp_mode": cfg.dp_mode,
        "epsilon_claimed": claim.epsilon, "delta": claim.delta, "claim_devices": claim.devices,
        "claim_worst_device": claim.worst_device,
        "baseline": "initial network (seed only)" if baseline is not None else "none (the statistics round "
                    "replaces the initial linear map)",
        "canaries": spec.m, "included": int(spec.included.sum()), "seed": spec.seed, "fleet": spec.fleet,
        **_run_facts(summary),
        "attack": asdict(attack), "scores_in": scores[spec.included].tolist(),
        "scores_out": scores[~spec.included].tolist(),
    }


# ----------------------------------------------------------------------------- the two runs
def _fresh(run_dir: Path) -> None:
    """Refuse a used run folder: its ledgers would carry earlier spending, its devices other canaries."""
    store = key_store(run_dir)  # beside the run folder unless $FED_NESSA_KEY_STORE names a shared one
    for used in (run_dir, spec_path(run_dir), *([store] if store.parent == run_dir.parent else [])):
        if used.exists():
            raise CanaryError(f"{used} exists: the audit needs fresh run folders (remove it or choose another --out)")


def run_with_canaries(audit: FederatedAudit, run_dir: Path, label: str, extra: tuple[str, ...] = (),
                      device_extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One real run (the runner's path, canaries planted before round 1), then its score."""
    cfg = build_config(audit.config, [*audit.overrides, *extra], run_dir=run_dir)
    policy = build_policy(audit.config, [*audit.device_overrides, *device_extra])
    _fresh(Path(cfg.run_dir))
    t0 = time.perf_counter()
    summary = run_engine(cfg, policy, engine=audit.engine, quiet=True,
                         plant=planter(audit.canaries, audit.seed, cfg.run_dir))
    if not any(r.get("status") == RoundStatus.APPLIED for r in summary["rounds"]):
        declined = decline_reasons(Path(cfg.run_dir))
        raise CanaryError(f"the {label} run {cfg.run_dir} released no aggregate, so its aligner learnt nothing and "
                          f"an audit of it would prove nothing" + (f" (devices declined: {'; '.join(declined)})"
                                                                   if declined else ""))
    seconds = summary.get("timing", {}).get("total_seconds", time.perf_counter() - t0)
    return {**score_run(cfg.run_dir, label, audit.confidence), "seconds": seconds}


def federated_audit(audit: FederatedAudit, out_dir: Path | str) -> dict[str, Any]:
    """The DP run and its positive control, scored, with the two verdicts."""
    out_dir = Path(out_dir).resolve()
    if build_config(audit.config, list(audit.overrides)).dp_mode == DPMode.NONE:
        raise CanaryError(f"{audit.config}: dp-mode is 'none': the DP run would claim nothing to audit")
    for label in (DP_RUN, CONTROL_RUN):
        _fresh(out_dir / label)
    dp = run_with_canaries(audit, out_dir / DP_RUN, DP_RUN)
    aligner = (dp.get("noise_plan") or {}).get("aligner")
    pin = (f'aligner="{aligner}"',) if aligner else ()
    control = run_with_canaries(audit, out_dir / CONTROL_RUN, CONTROL_RUN, (*CONTROL_SET, *pin), CONTROL_DEVICE_SET)
    lb_dp = dp["attack"]["epsilon_lower_bound"]
    lb_ctl = control["attack"]["epsilon_lower_bound"]
    claimed = min(dp["epsilon_claimed"].values())
    return {
        "mode": "federated",
        "audit": {**asdict(audit), "overrides": list(audit.overrides),
                  "device_overrides": list(audit.device_overrides)},
        "control_changes": {"set": [*CONTROL_SET, *pin], "device_set": list(CONTROL_DEVICE_SET)},
        "runs": [dp, control],
        "checks": {
            "dp_lower_bound_below_claimed": bool(lb_dp <= claimed),
            "control_clearly_above_dp": control_clearly_above(lb_ctl, lb_dp),
        },
    }


CANARY_DESIGN = ("m canary pairs: random unit x_c (d_X) and random unit y_c (d_Y), independent of the data, each "
                 "included with probability 1/2 (numpy default_rng(seed), as the centralised audit); "
                 f"{ASSIGNMENT_RULE}; the devices then run the protocol unchanged; score = cos(map_runtime(y_c), "
                 "map_enroll(x_c)) of the released aligner (minus the initial network's cosine where its linear map "
                 "survives); guesses: top k_+ 'in', bottom k_- 'out', abstain otherwise, (k_+, k_-) from a grid fixed "
                 f"in advance, Bonferroni-corrected; at least {MIN_CANARIES} canaries")


# ----------------------------------------------------------------------------- the report
def write_federated_report(result: dict[str, Any], out_dir: Path | str) -> None:
    """``empirical.json``, ``report.md`` and ``canary-scores.png`` (the centralised audit's file names)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(result, default=float))
    (out_dir / "empirical.json").write_text(json.dumps(slim, indent=1) + "\n")
    score_histogram(result["runs"], out_dir / "canary-scores.png",
                    [f"{r['label']} (dp-mode {r['dp_mode']})" for r in result["runs"]],
                    xlabel="score: canary cosine of the released aligner")
    (out_dir / "report.md").write_text(federated_markdown(result))


def _eps(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.3f}"


def _plan_text(plan: dict[str, Any] | None) -> str:
    if not plan:
        return "n/a"
    return (f"statistics sigma {plan['suffstats_sigma']:.3g}, DP-SGD sigma {plan['dpsgd_sigma']:.3g}, q "
            f"{plan['sample_rate']:g}, aligner {plan['aligner']}")


def _setup_lines(result: dict[str, Any]) -> list[str]:
    """Where the runs came from: the audit's own config, or run folders scored as found."""
    dp = result["runs"][0]
    size = (f"{dp['fleet']} devices, {dp['pairs'] if dp['pairs'] is not None else 'n/a'} pairs with the canaries, "
            f"{dp['rounds']} round(s) ({', '.join(dp['phases'])}); noise plan of the DP run: "
            f"{_plan_text(dp['noise_plan'])}")
    audit = result.get("audit")
    if audit is None:
        folders = ", ".join(f"`{r['run_dir']}`" for r in result["runs"])
        return [f"Run folders scored as found: {folders}: {size}."]
    changes = result["control_changes"]
    return [f"Config `{audit['config']}` (+ `--set` {audit['overrides'] or 'none'}, `--device-set` "
            f"{audit['device_overrides'] or 'none'}), engine **{audit['engine']}**: {size}.", "",
            f"The positive control is the same config with `--set` {' '.join(changes['set'])} and `--device-set` "
            f"{' '.join(changes['device_set'])}: no noise, the same rounds, population, canaries and coins."]


def _row(run: dict[str, Any]) -> str:
    a = run["attack"]
    eer = f"{100 * run['eer']:.2f}%" if run.get("eer") is not None else "n/a"
    seconds = f"{run['seconds']:.0f}" if run.get("seconds") is not None else "n/a"
    tight = [eps for acc, eps in run["epsilon_claimed"].items() if acc != "rdp"]
    return (f"| {run['label']} | {run['dp_mode']} | {_eps(run['epsilon_claimed']['rdp'])} | "
            f"{_eps(tight[0]) if tight else 'n/a'} | {a['guesses']} | {a['correct']} | {a['auroc']:.3f} | "
            f"{a['tpr_at_fpr']['0.01']:.3f} | {a['tpr_at_fpr']['0.05']:.3f} | {a['epsilon_lower_bound']:.3f} | "
            f"{a['epsilon_lower_bound_cp']:.3f} | {eer} | {seconds} |")


def federated_markdown(result: dict[str, Any]) -> str:
    """The report: setup, canary design, one table row per run, the verdicts."""
    runs, checks = result["runs"], result["checks"]
    dp = runs[0]
    lines = ["# Federated canary audit (canaries inside the devices of real runs)", "",
             *_setup_lines(result), "",
             f"**Canary design**: {CANARY_DESIGN}.", "",
             f"m = {dp['canaries']} canaries ({dp['included']} included), inclusion probability 0.5, seed "
             f"{dp['seed']}, confidence {dp['attack']['confidence']}, delta {dp['delta']:g} (the devices' ledgers). "
             f"The claimed epsilon is the largest example-level epsilon among the {dp['claim_devices']} devices "
             "assigned a canary, re-derived from their signed ledgers (RDP, and PLD, or under the integer mechanism "
             "the Skellam accountant: PLD has no Skellam mechanism).", "",
             "| run | dp-mode | eps claimed RDP | eps claimed PLD / Skellam | guesses | correct | AUROC | TPR@1%FPR | "
             "TPR@5%FPR | eps lower bound (one-run, delta) | eps lower bound (Clopper-Pearson, delta=0) | "
             "EER of the released aligner | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             *(_row(run) for run in runs),
             "", f"Score baseline: {dp['baseline']}.", "",
             "- DP run: lower bound <= claimed epsilon: "
             f"**{'yes' if checks['dp_lower_bound_below_claimed'] else 'NO'}**"]
    if "control_clearly_above_dp" in checks:
        lines.append("- Positive control (no noise): bound clearly above the DP run's (by > 0.5 and > 2x): "
                     f"**{'yes' if checks['control_clearly_above_dp'] else 'NO'}**")
    else:
        lines.append("- No positive control was given: a low bound alone does not show the attack could see leakage.")
    lines += ["", "The canaries' secret (seed, assignment, inclusion bits, x_c, y_c) is `<run-dir>.canaries.npz` "
              "beside each run folder, never inside it. A lower bound below the claim shows the claim is not "
              "violated by this attack, not that it is tight.", "", "![canary scores](canary-scores.png)", ""]
    return "\n".join(lines)
