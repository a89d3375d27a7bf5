"""Fleet runs that configure themselves: the settings a fleet size implies, derived in one place.

A fleet-engine run at 10^4-10^5 devices needs ten settings that follow from the fleet size,
the privacy unit and epsilon, and that a new user cannot guess (docs/federation.md "Fleet runs
that configure themselves"):

* ``secagg-quantization-range``: the largest power of two (at most the default 2**22) whose
  product with the devices per round stays below SecAgg+'s 2**32 modulus;
* the promised g, ``max(min-arrivals, ceil(min-arrival-fraction x cohort))``
  (:func:`fed_nessa.federated.release.promised_arrivals`), and every simulated device's
  ``guaranteed-arrivals`` equal to it, so each noise share is sized for exactly that promise;
* the local DP-SGD rate ``sample-rate`` (example level): an expected
  :data:`PAIRS_PER_ROUND` pairs per round over the fleet, at ``expected-pairs-per-device`` each; under the
  integer mechanism the fraction of that rate whose plan holds the most signal (:func:`integer_sample_rate`);
* ``budget-split`` (when no noise multiplier is given): the noise is calibrated from epsilon
  instead of taken as given. Example level: the share of epsilon that alone buys the statistics
  round a noise multiplier of :data:`STATS_SIGMA` (at most :data:`MAX_STATS_SHARE`); device
  level: :data:`BUDGET_SPLIT`;
* the schedule (example level): ``num-server-rounds`` = the statistics rounds + :data:`DPSGD_ROUNDS`
  (only the statistics rounds with ``aligner = linear``) and Adam's ``server-lr``: :data:`SERVER_LR`, or
  :data:`LOW_SIGNAL_SERVER_LR` where the plan's signal is below :data:`LOW_SIGNAL` (:func:`server_lr`; where
  the plan cannot be built before the data are drawn, an integer mechanism on a shard source, :data:`SERVER_LR`);
* ``delta`` (device level): a power of ten below 1 / devices;
* the devices' policy: ``min-noise-multiplier`` and ``min-suffstats-noise-multiplier``
  (:data:`DEVICE_MIN_NOISE`), their ``epsilon-budget``, ``delta`` and ``privacy-unit`` equal
  to the run's.

An explicit setting (a config file or ``--set``/``--device-set``) always wins; an explicit
setting that contradicts the fleet (a range that wraps the modulus, a device g the server can
never promise, a device-level policy on an example-level run) is one clear error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fed_nessa.config import (
    SECAGG_MODULUS_RANGE,
    AlignerChoice,
    FederationConfig,
    PrivacyUnit,
    ServerOptimizer,
    from_run_config,
)
from fed_nessa.data.synthetic import embedding_dims, population_config
from fed_nessa.errors import FedNessaError
from fed_nessa.federated.noise_plan import NoisePlan, noise_plan
from fed_nessa.federated.release import promised_arrivals
from fed_nessa.privacy.calibration import gaussian_epsilon

#: Expected pairs sampled per DP-SGD round over the whole fleet: q = 0.04 at 10k devices. The
#: field notes' replay (10k, epsilon 3) reached 4.15 % EER with q 0.04 where q 0.02 gave 5.55 %;
#: tuned on population seed 1 (docs/results.md "How the self-set protocol was chosen").
PAIRS_PER_ROUND = 44_800
#: Example level under the integer mechanism: the fractions of the :data:`PAIRS_PER_ROUND` rate tried; the rule
#: keeps the one whose plan holds the most clipped examples per noise std per round (the auto rule's statistic).
#: A q the integer mechanism's accounting charges more than the Gaussian's buys less signal; under the symmetric
#: subsampling expansion (fed_nessa.privacy.skellam) the two differ by ~2 % in sigma and the full rate wins at 10k
#: devices at every epsilon (under Zhu & Wang's general bound it halved q at epsilon 3: docs/results.md "The integer
#: mechanism at small epsilon").
INTEGER_RATE_FRACTIONS = (1.0, 0.75, 0.5, 0.375, 0.25)
#: Example level: the statistics round's noise multiplier. The linear start barely suffers at
#: sigma 1.5-2.5 (field notes: "a budget split ... is the measured sweet spot"); the replay's best
#: epsilon-3 schedule used 2.5, leaving the rest of epsilon to DP-SGD.
STATS_SIGMA = 2.5
#: Example level: the largest share of epsilon the statistics round takes (small epsilon: DP-SGD
#: keeps at least 40 %; where that is too little the auto rule ships the linear start with all of it).
MAX_STATS_SHARE = 0.6
#: Share of epsilon spent on the statistics round at device level (each arm is its own run with the
#: whole epsilon; the device-level study's setting).
BUDGET_SPLIT = {PrivacyUnit.DEVICE.value: 1.0}
#: Example level: DP-SGD rounds after the statistics round. 1,000 rounds beat 500 at every 10k
#: cell measured (study: epsilon 8, 0.77 -> 0.92 of non-DP NESSA; the EER still falls at round 500).
DPSGD_ROUNDS = 1000
#: Example level: Adam's server learning rate where the plan's signal (the auto rule's statistic) reaches
#: :data:`LOW_SIGNAL` (the replay's epsilon-3 schedule; 1e-3 before).
SERVER_LR = 2e-3
#: Example level: the signal below which a DP-SGD plan takes :data:`LOW_SIGNAL_SERVER_LR`. Adam divides each
#: step by the noise's std, so a round with less signal per noise std moves the weights less towards the optimum
#: per unit of noise walked; over the fixed 1,000 rounds a larger step is what reaches it. Just above the largest
#: signal where the larger step was measured to win (17.6k, session 14), well below the epsilon-8 cells (36-40k)
#: that met their targets at 2e-3 (16,000 in sessions 11-13).
LOW_SIGNAL = 20_000.0
#: Example level: Adam's server learning rate below :data:`LOW_SIGNAL`. Population seed 1, 10k devices, epsilon 3,
#: Skellam (signal 13.9k, Zhu & Wang's bound): lr 2e-3 ends at 6.3 % EER against its start's 5.65 %, lr 4e-3 at
#: 4.75 % against 5.52 %; at 17.6k (the symmetric bound) 2e-3 ends near 4.7 % and 4e-3 near 3.8 % (docs/results.md
#: "A larger server step at low signal").
LOW_SIGNAL_SERVER_LR = 4e-3
#: The simulated devices' smallest accepted noise multipliers (both phases).
DEVICE_MIN_NOISE = 0.2
#: The largest quantization range derived (the run-config default).
MAX_QUANTIZATION_RANGE = FederationConfig().secagg_quantization_range


class FleetSettingsError(FedNessaError, ValueError):
    """An explicit setting that contradicts the fleet it is meant for."""


@dataclass(frozen=True)
class FleetSettings:
    """What was derived (only keys the user did not set), as run-config and device-policy keys."""

    run: dict[str, Any]
    device: dict[str, Any]

    def describe(self, devices: int) -> str:
        """One line for the terminal: what the engine chose and from what."""
        chosen = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.run.items()]
        chosen += [f"device {k}={v:g}" if isinstance(v, float) else f"device {k}={v}" for k, v in self.device.items()]
        return f"fleet settings derived for {devices} devices: " + (", ".join(chosen) or "none (all given)")


def quantization_range(devices_per_round: int) -> int:
    """The largest power of two <= the default whose sum over ``devices_per_round`` stays below 2**32."""
    fit = 2 ** int(math.log2((SECAGG_MODULUS_RANGE - 1) / max(devices_per_round, 1)))
    return min(MAX_QUANTIZATION_RANGE, fit)


def device_level_delta(devices: int, default: float) -> float:
    """The largest power of ten strictly below 1 / devices, at most ``default``."""
    exponent = math.floor(math.log10(1.0 / devices))
    delta = 10.0 ** exponent
    if delta >= 1.0 / devices:
        delta = 10.0 ** (exponent - 1)
    return min(default, delta)


def budget_split(unit: str, epsilon: float, delta: float) -> float:
    """The share of epsilon for the statistics round: device level :data:`BUDGET_SPLIT`; example level
    what buys it :data:`STATS_SIGMA` alone, at most :data:`MAX_STATS_SHARE`."""
    if unit != PrivacyUnit.EXAMPLE:
        return BUDGET_SPLIT.get(unit, 0.0)
    return min(MAX_STATS_SHARE, gaussian_epsilon(STATS_SIGMA, delta) / epsilon)


def _schedule(given_run: Mapping[str, Any], base: FederationConfig, linear_stats: bool) -> dict[str, Any]:
    """Example level: the rounds and Adam's learning rate the user left out."""
    out: dict[str, Any] = {}
    if "num-server-rounds" not in given_run:
        stats = int(_value(given_run, "suffstats-rounds", base)) if linear_stats else 0
        linear_only = str(_value(given_run, "aligner", base)) == AlignerChoice.LINEAR
        out["num-server-rounds"] = stats + (0 if linear_only and stats else DPSGD_ROUNDS)
    if "server-lr" not in given_run and str(_value(given_run, "server-optimizer", base)) == ServerOptimizer.ADAM:
        out["server-lr"] = SERVER_LR  # by the plan's signal once q is known (:func:`server_lr`)
    return out


