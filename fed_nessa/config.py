"""The validated federation config, read from Flower's run config.

Flower hands the ServerApp and every ClientApp the same run config: the
``[tool.flwr.app.config]`` table of ``pyproject.toml`` with ``--run-config``
overrides applied, kebab-case keys, values of type bool/int/float/str. This
module turns it into one frozen :class:`FederationConfig` and rejects every
out-of-range, mistyped or unknown key *before* any round starts, because a
typo discovered after an hour of rounds (or a privacy budget silently set to
something absurd) is far more expensive than an error at launch.

All problems are collected and reported in one :class:`ConfigError` whose
message names each key, the value found and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from fed_nessa import lowpass
from fed_nessa.errors import FedNessaError

# SecAgg+ sums integers below this modulus (Flower's default; it must stay < 2**32).
SECAGG_MODULUS_RANGE = 2**32


class DPMode(StrEnum):
    """Where the DP noise is added (docs/privacy.md)."""

    LOCAL = "local"
    DISTRIBUTED = "distributed"
    NONE = "none"


class DistributedMechanism(StrEnum):
    """The noise of ``dp-mode = distributed`` (docs/privacy.md "The integer mechanism")."""

    GAUSSIAN = "gaussian"  # continuous Gaussian shares, Flower's quantizer rounds them (accounted as Gaussian)
    SKELLAM = "skellam"  # integer Skellam shares in SecAgg+'s field: what is released is what is accounted


class LinearStart(StrEnum):
    SUFFSTATS = "suffstats"
    NONE = "none"


class Phase(StrEnum):
    """What one server round computes: the private linear start or one DP-SGD step."""

    SUFFSTATS = "suffstats"
    DPSGD = "dpsgd"


class ReplyStatus(StrEnum):
    """A device's answer to a round's plan."""

    OK = "ok"
    DECLINED = "declined"


class RoundStatus(StrEnum):
    """What the server did with a round (recorded in the federation ledger)."""

    APPLIED = "applied"
    REFUSED = "refused"  # too few arrivals: nothing was unmasked
    ABORTED = "aborted"  # SecAgg+ halted (too many drop-outs)
    SKIPPED = "skipped"  # too few devices accepted the plan


class ServerOptimizer(StrEnum):
    ADAM = "adam"
    SGD = "sgd"  # SGD with momentum 0.9
    ADAM_BC = "adam-bc"  # Adam minus the known DP noise variance in its second moment (DP-AdamBC)


class ServerLrDecay(StrEnum):
    """How the server's learning rate falls over the scheduled DP-SGD steps (after any warmup)."""

    NONE = "none"
    COSINE = "cosine"  # 0.5 (1 + cos(pi s / S)) over the S steps after the warmup, s = 0 .. S - 1


class DeviceUpdate(StrEnum):
    """What a device computes in a device-level DP-SGD round (docs/privacy.md "DP-FedAvg at device level")."""

    FEDSGD = "fedsgd"  # one mean gradient over device-batch pairs, clipped as one vector
    FEDAVG = "fedavg"  # local-epochs of plain SGD over its own pairs, the model delta clipped as one vector


class LossCentre(StrEnum):
    """About which point the devices' DP-SGD rounds take the cosine loss (fed_nessa/model/centre.py)."""

    NONE = "none"  # the plain cosine loss, 1 - cos(f(y), x)
    # 1 - cos(f(y) - mu, x - mu), mu the mean enrollment embedding the released statistics give (post-processing)
    ENROLLMENT_MEAN = "enrollment-mean"


class DeviceWeight(StrEnum):
    """How much a device's clipped DP-FedAvg delta weighs in the round's sum (docs/privacy.md "DP-FedAvg at device
    level"). Either way every weight is <= 1, so one device still moves the sum by at most the clip."""

    EQUAL = "equal"  # every device's clipped delta at weight 1
    # min(n, device-stats-pairs) / device-stats-pairs: the pairs the device's DP linear start weighed it by
    # (McMahan et al. 2018's capped weighting); a device with few pairs overfits them and its delta points away
    PAIRS = "pairs"


