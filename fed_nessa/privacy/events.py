"""Immutable DP events: the unit of record that every accountant replays.

Modelled on ``dp_accounting.DpEvent`` and Opacus' accountant history: a device
never stores "epsilon so far" as the truth, it stores *what mechanism ran with
which parameters*, so that anyone (the device, the server, an auditor who does
not trust either) can recompute the guarantee with an accountant of their
choice. The fields are exactly what the guarantee depends on, plus the round and
mode so that the audit can cross-check them against the server's ledger.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from fed_nessa.errors import FedNessaError

#: Poisson-subsampled Gaussian mechanism repeated ``steps`` times (DP-SGD).
DP_SGD = "dp-sgd"
#: One Gaussian mechanism on a sum (e.g. sufficient statistics): q=1, steps=1.
GAUSSIAN_SUM = "gaussian-sum"
MECHANISMS: tuple[str, ...] = (DP_SGD, GAUSSIAN_SUM)

#: Each device adds the full noise: the guarantee needs no trust in anyone.
LOCAL = "local"
#: Devices add shares; the secure sum carries the full noise (trust SecAgg+).
DISTRIBUTED = "distributed"
MODES: tuple[str, ...] = (LOCAL, DISTRIBUTED)


class EventError(FedNessaError, ValueError):
    """A DP event with a missing, mistyped or out-of-range field."""


@dataclass(frozen=True)
class DPEvent:
    """One privacy-relevant mechanism run on one device in one round.

    ``noise_multiplier`` is the *effective* noise std divided by the L2
    sensitivity that the guarantee uses (in distributed mode: only the noise
    shares guaranteed to arrive), so accountants need nothing else.
    """

    round: int
    mechanism: str
    steps: int
    sample_rate: float
    noise_multiplier: float
    clip_norm: float
    delta: float
    mode: str
    note: str = ""

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain ints, floats and strings only)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPEvent:
        """Rebuild and re-validate an event; unknown or missing keys are errors."""
        if not isinstance(data, dict):
            raise EventError(f"a DP event must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise EventError(f"DP event has unknown field(s) {unknown}")
        required = {f.name for f in fields(cls) if f.name != "note"}
        missing = sorted(required - set(data))
        if missing:
            raise EventError(f"DP event lacks field(s) {missing}")
        return cls(**data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def _validate(ev: DPEvent) -> None:
    """Reject values an accountant would silently mis-handle."""
    if not _is_int(ev.round) or ev.round < 0:
        raise EventError(f"round must be an int >= 0, got {ev.round!r}")
    if ev.mechanism not in MECHANISMS:
        raise EventError(f"mechanism must be one of {MECHANISMS}, got {ev.mechanism!r}")
    if not _is_int(ev.steps) or ev.steps < 0:
        raise EventError(f"steps must be an int >= 0, got {ev.steps!r}")
    if not _is_real(ev.sample_rate) or not 0.0 < ev.sample_rate <= 1.0:
        raise EventError(f"sample_rate must be in (0, 1], got {ev.sample_rate!r}")
    if not _is_real(ev.noise_multiplier) or ev.noise_multiplier <= 0.0:
        raise EventError(f"noise_multiplier must be a finite number > 0, got {ev.noise_multiplier!r}")
    if not _is_real(ev.clip_norm) or ev.clip_norm <= 0.0:
        raise EventError(f"clip_norm must be a finite number > 0, got {ev.clip_norm!r}")
    if not _is_real(ev.delta) or not 0.0 < ev.delta < 1.0:
        raise EventError(f"delta must be in (0, 1), got {ev.delta!r}")
    if ev.mode not in MODES:
        raise EventError(f"mode must be one of {MODES}, got {ev.mode!r}")
    if not isinstance(ev.note, str):
        raise EventError(f"note must be a string, got {type(ev.note).__name__}")
    if ev.mechanism == GAUSSIAN_SUM and (ev.sample_rate != 1.0 or ev.steps != 1):
        raise EventError(
            "a gaussian-sum event is one Gaussian mechanism on a full sum: "
            f"sample_rate must be 1 and steps 1, got {ev.sample_rate!r} and {ev.steps!r}")