def server_lr(signal: float) -> float:
    """Adam's server learning rate for a DP-SGD plan whose rounds hold ``signal`` clipped examples per noise std."""
    return SERVER_LR if signal >= LOW_SIGNAL else LOW_SIGNAL_SERVER_LR


def _value(given: Mapping[str, Any], key: str, default_obj: Any) -> Any:
    return given.get(key, getattr(default_obj, key.replace("-", "_")))


def derive(given_run: Mapping[str, Any], given_device: Mapping[str, Any]) -> FleetSettings:
    """The settings a fleet-engine run derives from the keys it was given (run config, device policy).

    ``given_*`` hold only what the user set (config file, ``--set``, ``--device-set``);
    derived keys never replace them. Raises :class:`FleetSettingsError` on a contradiction.
    """
    base = FederationConfig()
    devices = int(_value(given_run, "num-devices", base))
    cpr = int(_value(given_run, "clients-per-round", base))
    cohort = devices if cpr == 0 else min(cpr, devices)
    unit = str(_value(given_run, "privacy-unit", base))
    linear_stats = str(_value(given_run, "linear-start", base)) == "suffstats"
    per_round = max(cohort, devices if linear_stats else 0)  # the statistics round sums every device
    run: dict[str, Any] = {}
    if "secagg-quantization-range" not in given_run:
        run["secagg-quantization-range"] = quantization_range(per_round)
    if unit == PrivacyUnit.EXAMPLE and "sample-rate" not in given_run:
        pairs = float(_value(given_run, "expected-pairs-per-device", base))
        run["sample-rate"] = min(1.0, PAIRS_PER_ROUND / (devices * pairs))
    if not {"budget-split", "noise-multiplier", "suffstats-noise-multiplier"} & set(given_run):
        run["budget-split"] = budget_split(unit, float(_value(given_run, "epsilon-budget", base)),
                                           float(_value(given_run, "delta", base)))
    if unit == PrivacyUnit.EXAMPLE:
        run.update(_schedule(given_run, base, linear_stats))
    if unit == PrivacyUnit.DEVICE and "delta" not in given_run:
        run["delta"] = device_level_delta(devices, base.delta)
    _check_range(given_run, per_round)
    cfg = _config(given_run, run)
    dims = source_dims(cfg)
    signal = None  # the chosen plan's, where the integer rate's search already built it
    if "sample-rate" in run and unit == PrivacyUnit.EXAMPLE and cfg.integer_noise and dims is not None:
        run["sample-rate"], signal = integer_sample_rate(cfg, devices, dims)
        cfg = _config(given_run, run)
    if "server-lr" in run and (dims is not None or not cfg.integer_noise):
        run["server-lr"] = server_lr(_auto_plan(cfg, devices, dims).signal if signal is None else signal)
    g = promised_arrivals(cfg, cohort)
    device = _device(given_device, cfg, g)
    _check_device(given_device, cfg, g)
    return FleetSettings(run, device)