class AlignerChoice(StrEnum):
    """Which aligner the run may ship: the DP linear start, DP NESSA, or the gate's pick (``auto``).

    Whatever the choice, the promotion gate ships it only where it beats not updating
    (:mod:`fed_nessa.evaluation.gate`)."""

    LINEAR = "linear"
    NESSA = "nessa"
    AUTO = "auto"


class LedgerLayout(StrEnum):
    """Where a simulated fleet keeps its device ledgers (a real device keeps its own file)."""

    FILES = "files"  # one signed JSONL per device, <run>/devices/<id>/ (the layout of a real device)
    SQLITE = "sqlite"  # the fleet engine's ledger store: one SQLite file, one fsync per pass (10^5-10^6 devices)


class FleetNumerics(StrEnum):
    """How the fleet engine computes a round (the Flower engine is always exact)."""

    EXACT = "exact"  # per-device vectors, Flower's quantization, modular sum
    FAST = "fast"  # distribution-equivalent: one draw for the summed noise and rounding error


class PrivacyUnit(StrEnum):
    """Whose data one guarantee protects (docs/privacy.md "Example-level and device-level")."""

    EXAMPLE = "example"  # one utterance pair: per-example clipping (DP-SGD, statistics of one pair)
    DEVICE = "device"  # everything one device holds: its whole round contribution clipped


DP_MODES = tuple(m.value for m in DPMode)
#: The promotion gate's default confidence: the share of paired speaker resamples in which a more complex
#: candidate must beat the simpler choice (docs/results.md "The gate's confidence").
GATE_CONFIDENCE = 0.95
LINEAR_STARTS = tuple(s.value for s in LinearStart)
# The data names, listed once (the config sits below fed_nessa.data, which maps each to its source in
# fed_nessa.data.registry; tests/test_data_registry.py keeps the two in step). FEDERATION_NAMES also build a
# simulation's devices; any other name is for the centralised commands only.
CORPUS_NAME = "kokoro-voices"  # also its folder under data/
SOURCE_NAMES = ("synthetic", "real-dev", "real-speed-dev", "real-dev+speed", CORPUS_NAME)
FEDERATION_NAMES = ("synthetic", "real-dev", CORPUS_NAME)
_FOLDER_HINT = f"allowed values {', '.join(FEDERATION_NAMES)}, or a folder of shards"


