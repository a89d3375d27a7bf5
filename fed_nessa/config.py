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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# SecAgg+ sums integers below this modulus (Flower's default; it must stay < 2**32).
SECAGG_MODULUS_RANGE = 2**32
DP_MODES = ("local", "distributed", "none")
LINEAR_STARTS = ("suffstats", "none")
BUILTIN_DATA_SOURCES = ("synthetic", "real-dev")


class ConfigError(ValueError):
    """One or more run-config values are invalid (message lists every fault)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid federation config: " + "; ".join(self.problems))


@dataclass(frozen=True)
class FederationConfig:
    """Every knob of a federated run, validated (see :func:`from_run_config`)."""

    num_server_rounds: int = 1
    clients_per_round: int = 100
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.001
    server_lr: float = 0.05
    dp_mode: str = "distributed"
    noise_multiplier: float = 1.5
    clip_norm: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float = 8.0
    linear_start: str = "suffstats"
    suffstats_noise_multiplier: float = 0.64
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
    if isinstance(value, str):
        return value, None
    return None, f"{key} = {value!r}: expected a string"


def _range(problems: list[str], key: str, value: float, lo: float, hi: float, *,
           lo_open: bool = False) -> None:
    """Append a problem if ``value`` is outside ``[lo, hi]`` (``(lo, hi]`` when ``lo_open``)."""
    bad = value <= lo if lo_open else value < lo
    if bad or value > hi:
        bracket = "(" if lo_open else "["
        problems.append(f"{key} = {value!r}: allowed range {bracket}{lo:g}, {hi:g}]")


def _choice(problems: list[str], key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{key} = {value!r}: allowed values {', '.join(allowed)}")


def _check_ranges(c: FederationConfig) -> list[str]:
    """Range and consistency checks; empty when the config is usable."""
    p: list[str] = []
    _range(p, "num-server-rounds", c.num_server_rounds, 1, 100_000)
    _range(p, "clients-per-round", c.clients_per_round, 3, 1_000_000)
    _range(p, "local-epochs", c.local_epochs, 1, 1000)
    _range(p, "batch-size", c.batch_size, 1, 1_000_000)
    _range(p, "lr", c.lr, 0.0, 100.0, lo_open=True)
    _range(p, "server-lr", c.server_lr, 0.0, 100.0, lo_open=True)
    _choice(p, "dp-mode", c.dp_mode, DP_MODES)
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
    if c.secagg_num_shares > c.clients_per_round:
        p.append(
            f"secagg-num-shares = {c.secagg_num_shares}: allowed range [3, clients-per-round = "
            f"{c.clients_per_round}]"
        )
    _range(p, "secagg-reconstruction-threshold", c.secagg_reconstruction_threshold, 2, 10_000)
    if c.secagg_reconstruction_threshold >= c.secagg_num_shares:
        p.append(
            f"secagg-reconstruction-threshold = {c.secagg_reconstruction_threshold}: allowed range "
            f"[2, secagg-num-shares - 1 = {c.secagg_num_shares - 1}]"
        )
    _range(p, "min-arrivals", c.min_arrivals, 2, 1_000_000)
    _range(p, "min-arrival-fraction", c.min_arrival_fraction, 0.01, 1.0)
    if c.min_arrivals > c.clients_per_round:
        p.append(
            f"min-arrivals = {c.min_arrivals}: allowed range [2, clients-per-round = {c.clients_per_round}]"
        )
    _range(p, "secagg-clipping-range", c.secagg_clipping_range, 0.0, 1e6, lo_open=True)
    _range(p, "secagg-quantization-range", c.secagg_quantization_range, 2**8, 2**30)
    # Every device's quantized coordinate lies in [0, q]; the sum of a full cohort must stay
    # below the modulus or it wraps around silently.
    if c.clients_per_round * c.secagg_quantization_range >= SECAGG_MODULUS_RANGE:
        p.append(
            f"clients-per-round * secagg-quantization-range = "
            f"{c.clients_per_round * c.secagg_quantization_range}: must be < 2**32 (the SecAgg+ "
            f"modulus), lower one of them"
        )
    _range(p, "round-timeout", c.round_timeout, 0.0, 86_400.0)
    if c.data_source not in BUILTIN_DATA_SOURCES and not c.data_source.strip():
        p.append("data-source = '': allowed values synthetic, real-dev, or a folder of shards")
    _range(p, "num-devices", c.num_devices, 3, 10_000_000)
    if c.data_source == "synthetic" and c.clients_per_round > c.num_devices:
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
    if cfg.data_source not in BUILTIN_DATA_SOURCES and base_dir is not None and not problems:
        folder = Path(cfg.data_source)
        folder = folder if folder.is_absolute() else Path(base_dir) / folder
        if not folder.is_dir():
            problems.append(
                f"data-source = {cfg.data_source!r}: not 'synthetic', 'real-dev' or an existing folder of shards"
            )
    if problems:
        raise ConfigError(problems)
    return cfg
