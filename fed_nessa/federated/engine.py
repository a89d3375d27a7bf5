"""What an engine implements: how a round's request reaches the devices and how their released sum comes back.

The round protocol itself (cohort size and promised g, the round config, key pinning, the release
rule, applying the sum, the federation-ledger record, the evaluation cadence, the round entry, the
end of the run) is written once, in :mod:`fed_nessa.federated.protocol_loop`. An engine is only the
transport and the device side's simulation: Flower + SecAgg+ (``server/federation.py``: messages and
the SecAgg+ workflow) and the fleet engine (:mod:`fed_nessa.sim.fleet`: vectorised sums, one ledger
span per device). A new engine is one module with one :class:`Engine` subclass
(docs/architecture.md, "where to add an engine").

A device is named inside an engine by an ``int`` handle (a Flower node id, a fleet position); the
loop names it in the ledger and the summary by the device id its answer carries.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fed_nessa.config import FederationConfig, Phase
from fed_nessa.data.population import Population
from fed_nessa.federated.noise_plan import NoisePlan
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.federated.skellam_mechanism import RoundCodec
from fed_nessa.privacy.ledger import FederationLedger

log = logging.getLogger(__name__)


@dataclass
class Answers:
    """The devices' answers to a round's request (nothing trained yet).

    ``accepted`` enter the secure sum; ``declined`` said no (policy, budget, model ids: ``reasons``);
    ``failed`` did not answer or answered with an error. The loop moves a device whose key
    fingerprint contradicts its pin from ``accepted``/``declined`` to ``failed``.
    """

    accepted: list[int] = field(default_factory=list)
    declined: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    #: handle -> device id (the pseudonym the ledgers use); a handle missing here is named str(handle).
    device_ids: Mapping[int, str] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    #: handle -> the device's ledger key fingerprint as it answered (pinned by the loop at first sight).
    fingerprints: dict[int, str] = field(default_factory=dict)
    #: handle -> the epsilon the device reports having spent (declined devices too).
    epsilons: dict[int, float] = field(default_factory=dict)
    #: What the round sent, for the federation-ledger record (hashes of the model and round config).
    evidence: dict[str, Any] = field(default_factory=dict)

    def device_id(self, handle: int) -> str:
        """The device id of ``handle`` (what the ledger and the summary name)."""
        return self.device_ids.get(handle, str(handle))


@dataclass
class Released:
    """What the engine's secure sum gives back.

    ``total`` is the released sum (None: nothing released: ``refused`` says why the unmasking
    never started, ``aborted`` why the protocol halted). ``arrived`` are the devices inside it.
    """

    total: np.ndarray | None
    arrived: list[int]
    n: int
    refused: str | None = None
    aborted: str | None = None
    #: Coordinates the codec clipped (SecAgg+'s saturation), counted over the run.
    saturated: int = 0
    #: Whether the sum holds gradients (``ServerModel.apply``; None: the phase's default).
    gradients: bool | None = None
    #: The g each arrived device sized its noise share for (the statistics solve needs it).
    noise_arrivals: list[int] = field(default_factory=list)
    #: device id -> [seq, sha256] of its ledger head, as the round leaves it (the server signs them).
    heads: dict[str, list[int | str]] = field(default_factory=dict)
    #: device id -> epsilon reported with the contribution (only for an applied sum).
    epsilons: dict[str, float] = field(default_factory=dict)
    #: What the round sent, for the federation-ledger record (when the engine hashes it at the sum).
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ending:
    """The engine's part of the end of a run (:func:`fed_nessa.federated.rounds.finish_run`'s arguments)."""

    summary_of: Callable[[dict[str, Any]], dict[str, Any]]
    references: Callable[[], dict[str, Any]] | None = None
    evaluation: Callable[[], dict[str, Any]] | None = None
    card_extra: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None


@dataclass
class RunState:
    """What the loop carries from round to round (a resumed run refills it from its checkpoint)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    saturated_total: int = 0