class ConfigError(FedNessaError, ValueError):
    """One or more run-config values are invalid (message lists every fault)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid federation config: " + "; ".join(self.problems))


@dataclass(frozen=True)
class FederationConfig:
    """Every knob of a federated run, validated (see :func:`from_run_config`)."""

    num_server_rounds: int = 1
    clients_per_round: int = 0  # 0: every device in every round (full participation)
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.001
    server_lr: float = 0.001
    dp_mode: str = "distributed"
    distributed_mechanism: str = "skellam"  # dp-mode distributed: the exact integer mechanism ("gaussian": comparison)
    noise_multiplier: float = 1.5
    clip_norm: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float = 8.0
    linear_start: str = "suffstats"
    suffstats_noise_multiplier: float = 0.6454  # epsilon 7.965 per device under skellam at the main job's g
    suffstats_rounds: int = 1
    ridge_alpha: float = 1e-3
    update_clip: float = 1.0
    min_arrivals: int = 50
    min_arrival_fraction: float = 0.8
    secagg_num_shares: int = 11
    secagg_reconstruction_threshold: int = 6
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 2**22
    round_timeout: float = 0.0
    data_source: str = "synthetic"
    num_devices: int = 1000
    enroll_model: str = "synthetic-x-new"
    runtime_model: str = "synthetic-y-old"
    eval_speakers: int = 100
    seed: int = 0
    run_dir: str = "runs/latest"
    resume: bool = False
    hidden: int = 64
    depth: int = 1
    max_pairs_per_device: int = 1000
    reproducible_noise: bool = False
    sample_rate: float = 0.0  # device-local Poisson rate q of DP-SGD; 0: q = 1/ceil(n/batch-size)
    server_optimizer: str = "adam"
    # Decay of the server's exponential moving average of the DP-SGD weights (0: off). Post-processing
    # of released sums (no privacy cost); the average is what is evaluated, gated and shipped.
    server_ema: float = 0.0
    # DP-SGD steps over which the server's learning rate rises linearly to server-lr (0: none). A function
    # of the step count only (public): post-processing, no privacy cost.
    server_lr_warmup: int = 0
    # How the server's learning rate falls over the scheduled DP-SGD steps after the warmup: "none" or
    # "cosine". A function of the step count and the public schedule only: post-processing, no privacy cost.
    server_lr_decay: str = "none"
    # A low-pass filter over the rounds on the released DP-SGD updates before the server's optimiser (DOPPLER,
    # fed_nessa/lowpass.py): comma-separated b_0..b_nb and a_1..a_na ("": no filter). A function of
    # the released sums and the public coefficients only: post-processing, no privacy cost.
    server_lowpass_b: str = ""
    server_lowpass_a: str = ""
    eval_every: int = 1
    aligner: str = "auto"
    expected_pairs_per_device: float = 112.0  # public prior for aligner=auto (never measured on devices)
    fleet_numerics: str = "fast"
    ledger_layout: str = "files"  # fleet engine: "sqlite" keeps every device ledger in one store (docs/privacy.md)
    # synthetic, kokoro-voices: the server's own validation speakers for the gate; 400 (100 until session 15): the
    # paired EER difference of two aligners moves ~0.4-0.7 points between draws of 100 speakers, half at 400
    # (docs/results.md "The gate's confidence" and "How many validation speakers")
    validation_speakers: int = 400
    ship_without_validation: bool = False  # no validation set: ship the aligner untested (else ship nothing)
    gate_confidence: float = GATE_CONFIDENCE  # the promotion gate's confidence over speaker resamples
    dropout_rate: float = 0.0  # fleet engine: chance an accepted device drops out before sending
    budget_split: float = 0.0  # share of epsilon-budget for the statistics round; 0: sigmas as given
    privacy_unit: str = "example"  # "device": each device clips its whole round contribution
    device_clip_norm: float = 0.1  # device level: L2 bound on a device's clipped mean-gradient update
    device_stats_pairs: int = 100  # device level: a device's statistics weigh at most this many pairs
    device_batch: int = 16  # device level: pairs a device draws (secretly) for its round's mean gradient; 0: all
    device_update: str = "fedsgd"  # device level: "fedavg" trains locally and sends its clipped model delta
    device_weight: str = "equal"  # device level, fedavg: "pairs" weighs each clipped delta by its capped pairs
    # DP-SGD rounds: "enrollment-mean" takes the cosine loss about the mean enrollment embedding of the released
    # statistics, which every round config states (no privacy cost; docs/privacy.md "The loss about the mean")
    loss_centre: str = "none"
    local_lr: float = 0.01  # device level, fedavg: the device's plain-SGD step size (local-epochs epochs)
    local_batch: int = 16  # device level, fedavg: pairs per local minibatch; 0: full batch
    clip_target_quantile: float = 0.0  # device level: adaptive clipping to this quantile of update norms; 0: off
    clip_lr: float = 0.2  # adaptive clipping: geometric step, C <- C exp(-clip-lr (noisy fraction - quantile))
    clip_count_noise: float = 0.05  # adaptive clipping: the noisy count's std, as a fraction of the fleet
    references: bool = True  # fleet engine: fit the pooled non-DP references (false: a study reuses them)

    @property
    def integer_noise(self) -> bool:
        """Whether the run's distributed noise is the integer (Skellam) mechanism."""
        return self.dp_mode == DPMode.DISTRIBUTED and self.distributed_mechanism == DistributedMechanism.SKELLAM

    @property
    def noise_mechanism(self) -> str:
        """The noise every output names: the distributed mechanism, else the continuous Gaussian (local), or none."""
        if self.dp_mode == DPMode.NONE:
            return "none"
        distributed = self.dp_mode == DPMode.DISTRIBUTED
        return str(self.distributed_mechanism) if distributed else DistributedMechanism.GAUSSIAN.value

    def cohort_size(self, fleet: int) -> int:
        """Devices sampled per DP-SGD round in a fleet of ``fleet`` (0 means all of them)."""
        return fleet if self.clients_per_round == 0 else min(self.clients_per_round, fleet)

    def round_sample_rate(self, n: int, fleet: int, cohort: int) -> float:
        """The Poisson rate a device with ``n`` pairs uses in a DP-SGD round.

        ``sample-rate`` q is device-local and decoupled from the batch size; with a cohort
        smaller than the fleet it is scaled up by fleet / cohort (capped at 1), so
        cohort x q x mean pairs stays near the full-participation batch (field-notes: no
        amplification comes from the server's choice of devices). ``sample-rate = 0`` keeps
        the landed rule q = 1/ceil(n / batch-size).
        """
        if self.sample_rate <= 0:
            return 1.0 / math.ceil(max(n, 1) / self.batch_size)
        return min(1.0, self.sample_rate * fleet / max(cohort, 1))

    @property
    def secagg_timeout(self) -> float | None:
        """Seconds the server waits per SecAgg+ stage (``None``: wait for every reply)."""
        return self.round_timeout if self.round_timeout > 0 else None

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The kebab-case run-config form (round-trips through :func:`from_run_config`)."""
        out: dict[str, bool | int | float | str] = {}
        for f in dataclasses.fields(self):
            out[f.name.replace("_", "-")] = getattr(self, f.name)
        return out

    def replace(self, **changes: Any) -> FederationConfig:
        """A copy with ``changes`` applied and validated again."""
        merged = self.to_run_config()
        merged.update({k.replace("_", "-"): v for k, v in changes.items()})
        return from_run_config(merged)


_FIELDS = {f.name: f for f in dataclasses.fields(FederationConfig)}
# String keys holding comma-separated numbers: a lone number (TOML and ``--set`` parse ``0.1`` as a float) is
# the one-element list.
_NUMBER_LISTS = frozenset({"server-lowpass-b", "server-lowpass-a"})


def _coerce(key: str, value: Any, default: Any) -> tuple[Any, str | None]:
    """Cast a run-config value to the type of the field's default, or say why not.

    Flower passes TOML ints where a float is expected (``lr = 1``), so ints are
    accepted for floats; bools are never accepted as numbers (``True`` is an int
    in Python and would otherwise slip through as ``1``).
    """
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true", None
        return None, f"{key} = {value!r}: expected true or false"
    if isinstance(value, bool):
        return None, f"{key} = {value!r}: expected a {want.__name__}, got a boolean"
    if want is int:
        if isinstance(value, int):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        return None, f"{key} = {value!r}: expected an integer"
    if want is float:
        if isinstance(value, int | float):
            return float(value), None
        return None, f"{key} = {value!r}: expected a number"
    if key in _NUMBER_LISTS and isinstance(value, int | float):
        return repr(float(value)), None
    if isinstance(value, str):
        return str(value), None  # a plain str, also for a StrEnum member (checkpoints load weights-only)
    return None, f"{key} = {value!r}: expected a string"


def _range(problems: list[str], key: str, value: float, lo: float, hi: float, *,
           lo_open: bool = False, hi_open: bool = False) -> None:
    """Append a problem if ``value`` is outside ``[lo, hi]`` (``(`` / ``)`` where ``lo_open`` / ``hi_open``)."""
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{key} = {value!r}: must be a finite number in [{lo:g}, {hi:g}]")
        return
    bad = (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi)
    if bad:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        problems.append(f"{key} = {value!r}: allowed range {left}{lo:g}, {hi:g}{right}")


def _choice(problems: list[str], key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{key} = {value!r}: allowed values {', '.join(allowed)}")


def _check_ranges(c: FederationConfig) -> list[str]:
    """Range and consistency checks; empty when the config is usable."""
    p: list[str] = []
    _range(p, "num-server-rounds", c.num_server_rounds, 1, 100_000)
    if c.clients_per_round != 0:
        _range(p, "clients-per-round", c.clients_per_round, 3, 10_000_000)
    cohort = c.cohort_size(c.num_devices)
    _range(p, "local-epochs", c.local_epochs, 1, 1000)
    _range(p, "batch-size", c.batch_size, 1, 1_000_000)
    _range(p, "lr", c.lr, 0.0, 100.0, lo_open=True)
    _range(p, "server-lr", c.server_lr, 0.0, 100.0, lo_open=True)
    _choice(p, "dp-mode", c.dp_mode, DP_MODES)
    _choice(p, "distributed-mechanism", c.distributed_mechanism, tuple(m.value for m in DistributedMechanism))
    _range(p, "noise-multiplier", c.noise_multiplier, 0.0, 1000.0)
    if c.dp_mode != "none" and c.noise_multiplier <= 0:
        p.append(f"noise-multiplier = {c.noise_multiplier!r}: must be > 0 when dp-mode is {c.dp_mode!r}")
    _range(p, "clip-norm", c.clip_norm, 0.0, 1e6, lo_open=True)
    _range(p, "delta", c.delta, 0.0, 0.1, lo_open=True)
    _range(p, "epsilon-budget", c.epsilon_budget, 0.0, 1000.0, lo_open=True)
    _choice(p, "linear-start", c.linear_start, LINEAR_STARTS)
    _range(p, "suffstats-noise-multiplier", c.suffstats_noise_multiplier, 0.0, 1000.0)
    _range(p, "suffstats-rounds", c.suffstats_rounds, 1, 10_000)
    _range(p, "ridge-alpha", c.ridge_alpha, 0.0, 10.0, lo_open=True)
    if c.linear_start == "suffstats" and c.suffstats_rounds >= c.num_server_rounds + 1:
        p.append(f"suffstats-rounds = {c.suffstats_rounds}: must be <= num-server-rounds "
                 f"({c.num_server_rounds})")
    if c.linear_start == "suffstats" and c.dp_mode != "none" and c.suffstats_noise_multiplier <= 0:
        p.append(
            f"suffstats-noise-multiplier = {c.suffstats_noise_multiplier!r}: must be > 0 when "
            f"linear-start is 'suffstats' and dp-mode is {c.dp_mode!r}"
        )
    _range(p, "update-clip", c.update_clip, 0.0, 1e6, lo_open=True)
    _range(p, "secagg-num-shares", c.secagg_num_shares, 3, 10_000)
    if c.secagg_num_shares > cohort:
        p.append(f"secagg-num-shares = {c.secagg_num_shares}: allowed range [3, devices per round = {cohort}]")
    _range(p, "secagg-reconstruction-threshold", c.secagg_reconstruction_threshold, 2, 10_000)
    if c.secagg_reconstruction_threshold >= c.secagg_num_shares:
        p.append(
            f"secagg-reconstruction-threshold = {c.secagg_reconstruction_threshold}: allowed range "
            f"[2, secagg-num-shares - 1 = {c.secagg_num_shares - 1}]"
        )
    _range(p, "min-arrivals", c.min_arrivals, 2, 1_000_000)
    _range(p, "min-arrival-fraction", c.min_arrival_fraction, 0.01, 1.0)
    if c.min_arrivals > cohort:
        p.append(f"min-arrivals = {c.min_arrivals}: allowed range [2, devices per round = {cohort}]")
    _range(p, "secagg-clipping-range", c.secagg_clipping_range, 0.0, 1e6, lo_open=True)
    _range(p, "secagg-quantization-range", c.secagg_quantization_range, 2**8, 2**30)
    # Every device's quantized coordinate lies in [0, q]; the sum of a full cohort must stay
    # below the modulus or it wraps around silently.
    # The statistics round sums every device; a DP-SGD round the cohort.
    largest = max(cohort, c.num_devices if c.linear_start == LinearStart.SUFFSTATS else 0)
    if largest * c.secagg_quantization_range >= SECAGG_MODULUS_RANGE:
        p.append(
            f"devices per round * secagg-quantization-range = "
            f"{largest * c.secagg_quantization_range}: must be < 2**32 (the SecAgg+ "
            f"modulus), lower one of them"
        )
    _range(p, "round-timeout", c.round_timeout, 0.0, 86_400.0)
    if c.data_source not in FEDERATION_NAMES and not c.data_source.strip():
        p.append(f"data-source = '': {_FOLDER_HINT}")
    elif c.data_source in SOURCE_NAMES and c.data_source not in FEDERATION_NAMES:
        p.append(f"data-source = {c.data_source!r}: not a federated source ({_FOLDER_HINT})")
    _range(p, "num-devices", c.num_devices, 3, 10_000_000)
    # num-devices is the fleet: a synthetic run's size, a shard folder's count, real-dev's households and
    # kokoro-voices' device voices (each checked against the data before anything is written).
    if c.clients_per_round > c.num_devices:
        p.append(
            f"clients-per-round = {c.clients_per_round}: allowed range [3, num-devices = {c.num_devices}]"
        )
    for key, val in (("enroll-model", c.enroll_model), ("runtime-model", c.runtime_model),
                     ("run-dir", c.run_dir)):
        if not val.strip():
            p.append(f"{key} = {val!r}: must not be empty")
    _range(p, "eval-speakers", c.eval_speakers, 2, 1_000_000)
    _range(p, "seed", c.seed, 0, 2**63 - 1)
    _range(p, "hidden", c.hidden, 1, 65_536)
    _range(p, "depth", c.depth, 1, 16)
    _range(p, "max-pairs-per-device", c.max_pairs_per_device, 1, 10_000_000)
    _range(p, "sample-rate", c.sample_rate, 0.0, 1.0)
    _choice(p, "server-optimizer", c.server_optimizer, tuple(o.value for o in ServerOptimizer))
    _range(p, "server-ema", c.server_ema, 0.0, 1.0, hi_open=True)
    _range(p, "server-lr-warmup", c.server_lr_warmup, 0, 1_000_000)
    _choice(p, "server-lr-decay", c.server_lr_decay, tuple(d.value for d in ServerLrDecay))
    p.extend(lowpass.problems(c.server_lowpass_b, c.server_lowpass_a, c.num_server_rounds))
    if c.server_lowpass_b.strip() and c.server_optimizer == ServerOptimizer.ADAM_BC:
        p.append("server-lowpass-b with server-optimizer = 'adam-bc': the bias correction subtracts the released "
                 "noise variance, which the filter changes round by round; use 'adam' or 'sgd' with a filter")
    _range(p, "eval-every", c.eval_every, 1, 1_000_000)
    _choice(p, "aligner", c.aligner, tuple(a.value for a in AlignerChoice))
    _range(p, "expected-pairs-per-device", c.expected_pairs_per_device, 1.0, 1e7)
    _choice(p, "fleet-numerics", c.fleet_numerics, tuple(n.value for n in FleetNumerics))
    _choice(p, "ledger-layout", c.ledger_layout, tuple(layout.value for layout in LedgerLayout))
    _range(p, "budget-split", c.budget_split, 0.0, 1.0)
    _range(p, "validation-speakers", c.validation_speakers, 0, 1_000_000)
    _range(p, "gate-confidence", c.gate_confidence, 0.5, 1.0, hi_open=True)
    _range(p, "dropout-rate", c.dropout_rate, 0.0, 0.99)
    if c.budget_split > 0 and c.sample_rate <= 0 and c.privacy_unit != PrivacyUnit.DEVICE:
        p.append("budget-split > 0 calibrates one DP-SGD noise multiplier for every device: it needs a fleet-wide "
                 "sample-rate > 0 (with q = 1/ceil(n/batch-size) each device's rate, and so its sigma, would differ)")
    if c.budget_split > 0 and c.dp_mode == DPMode.NONE:
        p.append("budget-split > 0 needs a DP mode (dp-mode is 'none')")
    _choice(p, "privacy-unit", c.privacy_unit, tuple(u.value for u in PrivacyUnit))
    _range(p, "device-clip-norm", c.device_clip_norm, 0.0, 1e6, lo_open=True)
    _range(p, "device-stats-pairs", c.device_stats_pairs, 1, 10_000_000)
    _range(p, "device-batch", c.device_batch, 0, 10_000_000)
    if c.privacy_unit == PrivacyUnit.DEVICE and c.dp_mode == DPMode.LOCAL:
        p.append("privacy-unit = 'device' adds distributed noise shares under SecAgg+: it needs dp-mode "
                 "'distributed' (or 'none' for a non-DP baseline), got 'local'")
    if c.privacy_unit == PrivacyUnit.DEVICE and c.delta >= 1.0 / c.num_devices:
        p.append(f"delta = {c.delta:g}: a device-level guarantee needs delta below 1 / num-devices "
                 f"({1.0 / c.num_devices:.3g}), or releasing one whole device would fit inside delta")
    _choice(p, "device-update", c.device_update, tuple(u.value for u in DeviceUpdate))
    _choice(p, "device-weight", c.device_weight, tuple(w.value for w in DeviceWeight))
    _range(p, "local-lr", c.local_lr, 0.0, 100.0, lo_open=True)
    _choice(p, "loss-centre", c.loss_centre, tuple(m.value for m in LossCentre))
    if c.loss_centre != LossCentre.NONE and c.linear_start != LinearStart.SUFFSTATS:
        p.append(f"loss-centre = {c.loss_centre!r} takes the mean from the released statistics: it needs "
                 "linear-start = 'suffstats'")
    _range(p, "local-batch", c.local_batch, 0, 10_000_000)
    _range(p, "clip-target-quantile", c.clip_target_quantile, 0.0, 1.0, hi_open=True)
    _range(p, "clip-lr", c.clip_lr, 0.0, 10.0, lo_open=True)
    _range(p, "clip-count-noise", c.clip_count_noise, 0.0, 1e3, lo_open=True)
    if c.device_update == DeviceUpdate.FEDAVG and c.privacy_unit != PrivacyUnit.DEVICE:
        p.append("device-update = 'fedavg' is the device-level update: it needs privacy-unit = 'device'")
    if c.device_weight != DeviceWeight.EQUAL and c.device_update != DeviceUpdate.FEDAVG:
        p.append(f"device-weight = {c.device_weight!r} weighs DP-FedAvg deltas: it needs device-update = 'fedavg'")
    if c.clip_target_quantile > 0 and c.device_update != DeviceUpdate.FEDAVG:
        p.append("clip-target-quantile > 0 adapts the clip of DP-FedAvg deltas: it needs device-update = 'fedavg'")
    if c.privacy_unit == PrivacyUnit.DEVICE and c.budget_split > 0 and c.sample_rate > 0:
        p.append("privacy-unit = 'device' uses no sampling (q = 1 per participation): leave sample-rate at 0")
    return p


def from_run_config(run_config: Mapping[str, Any], *, base_dir: str | Path | None = None) -> FederationConfig:
    """Validate Flower's run config and build the :class:`FederationConfig`.

    Missing keys take the dataclass defaults. ``base_dir`` (if given) is where a
    relative shard folder in ``data-source`` is looked up, to check it exists.
    Raises :class:`ConfigError` listing every problem at once.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, raw in run_config.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            extra[str(key)] = raw
            continue
        value, err = _coerce(str(key), raw, _FIELDS[name].default)
        if err:
            problems.append(err)
        else:
            values[name] = value
    for key in sorted(extra):
        problems.append(f"{key}: unknown key (allowed: {', '.join(sorted(k.replace('_', '-') for k in _FIELDS))})")
    if problems:
        raise ConfigError(problems)
    cfg = FederationConfig(**values)
    problems = _check_ranges(cfg)
    if cfg.data_source not in FEDERATION_NAMES and base_dir is not None and not problems:
        folder = Path(cfg.data_source)
        folder = folder if folder.is_absolute() else Path(base_dir) / folder
        if not folder.is_dir():
            problems.append(
                f"data-source = {cfg.data_source!r}: not {', '.join(map(repr, FEDERATION_NAMES))} or an "
                f"existing folder of shards"
            )
    if problems:
        raise ConfigError(problems)
    return cfg


