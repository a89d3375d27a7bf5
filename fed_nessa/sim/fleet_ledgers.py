"""The fleet's ledgers: every device's signed ledger and policy, its DP-SGD spans, and what each round sent.

At 10^4-10^6 devices a device reserves its whole DP-SGD phase as one *span* (one signed, fsynced
line: ``steps`` = its scheduled rounds, counted in full even if it drops out, which is conservative)
before the phase's first round and completes it at the end with the chain of the models it was
sent; the federation ledger records a full-participation phase as one span entry per run of each
distinct schedule (:meth:`DeviceBook.close_spans`). ``fed-nessa audit`` re-derives every epsilon
from those lines. An engine over the same fleet (the fleet engine, a sharded one) uses this book.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fed_nessa.config import DevicePolicy, FederationConfig, Phase
from fed_nessa.federated.cohort import sample_positions
from fed_nessa.federated.device import ModelIds, RoundRequest, planned_event, separation_refusal
from fed_nessa.federated.engine import Pins
from fed_nessa.federated.mechanism import public_parameters
from fed_nessa.federated.noise_plan import NoisePlan
from fed_nessa.federated.release import promised_arrivals
from fed_nessa.privacy.accounting import UnitNotCoveredError
from fed_nessa.privacy.events import DPEvent, one_per_round
from fed_nessa.privacy.ledger import (
    CHAIN_SCHEME,
    LEDGER_HEADS,
    PUBLIC_PARAMETERS,
    DeviceLedger,
    FederationLedger,
    config_sha256,
    ledger_batch,
    model_sha256,
    open_device_ledgers,
    received_chain,
)
from fed_nessa.privacy.store import LedgerStore

if TYPE_CHECKING:
    from fed_nessa.sim.fleet import FleetState

#: A span (or cohort round) entry's adaptive clips: round -> the public C_t its config stated.
ADAPTIVE_CLIPS = "clip_norms"


@dataclass
class DeviceBook:
    """Each device's policy decision and ledger handle for the run, its spans and the run's evidence."""

    ledgers: list[DeviceLedger]
    policies: list[DevicePolicy]
    #: device index -> reserve seqs of its DP-SGD span(s): one per run of consecutive joined rounds
    span_seq: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)  # (seq, first, last)
    span_rounds: dict[int, list[int]] = field(default_factory=dict)  # device index -> rounds it joins
    refused: dict[int, str] = field(default_factory=dict)  # device index -> why it declines the DP-SGD phase
    ids: list[str] = field(default_factory=list)
    store: LedgerStore | None = None  # the ledger store (ledger-layout = sqlite), else None
    # Evidence (docs/privacy.md, "one model per round"): the server key devices pin and the
    # (model, config) SHA-256 sent per round.
    server_fp: str | None = None
    sent: dict[int, tuple[str, str]] = field(default_factory=dict)
    dropped: dict[int, list[int]] = field(default_factory=dict)  # DP-SGD round -> devices that dropped out

    @classmethod
    def open(cls, run_dir: Path, ids: list[str], policy: DevicePolicy, layout: str) -> DeviceBook:
        """Every device's ledger (its keys outside the run folder), in the run's ``ledger-layout``."""
        ledgers, store = open_device_ledgers(run_dir, ids, policy, layout)
        return cls(ledgers, [ledger.policy or policy for ledger in ledgers], ids=ids, store=store)

    def heads(self, reserved: dict[int, Any]) -> dict[str, list[int | str]]:
        """The ledger head ``[seq, sha256]`` of every device in ``reserved`` (the server signs them)."""
        return {self.ledgers[i].device_id: list(self.ledgers[i].head()) for i in reserved}

    def reserve_spans(self, cfg: FederationConfig, fleet: FleetState, dp_rounds: list[int],
                      model_ids: ModelIds, dims: tuple[int, int]) -> None:
        """Every device reserves the DP-SGD rounds it is scheduled for, as one span, within its budget
        (``dims``: the shards' d_x, d_y, which size the integer mechanism's payload)."""
        book = self
        schedule: dict[int, list[int]] = {i: [] for i in range(len(fleet.ids))}
        for r in dp_rounds:
            for i in sample_positions(len(fleet.ids), cfg, r, Phase.DPSGD).tolist():
                schedule[i].append(r)
        cap_cache: dict[tuple[Any, ...], int] = {}
        for i, rounds in schedule.items():
            if not rounds:
                continue
            ledger, policy = book.ledgers[i], book.policies[i]
            kept = _separated(rounds, ledger.rounds(), policy)  # the device's own min-separation
            # The device answers for the first round it keeps: the rounds its separation drops are
            # declined, not the whole span (docs/privacy.md).
            req = RoundRequest(Phase.DPSGD, (kept or rounds)[0],
                               promised_arrivals(cfg, cfg.cohort_size(len(fleet.ids))), len(fleet.ids),
                               **model_ids, dims=dims)
            why = fleet.refusal(req, i, int(fleet.n[i]), cfg, policy, ledger)
            rounds = kept
            if why or not rounds:
                book.refused[i] = why or separation_refusal(req.round, ledger.rounds(), policy) or "declined"
                continue
            one = planned_event(req, int(fleet.n[i]), cfg, policy, dims)
            if one is None:  # no DP: nothing to reserve
                book.span_rounds[i] = rounds
                continue
            key = (one.sample_rate, one.noise_multiplier, one.unit, len(rounds),
                   tuple(sorted((e.sample_rate, e.noise_multiplier, e.steps, e.mechanism, e.unit)
                                for e in ledger.events())))
            if key not in cap_cache:
                cap_cache[key] = self.affordable(cfg, ledger, one, len(rounds))
            k = min(cap_cache[key], policy.max_participations - ledger.participations(), len(rounds))
            if k <= 0:
                book.refused[i] = "declined: the DP-SGD phase would take this device over its budget"
                continue
            joined = rounds[:k]
            # A Poisson DP-SGD span may skip rounds (cohorts); a device-level sum (Gaussian or integer) is
            # one mechanism per round, so its spans are runs of consecutive rounds.
            per_round = one_per_round(one)
            runs = _runs(tuple(joined)) if per_round else [(joined[0], joined[-1])]
            seqs = []
            for first, last in runs:
                steps = last - first + 1 if per_round else k
                span = span_event(one, first, last, steps)
                seqs.append((ledger.reserve(span, {"server_key_fingerprint": self.server_fp}), first, last))
            book.span_seq[i] = seqs
            book.span_rounds[i] = joined

    def affordable(self, cfg: FederationConfig, ledger: DeviceLedger, one: DPEvent, most: int) -> int:
        """The most rounds (<= most) a device with this history can join within its budget."""
        def fits(k: int) -> bool:
            span = DPEvent.from_dict({**one.to_dict(), "steps": k, "last_round": one.round + k - 1})
            return ledger.check_budget(span, cfg.epsilon_budget, cfg.delta).allowed

        if fits(most):
            return most
        lo, hi = 0, most
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    def send(self, r: int, request: dict[str, Any], model: np.ndarray) -> dict[str, Any]:
        """Hash the model and round config of round ``r`` (what every device of the round receives)."""
        self.sent[r] = (model_sha256(model), config_sha256(request))
        return {"round": r, "model_sha256": self.sent[r][0], "config_sha256": self.sent[r][1],
                "server_key_fingerprint": self.server_fp}

    def sent_extra(self, rounds: list[int], pins: Pins, span: bool = False) -> dict[str, Any]:
        """Federation-ledger evidence: per-round hashes (one round) or their chain (a span), plus new pins."""
        if len(rounds) == 1 and not span:
            model, config = self.sent[rounds[0]]
            return {"model_sha256": model, "config_sha256": config, "device_key_fingerprints": pins.flush()}
        return {"models": {str(r): list(self.sent[r]) for r in rounds}, "model_chain_scheme": CHAIN_SCHEME,
                "model_chain": received_chain((r, *self.sent[r]) for r in rounds),
                "device_key_fingerprints": pins.flush()}

    def close_spans(self, cfg: FederationConfig, plan: NoisePlan, dp_rounds: list[int], fed_ledger: FederationLedger,
                    pins: Pins, engine: str, clips: Mapping[int, float] | None = None) -> None:
        """Every span completed (with the chain of what its rounds sent) and the DP-SGD phase recorded in the
        federation ledger: one span entry per run of a schedule (full participation), else one entry per round.
        ``clips``: the adaptive clip's public C_t by round (recorded with the rounds they belong to)."""
        book = self
        chains: dict[tuple[int, ...], dict[str, Any]] = {}  # devices on one schedule share one chain
        with ledger_batch(self.store):
            for i, spans in book.span_seq.items():
                ledger = book.ledgers[i]
                for seq, first, last in spans:
                    rounds = tuple(r for r in book.span_rounds[i] if first <= r <= last)
                    if rounds not in chains:
                        chains[rounds] = {"scheme": CHAIN_SCHEME, "rounds": [[a, b] for a, b in _runs(rounds)],
                                          "chain": received_chain((r, *self.sent[r]) for r in rounds)}
                    ledger.complete(seq, float(ledger.epsilon(book.policies[i].delta)), status="done",
                                    received=chains[rounds])
        ids = self.ids
        joined = sorted(book.span_rounds)
        heads = self.heads(book.span_seq)
        dropped = {str(r): [ids[i] for i in devs] for r, devs in self.dropped.items() if devs}
        extra = {"phase": str(Phase.DPSGD), "engine": engine, "dropped": dropped,
                 "decline_reasons": {reason: sum(1 for v in book.refused.values() if v == reason)
                                     for reason in set(book.refused.values())},
                 PUBLIC_PARAMETERS: public_parameters(Phase.DPSGD, cfg, plan)}
        if cfg.cohort_size(len(ids)) >= len(ids):
            # One span entry per run of consecutive rounds of each distinct schedule: it lists exactly
            # the rounds its devices joined (a budget cut short, or a min-separation leaving gaps),
            # drop-outs listed inside their span; each device's ledger head on its last entry.
            groups: dict[tuple[int, ...], list[int]] = {}
            for i in joined:
                groups.setdefault(tuple(book.span_rounds[i]), []).append(i)
            entries = sorted((run, members) for rounds, members in groups.items() for run in _runs(rounds))
            refused = [ids[i] for i in sorted(book.refused)]
            for n, ((first, last), members) in enumerate(entries):
                member_ids = {ids[i] for i in members}
                gone = {r: [d for d in devs if d in member_ids] for r, devs in dropped.items()
                        if first <= int(r) <= last}
                ending = {ids[i]: heads[ids[i]] for i in members
                          if book.span_rounds[i][-1] == last and ids[i] in heads}
                fed_ledger.record_span(first, last, sorted(member_ids), refused if n == 0 else [], [],
                                       {**extra, "dropped": {r: d for r, d in gone.items() if d},
                                        **self.sent_extra(list(range(first, last + 1)), pins, span=True),
                                        **adaptive_clips(clips, range(first, last + 1)), LEDGER_HEADS: ending})
            if not groups and refused:
                fed_ledger.record_span(dp_rounds[0], dp_rounds[-1], [], refused, [], extra)
            return
        for r in dp_rounds:  # cohorts: one entry per round (each lists only its cohort)
            in_round = [i for i in joined if r in book.span_rounds[i]]
            lost = set(self.dropped.get(r, []))
            ending = {ids[i]: heads[ids[i]] for i in in_round if book.span_rounds[i][-1] == r and ids[i] in heads}
            fed_ledger.record_round(r, [ids[i] for i in in_round if i not in lost], [], [ids[i] for i in sorted(lost)],
                                    {**extra, "dropped": {}, **self.sent_extra([r], pins), **adaptive_clips(clips, [r]),
                                     LEDGER_HEADS: ending})

    def epsilons(self, cfg: FederationConfig, unit: str | None = None) -> dict[str, float]:
        """Each device's epsilon from its ledger in ``unit`` (default: the run's privacy unit).

        Identical histories are computed once; a history with no bound in ``unit`` (an
        example-level event under a device-level claim) is infinite, so the claim fails loudly.
        """
        unit = unit or cfg.privacy_unit
        cache: dict[tuple[Any, ...], float] = {}
        out = {}
        for dev, ledger, policy in zip(self.ids, self.ledgers, self.policies, strict=True):
            events = ledger.events()
            key = tuple(sorted((e.mechanism, e.steps, e.sample_rate, e.noise_multiplier, e.clip_norm, e.unit)
                               for e in events)) + (policy.delta,)
            if key not in cache:
                try:
                    cache[key] = float(ledger.epsilon(policy.delta, unit=unit))
                except UnitNotCoveredError:
                    cache[key] = math.inf
            out[dev] = cache[key]
        return out


