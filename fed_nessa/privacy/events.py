"""Immutable DP events: the unit of record that every accountant replays.

Modelled on ``dp_accounting.DpEvent`` and Opacus' accountant history: a device
never stores "epsilon so far" as the truth, it stores *what mechanism ran with
which parameters*, so that anyone (the device, the server, an auditor who does
not trust either) can recompute the guarantee with an accountant of their
choice. The fields are exactly what the guarantee depends on, plus the round and
mode so that the audit can cross-check them against the server's ledger.

An event may cover a *span* of rounds (``round`` .. ``last_round``): a fleet of
10,000 devices x 1,000 rounds would otherwise write 10 million fsynced, signed
lines. ``steps`` then counts every step of the span (e.g. one per round for a
distributed DP-SGD round), so accounting needs no change: a span of K rounds of
one Poisson-subsampled Gaussian step each *is* ``DPEvent(steps=K)``.

``unit`` says whose data the sensitivity ``clip_norm`` bounds. ``example`` (the default):
one utterance pair. ``device``: everything one device holds, because the device clipped
its whole round contribution; such an event is always a distributed Gaussian sum with
q = 1 (validated), so a device-level guarantee never rests on amplification by sampling.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from fed_nessa.config import PrivacyUnit
from fed_nessa.errors import FedNessaError

#: Poisson-subsampled Gaussian mechanism repeated ``steps`` times (DP-SGD).
DP_SGD = "dp-sgd"
#: One Gaussian mechanism on a sum (e.g. sufficient statistics): q=1, steps=1.
GAUSSIAN_SUM = "gaussian-sum"
#: The distributed integer mechanism on a full sum (q = 1, one per round): integer vectors of L2 norm <= l2_bound
#: (after conditional rounding) plus Skellam noise of variance mu, summed in SecAgg+'s field (docs/privacy.md).
SKELLAM = "skellam"
MECHANISMS: tuple[str, ...] = (DP_SGD, GAUSSIAN_SUM, SKELLAM)
#: The mechanisms accounted as one release per round of a full sum (q = 1, steps = rounds covered).
FULL_SUMS: tuple[str, ...] = (GAUSSIAN_SUM, SKELLAM)
#: What a skellam event records of its mechanism (``DPEvent.skellam``), all in the integer domain but
#: ``scale`` (integer units per input unit) and ``beta`` (the conditional rounding's parameter):
#: bits (SecAgg+'s field is Z_2^bits), the L2 and L1 bounds of one rounded contribution, the central
#: Skellam variance mu per coordinate, the rotation's (padded) dimension.
SKELLAM_FIELDS: tuple[str, ...] = ("scale", "bits", "l2_bound", "l1_bound", "mu", "dim", "beta")
#: The one optional skellam field: a device-level DP-FedAvg round with the adaptive clip's bit in its sum records
#: the bit count's noise multiplier ``z_b`` (noise std over the bit's sensitivity 1/2). The recorded vector is then
#: the update joined by its scaled bit, of L2 bound :func:`fed_nessa.privacy.skellam.joint_l2_clip` of
#: ``clip_norm`` (the run's starting clip; ``scale`` is integer units per unit of it, each round's clip rescales
#: the input so the integer mechanism is the same every round), and the bounds are checked against that.
SKELLAM_BIT_FIELD = "bit_noise_multiplier"

#: Each device adds the full noise: the guarantee needs no trust in anyone.
LOCAL = "local"
#: Devices add shares; the secure sum carries the full noise (trust SecAgg+).
DISTRIBUTED = "distributed"
MODES: tuple[str, ...] = (LOCAL, DISTRIBUTED)

#: The privacy unit of an event's sensitivity: one utterance pair (add/remove one example) ...
EXAMPLE = PrivacyUnit.EXAMPLE.value
#: ... or everything one device holds (add/remove one device, its whole round contribution clipped).
DEVICE = PrivacyUnit.DEVICE.value
UNITS: tuple[str, ...] = (EXAMPLE, DEVICE)

#: Where the mechanism's noise came from: the OS CSPRNG (nobody can recompute it) ...
OS_CSPRNG = "os-csprng"
#: ... or a public seed (``reproducible-noise``): anyone can subtract it, NO guarantee holds.
PUBLIC_SEED = "public-seed"
NOISE_SOURCES: tuple[str, ...] = (OS_CSPRNG, PUBLIC_SEED)

#: The event fields fixed by a round's public config: the server signs them per round
#: (``noise_plan.public_parameters``) and the audit holds every device event to them.
PUBLIC_FIELDS: tuple[str, ...] = ("mechanism", "unit", "mode", "noise_multiplier", "clip_norm", "sample_rate")


class EventError(FedNessaError, ValueError):
    """A DP event with a missing, mistyped or out-of-range field."""


@dataclass(frozen=True)
class DPEvent:
    """One privacy-relevant mechanism run on one device in one round, or a span of rounds.

    ``noise_multiplier`` is the *effective* noise std divided by the L2
    sensitivity that the guarantee uses (in distributed mode: only the noise
    shares guaranteed to arrive), so accountants need nothing else.

    ``last_round`` (None: the single round ``round``) makes the event a span
    reserved at once, ``round`` being its first round; ``steps`` counts all the
    span's steps. A span is charged in full when reserved, even if the device
    later drops out of some of its rounds (conservative, like a dangling
    reservation). ``to_dict`` omits ``last_round`` when None, so a single-round
    event serialises exactly as it did before spans existed.
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
    last_round: int | None = None
    #: Whose data ``clip_norm`` bounds: one example (default) or one whole device (docs/privacy.md).
    unit: str = EXAMPLE
    #: Where the noise came from (:data:`NOISE_SOURCES`); "" in events written before it was recorded.
    noise_source: str = ""
    #: A :data:`SKELLAM` event's mechanism parameters (:data:`SKELLAM_FIELDS`); None for every Gaussian event.
    skellam: dict[str, float] | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def end_round(self) -> int:
        """The last round the event covers (``round`` for a single-round event)."""
        return self.round if self.last_round is None else self.last_round

    @property
    def n_rounds(self) -> int:
        """How many rounds the event covers (1 for a single-round event)."""
        return self.end_round - self.round + 1

    def covered_rounds(self) -> range:
        """Every round the event covers, first to last."""
        return range(self.round, self.end_round + 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain ints, floats and strings only).

        ``last_round`` is left out when None: old readers and old signed ledgers
        see exactly the pre-span layout for single-round events.
        """
        data = asdict(self)
        if data["last_round"] is None:
            del data["last_round"]
        if data["unit"] == EXAMPLE:  # example-level events serialise exactly as before units existed
            del data["unit"]
        if not data["noise_source"]:  # events without a recorded source serialise as before it existed
            del data["noise_source"]
        if data["skellam"] is None:  # Gaussian events serialise exactly as before the integer mechanism
            del data["skellam"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPEvent:
        """Rebuild and re-validate an event; unknown or missing keys are errors."""
        if not isinstance(data, dict):
            raise EventError(f"a DP event must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise EventError(f"DP event has unknown field(s) {unknown}")
        required = {f.name for f in fields(cls) if f.name not in _OPTIONAL}
        missing = sorted(required - set(data))
        if missing:
            raise EventError(f"DP event lacks field(s) {missing}")
        event = cls(**data)
        check_skellam_parameters(event)
        return event


#: Fields an event dict may leave out: ``note`` (free text), ``last_round`` (absent in every
#: ledger written before spans: a single round), ``unit`` (absent: one example) and ``noise_source``
#: (absent in ledgers written before it was recorded: the audit then reads the legacy note marker).
_OPTIONAL = frozenset({"note", "last_round", "unit", "noise_source", "skellam"})
#: Relative tolerance of the recorded mu against ``(noise_multiplier x scale x clip_norm)^2`` (float rounding only).
MU_TOLERANCE = 1e-9


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
    if ev.last_round is not None and (not _is_int(ev.last_round) or ev.last_round < ev.round):
        raise EventError(f"last_round must be None or an int >= round ({ev.round}), got {ev.last_round!r}")
    if ev.unit not in UNITS:
        raise EventError(f"unit must be one of {UNITS}, got {ev.unit!r}")
    if ev.noise_source and ev.noise_source not in NOISE_SOURCES:
        raise EventError(f"noise_source must be one of {NOISE_SOURCES} (or absent), got {ev.noise_source!r}")
    _validate_skellam(ev)
    if ev.unit == DEVICE and (ev.mechanism not in FULL_SUMS or ev.mode != DISTRIBUTED):
        # Device-level DP here is one Gaussian sum per participation, no sampling: the guarantee
        # must never lean on amplification from the server's choice of devices.
        raise EventError("a device-level event is a distributed full sum (q = 1, no amplification by "
                         f"sampling), got mechanism {ev.mechanism!r} in mode {ev.mode!r}")
    if one_per_round(ev) and (ev.sample_rate != 1.0 or ev.steps != ev.n_rounds):
        # One sum per round: a span of K rounds is K Gaussian mechanisms, so steps == K.
        raise EventError(
            f"a {ev.mechanism} event is one mechanism on a full sum per round: "
            f"sample_rate must be 1 and steps {ev.n_rounds} (its rounds), got {ev.sample_rate!r} "
            f"and {ev.steps!r}")


def one_per_round(ev: DPEvent) -> bool:
    """Whether ``ev`` is one release of a full sum (q = 1) in every round of its span.

    Every :data:`FULL_SUMS` event but the example level's integer sums: a device's DP-SGD contribution
    there is over a secret Poisson sample (q < 1), and its span, like a DP-SGD one, counts the rounds the
    device joins (it may skip other cohorts' rounds).
    """
    return ev.mechanism in FULL_SUMS and not (ev.mechanism == SKELLAM and ev.unit == EXAMPLE)


def _validate_skellam(ev: DPEvent) -> None:
    """A skellam event carries exactly its parameters, in range; every other event carries none."""
    if ev.mechanism != SKELLAM:
        if ev.skellam is not None:
            raise EventError(f"only a {SKELLAM} event carries skellam parameters, got them on {ev.mechanism!r}")
        return
    if ev.mode != DISTRIBUTED:
        raise EventError(f"a {SKELLAM} event is distributed (shares under SecAgg+), got mode {ev.mode!r}")
    params = ev.skellam
    if not isinstance(params, dict) or set(params) - {SKELLAM_BIT_FIELD} != set(SKELLAM_FIELDS):
        raise EventError(f"a {SKELLAM} event records exactly {SKELLAM_FIELDS} (and optionally "
                         f"{SKELLAM_BIT_FIELD!r}), got {sorted(params) if isinstance(params, dict) else params!r}")
    if SKELLAM_BIT_FIELD in params:
        z_bit = params[SKELLAM_BIT_FIELD]
        if ev.unit != DEVICE or not _is_real(z_bit) or not z_bit > ev.noise_multiplier:
            raise EventError(f"a {SKELLAM} event's {SKELLAM_BIT_FIELD} (the adaptive clip's bit, device level) must "
                             f"be a finite number above the event's noise multiplier {ev.noise_multiplier!r}, got "
                             f"{z_bit!r} at unit {ev.unit!r}")
    bad = [k for k in SKELLAM_FIELDS if not _is_real(params[k]) or (k != "beta" and params[k] <= 0)]
    if bad:
        raise EventError(f"skellam parameter(s) {bad} must be finite numbers > 0 (beta >= 0), got "
                         f"{ {k: params[k] for k in bad} }")
    dim = params["dim"]
    if not (_is_int(params["bits"]) and isinstance(dim, int)) or dim & (dim - 1):
        raise EventError(f"skellam bits and dim must be ints, dim a power of two, got {params['bits']!r}, "
                         f"{params['dim']!r}")
    if ev.unit == EXAMPLE and params["beta"] != 0:
        # an example-level device rounds the SUM of its examples once: only the coupled bound (beta 0) holds
        raise EventError(f"an example-level {SKELLAM} event is accounted with the coupled bound: beta must be 0, "
                         f"got {params['beta']!r}")


def check_skellam_parameters(ev: DPEvent) -> None:
    """Refuse a skellam event whose recorded bounds are not the ones its recorded mechanism implies.

    The accountant charges ``l2_bound``, ``l1_bound`` and ``mu``; they must be the rounded bound of
    ``scale x clip_norm`` (conditional rounding at ``beta`` in ``dim`` coordinates), its integer L1
    bound, and the variance of noise multiplier ``noise_multiplier`` at that scale, so that a record
    whose scale, clip, bound or noise was edited is refused rather than accounted. Checked when an
    event is read from a record (:meth:`DPEvent.from_dict`): the accountants' unit conversion
    (:func:`fed_nessa.privacy.accounting.for_unit`) derives events that are no record.
    """
    if ev.mechanism != SKELLAM or ev.skellam is None:
        return
    from fed_nessa.privacy.skellam import integer_l1_bound, joint_l2_clip, rounded_l2_norm_bound

    p = ev.skellam
    clip, what = ev.clip_norm, "clip_norm"
    if SKELLAM_BIT_FIELD in p:  # the update and its adaptive-clip bit, one vector (:func:`joint_l2_clip`)
        clip = joint_l2_clip(ev.clip_norm, ev.noise_multiplier, float(p[SKELLAM_BIT_FIELD]))
        what = f"the joint bound of clip_norm and {SKELLAM_BIT_FIELD} {p[SKELLAM_BIT_FIELD]!r}"
    l2 = rounded_l2_norm_bound(float(p["scale"]) * clip, float(p["beta"]), int(p["dim"]))
    mu = (ev.noise_multiplier * float(p["scale"]) * clip) ** 2
    problems = []
    if p["l2_bound"] != l2:
        problems.append(f"l2_bound {p['l2_bound']!r} is not the rounded bound {l2!r} of scale x {what}")
    if p["l1_bound"] != integer_l1_bound(l2, int(p["dim"])):
        problems.append(f"l1_bound {p['l1_bound']!r} is not {integer_l1_bound(l2, int(p['dim']))!r}")
    if abs(p["mu"] - mu) > MU_TOLERANCE * mu:
        problems.append(f"mu {p['mu']!r} is not (noise_multiplier x scale x {what})^2 = {mu!r}")
    if problems:
        raise EventError(f"skellam event of round {ev.round}: " + "; ".join(problems))