# ----------------------------------------------------------------------------- device policy
@dataclass(frozen=True)
class DevicePolicy:
    """What a device allows, owned by the device: its node config, then its ledger header.

    The server's run-config can only *ask* (a budget, a noise multiplier, a number of
    guaranteed arrivals); a request beyond this policy is declined with the reason. The
    policy is written into the device's ledger header at first open and restored from it on
    every reopen, so neither a server nor a later node config can loosen it.
    """

    epsilon_budget: float = 8.0
    delta: float = 1e-5
    #: smallest DP-SGD noise multiplier (sigma of the released sum / clip) it accepts
    min_noise_multiplier: float = 0.5
    #: smallest noise multiplier of the sufficient-statistics Gaussian sum it accepts
    min_suffstats_noise_multiplier: float = 0.5
    #: g: distributed noise shares are sized sigma / sqrt(g); the server must promise >= g arrivals
    guaranteed_arrivals: int = 50
    #: largest number of pairs the device puts in one payload (bounds SecAgg+'s range)
    max_pairs_per_payload: int = 1000
    #: most rounds the device joins over its ledger's life
    max_participations: int = 100_000
    #: whether the device answers rounds that add no DP noise at all (research baselines only)
    allow_non_dp: bool = False
    #: whether the device answers rounds whose noise comes from the run's public seed
    #: (``reproducible-noise = true``: the server can recompute and subtract it; tests and studies only)
    allow_reproducible_noise: bool = False
    #: the unit its epsilon-budget is stated in: "device" declines every example-level round
    privacy_unit: str = "example"
    #: fewest rounds between two of its participations (1: consecutive rounds allowed)
    min_separation: int = 1

    def to_node_config(self) -> dict[str, bool | int | float | str]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DevicePolicy:
        return policy_from_node_config({k.replace("_", "-"): v for k, v in data.items()})