def span_event(one: DPEvent, first: int, last: int, steps: int) -> DPEvent:
    """One round's event reserved for ``steps`` scheduled rounds ``first .. last`` as one span line
    (every engine over a fleet writes it so: the device ledgers of two engines compare line for line)."""
    return DPEvent.from_dict({**one.to_dict(), "steps": steps, "round": first, "last_round": last,
                              "note": f"{one.note}; span of {steps} scheduled round(s) reserved at "
                                      "once (counted in full even if the device drops out)"})


def adaptive_clips(clips: Mapping[int, float] | None, rounds: Iterable[int]) -> dict[str, dict[str, float]]:
    """The federation-ledger field of the adaptive clip's C_t of ``rounds`` (nothing at a fixed clip)."""
    held = {str(r): clips[r] for r in rounds if clips and r in clips}
    return {ADAPTIVE_CLIPS: held} if held else {}


def _separated(rounds: list[int], joined: set[int], policy: DevicePolicy) -> list[int]:
    """The scheduled rounds a device keeps under its policy's min-separation (greedy, earliest first)."""
    gap = policy.min_separation
    if gap <= 1:
        return [r for r in rounds if r not in joined]
    prior = sorted(joined)
    kept: list[int] = []
    for r in rounds:
        at = bisect.bisect_left(prior, r)
        near = [abs(r - prior[j]) for j in (at - 1, at) if 0 <= j < len(prior)]
        if (kept and r - kept[-1] < gap) or (near and min(near) < gap):
            continue
        kept.append(r)
    return kept


def _runs(rounds: tuple[int, ...]) -> list[tuple[int, int]]:
    """Sorted rounds as maximal runs of consecutive rounds ``(first, last)``."""
    out: list[tuple[int, int]] = []
    for r in rounds:
        if out and r == out[-1][1] + 1:
            out[-1] = (out[-1][0], r)
        else:
            out.append((r, r))
    return out