def source_dims(cfg: FederationConfig) -> tuple[int, int] | None:
    """The payload's ``(d_x, d_y)`` where the data source fixes them before any data is drawn (the built-in
    synthetic population); None elsewhere (the integer mechanism's rate is then not chosen, q stays as derived)."""
    if cfg.data_source != "synthetic":
        return None
    return embedding_dims(population_config(cfg.num_devices, cfg.seed))


def _auto_plan(cfg: FederationConfig, devices: int, dims: tuple[int, int] | None) -> NoisePlan:
    """The plan ``aligner = auto`` would make of ``cfg``: its signal is the DP-SGD rounds' whatever is shipped."""
    return noise_plan(dataclasses.replace(cfg, aligner=AlignerChoice.AUTO), devices, dims)


def integer_sample_rate(cfg: FederationConfig, devices: int, dims: tuple[int, int]) -> tuple[float, float]:
    """The DP-SGD rate of :data:`INTEGER_RATE_FRACTIONS` x ``cfg.sample_rate`` whose plan (this config otherwise)
    holds the most clipped examples per noise std per round (the largest such rate on a tie), and that signal:
    each candidate's plan is built once, and the server lr reads the chosen one's signal."""
    candidates = [(_auto_plan(dataclasses.replace(cfg, sample_rate=q), devices, dims).signal, q)
                  for q in (cfg.sample_rate * f for f in INTEGER_RATE_FRACTIONS)]
    signal, q = max(candidates)
    return q, signal