_POLICY_FIELDS = {f.name: f for f in dataclasses.fields(DevicePolicy)}
#: The node-config keys of a device policy (kebab-case), e.g. ``--node-config "epsilon-budget=4"``.
POLICY_KEYS = frozenset(name.replace("_", "-") for name in _POLICY_FIELDS)


def _policy_problems(p: DevicePolicy) -> list[str]:
    out: list[str] = []
    _range(out, "epsilon-budget", p.epsilon_budget, 0.0, 1000.0, lo_open=True)
    _range(out, "delta", p.delta, 0.0, 0.1, lo_open=True)
    _range(out, "min-noise-multiplier", p.min_noise_multiplier, 0.0, 1000.0)
    _range(out, "min-suffstats-noise-multiplier", p.min_suffstats_noise_multiplier, 0.0, 1000.0)
    _range(out, "guaranteed-arrivals", p.guaranteed_arrivals, 1, 10_000_000)
    _range(out, "max-pairs-per-payload", p.max_pairs_per_payload, 1, 10_000_000)
    _range(out, "max-participations", p.max_participations, 0, 10_000_000)
    _choice(out, "privacy-unit", p.privacy_unit, tuple(u.value for u in PrivacyUnit))
    _range(out, "min-separation", p.min_separation, 1, 10_000_000)
    return out


def policy_from_node_config(node_config: Mapping[str, Any]) -> DevicePolicy:
    """The device policy from a node config: policy keys only, others (shard-path, ...) ignored.

    Missing keys take the defaults above; a bad value is a :class:`ConfigError` naming it.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, raw in node_config.items():
        name = str(key).replace("-", "_")
        if name not in _POLICY_FIELDS:
            continue
        value, err = _coerce(f"node config {key}", raw, _POLICY_FIELDS[name].default)
        if err:
            problems.append(err)
        else:
            values[name] = value
    if problems:
        raise ConfigError(problems)
    policy = DevicePolicy(**values)
    problems = [f"device policy {p}" for p in _policy_problems(policy)]
    if problems:
        raise ConfigError(problems)
    return policy