class Pins:
    """Each device's ledger key fingerprint, pinned at first sight (docs/privacy.md, "one model per round").

    A pin is written to the federation ledger once, in the next record the run writes
    (:meth:`flush`); a device that later answers with another key is refused for that round.
    """

    def __init__(self, pinned: Mapping[str, str]) -> None:
        self.known = dict(pinned)
        self.pending: dict[str, str] = {}

    def offer(self, device: str, fingerprint: str) -> bool:
        """Pin ``fingerprint`` for ``device`` if it has no pin yet; False when it contradicts the pin."""
        known = self.known.get(device)
        if known is None:
            self.known[device] = self.pending[device] = fingerprint
            return True
        return known == fingerprint

    def check(self, answers: Answers) -> dict[str, str]:
        """Pin the answers' new keys; move a device whose key changed to ``failed``. The mismatches."""
        mismatched = {}
        for handle, fp in answers.fingerprints.items():
            dev = answers.device_id(handle)
            if self.offer(dev, fp):
                continue
            mismatched[dev] = fp
            log.warning("device %s answers with key %s, pinned %s: refused this round", dev, fp[:16],
                        self.known[dev][:16])
            for group in (answers.accepted, answers.declined):
                if handle in group:
                    group.remove(handle)
            answers.failed.append(handle)
        return mismatched

    def flush(self) -> dict[str, str]:
        """The pins not yet recorded (the caller records them now)."""
        out, self.pending = self.pending, {}
        return out


class Engine(abc.ABC):
    """One engine bound to its fleet for one run: the transport of the round protocol.

    The abstract methods are what every engine must say (its cohort, the devices' answers, the
    secure sum, the per-device epsilon and the summary); the hooks default to nothing, so an engine
    overrides only what its ledgers or its resources need.
    """

    #: The engine's name (``ENGINES`` in ``fed_nessa.sim.runner``; stated in every ledger record).
    name: str
    cfg: FederationConfig
    model: ServerModel
    data: Population
    #: The evaluation cadence also evaluates the statistics round (the fleet engine's, kept as it was).
    evaluates_statistics_round: bool = False
    #: The loop's state, bound by :meth:`start` (the engine's summary reads the history).
    state: RunState

    @abc.abstractmethod
    def noise_plan(self) -> NoisePlan:
        """The run's noise plan, built ONCE from the fleet the engine knows at the start: every
        round's sigmas, round config (``fleet``) and public parameters come from it."""

    def start(self, ledger: FederationLedger, pins: Pins, state: RunState) -> int:
        """Open what the run needs (device ledgers, a checkpoint) before round one; the first round to run.

        ``pins`` takes the keys the engine already knows; ``state`` is the loop's history, which a
        resumed run refills.
        """
        self.state = state
        return 1

    def before_round(self, r: int, phase: Phase) -> None:
        """Called before round ``r`` samples its cohort (the fleet engine reserves its spans here)."""
        return None  # a hook: nothing unless the engine needs it

    @abc.abstractmethod
    def cohort(self, r: int, phase: Phase) -> list[int]:
        """The devices asked in round ``r`` (:func:`fed_nessa.federated.cohort.sample_positions`)."""

    @abc.abstractmethod
    def ask(self, r: int, phase: Phase, cohort: list[int], request: dict[str, Any]) -> Answers:
        """Send ``request`` (the round config) to the cohort; each device checks its policy and budget."""

    @abc.abstractmethod
    def secure_sum(self, r: int, phase: Phase, answers: Answers, request: dict[str, Any], codec: RoundCodec,
                   promised: int) -> Released:
        """The accepted devices train and the sum of what arrives is released, never fewer than ``promised``.

        The engine applies the release rule where its transport would unmask
        (:func:`fed_nessa.federated.release.may_unmask`); the loop checks it once more before applying.
        """

    def settle(self, r: int, phase: Phase, answers: Answers, released: Released | None) -> dict[str, list[int | str]]:
        """After the sum (or a round that did not start): the devices' ledger heads the record signs."""
        return released.heads if released is not None else {}

    def records_round(self, phase: Phase) -> bool:
        """Whether the loop records this round in the federation ledger (the fleet engine records its
        DP-SGD phase as spans in :meth:`close`)."""
        return True

    @abc.abstractmethod
    def device_epsilons(self, r: int, phase: Phase, answers: Answers, released: Released | None) -> dict[str, Any]:
        """The round entry's epsilon columns (``epsilon_max``, ``epsilon_median``) after round ``r``."""

    def round_done(self, r: int, rounds: int, entry: dict[str, Any]) -> None:
        """After round ``r`` entered the history: checkpoint, progress summary, engine columns of ``entry``."""
        return None  # a hook: nothing unless the engine needs it

    def close(self, ledger: FederationLedger, pins: Pins) -> None:
        """After the last round, before the ledger's end record (the fleet engine closes its spans)."""
        return None  # a hook: nothing unless the engine needs it

    @abc.abstractmethod
    def ending(self) -> Ending:
        """The engine's summary builder and references for :func:`fed_nessa.federated.rounds.finish_run`."""

    def release(self) -> None:
        """Free what the run held (a ledger store), whether the run finished or failed."""
        return None  # a hook: nothing unless the engine needs it