def _config(given_run: Mapping[str, Any], derived: Mapping[str, Any]) -> FederationConfig:
    """The run config the derived keys make (validated; a config error names the keys)."""
    return from_run_config({**given_run, **derived})


def _device(given: Mapping[str, Any], cfg: FederationConfig, g: int) -> dict[str, Any]:
    """The simulated devices' policy keys the fleet implies and the user did not set."""
    implied: dict[str, Any] = {
        "guaranteed-arrivals": g,
        "min-noise-multiplier": DEVICE_MIN_NOISE,
        "min-suffstats-noise-multiplier": DEVICE_MIN_NOISE,
        "epsilon-budget": cfg.epsilon_budget,
        "delta": cfg.delta,
        "privacy-unit": cfg.privacy_unit,
    }
    return {k: v for k, v in implied.items() if k not in given}


def _check_range(given_run: Mapping[str, Any], per_round: int) -> None:
    """An explicit quantization range that wraps SecAgg+'s modulus at this fleet size."""
    qr = given_run.get("secagg-quantization-range")
    if isinstance(qr, int) and not isinstance(qr, bool) and per_round * qr >= SECAGG_MODULUS_RANGE:
        raise FleetSettingsError(
            f"secagg-quantization-range = {qr} contradicts the fleet: {per_round} devices per round x {qr} >= 2**32 "
            f"(leave it out to derive {quantization_range(per_round)})")


def _check_device(given: Mapping[str, Any], cfg: FederationConfig, g: int) -> None:
    """Explicit device-policy keys no round of this run could satisfy."""
    wanted = given.get("guaranteed-arrivals")
    if isinstance(wanted, int) and wanted > g:
        raise FleetSettingsError(
            f"device guaranteed-arrivals = {wanted} contradicts the fleet: the server promises g = {g} "
            f"(min-arrivals {cfg.min_arrivals}, min-arrival-fraction {cfg.min_arrival_fraction:g} of the cohort), "
            "so every device would decline every round (leave it out to derive it)")
    unit = given.get("privacy-unit")
    if unit == PrivacyUnit.DEVICE and cfg.privacy_unit != PrivacyUnit.DEVICE:
        raise FleetSettingsError(
            "device privacy-unit = device contradicts the run's privacy-unit = example: every device would decline "
            "every round (set privacy-unit=device for the run, or leave the device's out)")


def as_overrides(keys: Mapping[str, Any]) -> list[str]:
    """``key=value`` items in ``--set``/``--device-set`` form (TOML scalars) for derived keys."""
    return [f"{k}={json.dumps(v)}" for k, v in keys.items()]


__all__ = ["BUDGET_SPLIT", "DEVICE_MIN_NOISE", "DPSGD_ROUNDS", "INTEGER_RATE_FRACTIONS", "LOW_SIGNAL",
           "LOW_SIGNAL_SERVER_LR", "MAX_STATS_SHARE", "PAIRS_PER_ROUND", "SERVER_LR", "STATS_SIGMA", "FleetSettings",
           "FleetSettingsError", "as_overrides", "budget_split", "derive", "device_level_delta", "integer_sample_rate",
           "quantization_range", "server_lr", "source_dims"]
