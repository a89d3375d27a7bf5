"""The fleet engine: the protocol's round maths vectorised over 10^4-10^6 devices.

``fed-nessa simulate --engine fleet`` runs the same config keys, data sources, device
policies, ledgers and run folder as the Flower engine, and the same round maths:

* each device's policy check (:func:`fed_nessa.federated.device.policy_refusal`) and its
  signed ledger, with the budget checked before anything is spent;
* the statistics round: each device's sufficient statistics plus its noise share;
* DP-SGD rounds: each device's secret Poisson sample at its rate q, per-example clipping
  (ghost norms, :mod:`fed_nessa.sim.ghost`), its noise share sized by its own policy's g,
  empty samples still sending zeros plus noise;
* SecAgg+'s arithmetic: the codec's scaling and each device's own range check, Flower's
  quantization (``flwr.common.secure_aggregation.quantization``), the modular sum and the
  workflow's dequantization; drop-outs; the release rule (nothing is released below g);
* the server's optimiser, the per-round evaluation and the promotion gate.

What it leaves out are SecAgg+'s **masks**: they cancel exactly in the modular sum, so the
released aggregate does not depend on them (the run summary's ``engine`` block says so).

Two numerics (``fleet-numerics``):

``exact``
    per-device vectors, per-device noise streams, Flower's stochastic quantization of every
    device's payload and the modular sum. The equivalence test holds it to the Flower
    engine round by round (tests/test_sim_fleet.py).
``fast`` (distribution-equivalent)
    the sum of the clipped gradients is computed over all sampled pairs at once; the sum
    of the devices' independent Gaussian shares is drawn as ONE Gaussian with the summed
    variance; the devices' stochastic-rounding errors are drawn as one Gaussian with
    variance ``n s^2 / 6`` per coordinate (s the quantization step; 1/6 = E[p(1-p)] for a
    uniform fractional part p). A device's range check uses its sample count (its clipped
    sum has coordinates of at most ``k C``). SecAgg+'s arithmetic and these fleet-wide streams are
  :mod:`fed_nessa.sim.fleet_numerics`.

Ledgers at fleet scale: a device reserves its whole DP-SGD phase as one *span* (one
signed, fsynced line: ``steps`` = its scheduled rounds, counted in full even if it drops
out, which is conservative) and completes it at the end; the federation ledger records a
full-participation phase as one span entry. ``fed-nessa audit`` re-derives every epsilon
from those lines.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import math
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fed_nessa.config import (
    DevicePolicy,
    DeviceUpdate,
    DPMode,
    FederationConfig,
    FleetNumerics,
    Phase,
    ReplyStatus,
    RoundStatus,
)
from fed_nessa.data.datasets import device_filename
from fed_nessa.data.population import SCENARIO, FederationData
from fed_nessa.data.shards import SHARD_SUFFIX, Shard
from fed_nessa.errors import FedNessaError
from fed_nessa.evaluation import run_folder
from fed_nessa.evaluation.gate import SHIPPED, card_fields, gate_run
from fed_nessa.evaluation.protocol import evaluate_eval_set, summary_row
from fed_nessa.federated import suffstats
from fed_nessa.federated.codec import SecAggCodec, make_codec
from fed_nessa.federated.cohort import sample_positions
from fed_nessa.federated.device import (
    RoundRequest,
    model_refusal,
    planned_event,
    policy_refusal,
    separation_refusal,
)
from fed_nessa.federated.layout import trainable
from fed_nessa.federated.mechanism import device_subset, local_orders, max_sampled, public_parameters
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.protocol import round_config
from fed_nessa.federated.release import may_start, may_unmask, promised_arrivals
from fed_nessa.federated.rounds import (
    LEDGER_FILE,
    Progress,
    RunOutputs,
    evaluates,
    finish_run,
    not_evaluated,
    round_entry,
)
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.federated.skellam_mechanism import IntegerCodec, round_codec
from fed_nessa.model.training import with_noise_share
from fed_nessa.privacy.accounting import UnitNotCoveredError
from fed_nessa.privacy.events import EXAMPLE, GAUSSIAN_SUM, DPEvent
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
    server_key_folder,
)
from fed_nessa.privacy.store import LedgerStore
from fed_nessa.randomness import NoiseSource, noise_source
from fed_nessa.sim import fleet_integer
from fed_nessa.sim.fedavg import block_steps, fedavg_block
from fed_nessa.sim.fleet_epsilon import SpentEpsilon
from fed_nessa.sim.fleet_numerics import encode_all, fast_rounding, modular_sum, summed_noise, uniforms
from fed_nessa.sim.ghost import clipped_gradient_sums, device_clipped_sum, device_clipped_vectors

log = logging.getLogger(__name__)

ENGINE = "fleet"
MASKS_NOTE = ("SecAgg+'s pairwise and private masks are left out: they cancel exactly in the modular sum, so the "
              "released aggregate does not depend on them; key agreement, secret sharing and unmasking are not run")
#: Examples per ghost-clipping batch (bounds memory; the sums are exact across batches).
EXAMPLE_CHUNK = 65_536
#: Devices per chunk in exact numerics (per-device vectors of P values each).
DEVICE_CHUNK = 256
#: Device level: zero-padded rows (devices x largest device) per batched per-device gradient.
DEVICE_LEVEL_PADDED_ROWS = 131_072
#: Device level, DP-FedAvg: devices per vectorised block (each holds its own copy of the trainable weights).
FEDAVG_BLOCK = 256
#: Rounds between two light progress summaries (summary.json without ``final``) for `fed-nessa view`.
PROGRESS_EVERY = 5
#: Pairs the pooled non-DP NESSA reference trains on at most (a random subset beyond).
REFERENCE_MAX_PAIRS = 1_200_000
#: The end of a run: evaluation's gate and run folder, injected into the library's protocol.
OUTPUTS = RunOutputs(gate_run, card_fields, SHIPPED, run_folder.write_outputs)


class FleetError(FedNessaError, RuntimeError):
    """A fleet run that cannot go on (e.g. a mode the fleet engine does not simulate)."""


def device_id(index: int) -> str:
    """The same pseudonym the Flower engine gives the index-th shard."""
    return device_filename(index)[: -len(SHARD_SUFFIX)]


@dataclass
class FleetState:
    """Every device's pairs in one tensor, indexed by device."""

    x: torch.Tensor  # (pairs, d_x) enrollment embeddings
    y: torch.Tensor  # (pairs, d_y) runtime embeddings
    starts: np.ndarray  # (devices + 1,) row offsets
    ids: list[str]
    #: Each device's (enroll, runtime) model ids, as its shard states them (checked every round).
    models: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n(self) -> np.ndarray:
        return np.diff(self.starts)

    @functools.cached_property
    def owner(self) -> np.ndarray:
        """The device index of every pair (computed once: the fast numerics use it every round)."""
        return np.repeat(np.arange(len(self.ids)), self.n)

    @classmethod
    def from_shards(cls, shards: tuple[Shard, ...] | list[Shard], device: torch.device) -> FleetState:
        n = np.array([s.n for s in shards], np.int64)
        starts = np.concatenate([[0], np.cumsum(n)])
        x = torch.from_numpy(np.concatenate([s.enroll for s in shards]).astype(np.float32)).to(device)
        y = torch.from_numpy(np.concatenate([s.runtime for s in shards]).astype(np.float32)).to(device)
        return cls(x, y, starts, [device_id(i) for i in range(len(shards))],
                   [(s.enroll_model, s.runtime_model) for s in shards])

    def refusal(self, req: RoundRequest, i: int, n: int, cfg: FederationConfig, policy: DevicePolicy,
                ledger: DeviceLedger) -> str | None:
        """Device ``i``'s answer to ``req`` before anything is reserved: model ids, then its policy."""
        models = model_refusal(req, *self.models[i]) if self.models else None
        return models or policy_refusal(req, n, cfg, policy, ledger)


@dataclass
class DeviceBook:
    """Each device's policy decision and ledger handle for the run."""

    ledgers: list[DeviceLedger]
    policies: list[DevicePolicy]
    #: device index -> reserve seqs of its DP-SGD span(s): one per run of consecutive joined rounds
    span_seq: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)  # (seq, first, last)
    span_rounds: dict[int, list[int]] = field(default_factory=dict)  # device index -> rounds it joins
    refused: dict[int, str] = field(default_factory=dict)  # device index -> why it declines the DP-SGD phase


class FleetEngine:
    """One fleet-engine run (see the module docstring)."""

    def __init__(self, cfg: FederationConfig, policy: DevicePolicy, data: FederationData, *,
                 device: str = "cpu", progress: Progress | None = None) -> None:
        """``data.devices`` are copied into one tensor pair and then dropped (memory at 10^5 devices)."""
        if cfg.dp_mode == DPMode.LOCAL:
            raise FleetError("the fleet engine simulates distributed DP (and dp-mode none); local mode runs many "
                             "Opacus steps per device per round: use the Flower engine")
        if not data.devices:
            raise FleetError("the fleet engine needs the devices in memory (a built-in data source)")
        self.cfg, self.policy = cfg, policy
        self.torch_device = torch.device(device)
        self.fleet = FleetState.from_shards(data.devices, self.torch_device)
        self.data = data = dataclasses.replace(data, devices=())
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model = ServerModel(cfg, data.d_x, data.d_y, data.enroll_model, data.runtime_model)
        self.plan = noise_plan(cfg, len(self.fleet.ids))
        self.progress = progress or (lambda event: None)
        self.history: list[dict[str, Any]] = []
        self.numerics = FleetNumerics(cfg.fleet_numerics)
        self._sim_rng = np.random.default_rng([cfg.seed, 7])  # drop-outs only: not a privacy mechanism
        self.saturated_total = 0
        self._dropped: dict[int, list[int]] = {}
        # Evidence (docs/privacy.md, "one model per round"): the server key devices pin, device key
        # pins not yet written to the federation ledger, and (model, config) SHA-256 sent per round.
        self._server_fp: str | None = None
        self._pins: dict[str, str] = {}
        self._sent: dict[int, tuple[str, str]] = {}
        self._streams: dict[int, NoiseSource] = {}  # exact device level: each device's stream within a round
        self._spent = SpentEpsilon(cfg.privacy_unit)
        self._store: LedgerStore | None = None  # the ledger store (ledger-layout = sqlite), else None

    # -- ledgers ---------------------------------------------------------------------------
    def _open_ledgers(self) -> DeviceBook:
        """Every device's ledger (its keys outside the run folder), in the run's ``ledger-layout``."""
        ledgers, self._store = open_device_ledgers(self.run_dir, self.fleet.ids, self.policy, self.cfg.ledger_layout)
        return DeviceBook(ledgers, [ledger.policy or self.policy for ledger in ledgers])

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        fed_ledger = FederationLedger.open(self.run_dir / LEDGER_FILE, server_key_folder(self.run_dir))
        book = self._open_ledgers()
        self._server_fp = fed_ledger.key_fingerprint
        pinned = fed_ledger.pinned_devices()
        self._pins = {dev: led.key_fingerprint for dev, led in zip(self.fleet.ids, book.ledgers, strict=True)
                      if dev not in pinned}
        phases = self.model.phases(self.plan.aligner)
        log.info(self.plan.reason)
        self.progress({"event": "start", "first_round": 1, "rounds": len(phases)})
        dp_rounds = [r for r, p in enumerate(phases, start=1) if p == Phase.DPSGD]
        for r, phase in enumerate(phases, start=1):
            t0 = time.perf_counter()
            if phase == Phase.SUFFSTATS:
                entry = self._stats_round(r, book, fed_ledger)
            else:
                if r == dp_rounds[0]:
                    with ledger_batch(self._store):  # every span reserved, durable, before round one
                        self._reserve_spans(book, dp_rounds)
                entry = self._dpsgd_round(r, book)
            if phase == Phase.SUFFSTATS or r == dp_rounds[0]:
                self._spent.changed()
            entry.update(self._spent.after(r, book.ledgers, [p.delta for p in book.policies], book.span_rounds))
            entry["seconds"] = time.perf_counter() - t0
            entry["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.history.append(entry)
            if r < len(phases) and (r == 1 or r % PROGRESS_EVERY == 0):
                run_folder.write_summary(self.run_dir, self._progress_summary(len(phases)))
            self.progress({"event": "round", **entry})
        if dp_rounds:
            self._close_spans(book, dp_rounds, fed_ledger)
        fed_ledger.record_end()  # signed: a federation ledger cut back to an earlier round lacks it
        try:
            return self.finish(book)
        finally:
            if self._store is not None:
                self._store.close()

    # -- statistics round ------------------------------------------------------------------
    def _stats_round(self, r: int, book: DeviceBook, fed_ledger: FederationLedger) -> dict[str, Any]:
        cfg, fleet = self.cfg, self.fleet
        cohort = sample_positions(len(fleet.ids), cfg, r, Phase.SUFFSTATS)
        promised = promised_arrivals(cfg, len(cohort))
        req = RoundRequest(Phase.SUFFSTATS, r, promised, len(fleet.ids), **self._model_ids())
        received = self._send(Phase.SUFFSTATS, r, promised)
        accepted, declined, seqs = [], [], {}
        reasons: dict[str, int] = {}
        with ledger_batch(self._store):  # reserves durable before the mechanism runs
            for i in cohort.tolist():
                ledger, policy = book.ledgers[i], book.policies[i]
                why = fleet.refusal(req, i, int(fleet.n[i]), cfg, policy, ledger)
                event = None if why else planned_event(req, int(fleet.n[i]), cfg, policy,
                                                       (self.data.d_x, self.data.d_y))
                if event is not None:
                    decision = ledger.check_budget(event, cfg.epsilon_budget, cfg.delta)
                    why = None if decision.allowed else decision.reason
                if why:
                    declined.append(i)
                    reasons[why] = reasons.get(why, 0) + 1
                    continue
                accepted.append(i)
                if event is not None:
                    seqs[i] = ledger.reserve(event, received)
        status, note, arrived = RoundStatus.SKIPPED, may_start(len(accepted), promised).reason, []
        if may_start(len(accepted), promised).release:
            arrived = self._dropouts(accepted)
            unmask = may_unmask(len(arrived), promised)
            if not unmask.release:
                status, note = RoundStatus.REFUSED, unmask.reason
            else:
                codec = round_codec(cfg, Phase.SUFFSTATS, self.plan, (self.data.d_x, self.data.d_y), r, promised,
                                    len(accepted), self.model.payload_bound(Phase.SUFFSTATS, self.plan))
                total, arrived = self._stats_sum(arrived, book, r, codec)
                unmask = may_unmask(len(arrived), promised)
                if not unmask.release:
                    status, note = RoundStatus.REFUSED, unmask.reason
                else:
                    self.model.apply(Phase.SUFFSTATS, total, len(arrived),
                                     noise_arrivals=[book.policies[i].guaranteed_arrivals for i in arrived],
                                     quantization_std=codec.device_error_std(), plan=self.plan)
                    status, note = RoundStatus.APPLIED, f"sum of {len(arrived)} devices released (g = {promised})"
        with ledger_batch(self._store):
            for i, seq in seqs.items():
                ledger = book.ledgers[i]
                ledger.complete(seq, float(ledger.epsilon(book.policies[i].delta)), status="done")
        ids = self.fleet.ids
        dropped = sorted(set(accepted) - set(arrived))
        fed_ledger.record_round(r, [ids[i] for i in arrived], [ids[i] for i in declined], [ids[i] for i in dropped],
                                {"phase": str(Phase.SUFFSTATS), "status": str(status), "note": note,
                                 "guaranteed_arrivals": promised, "engine": ENGINE, "decline_reasons": reasons,
                                 **self._sent_extra([r]), LEDGER_HEADS: _heads(book, seqs),
                                 PUBLIC_PARAMETERS: public_parameters(Phase.SUFFSTATS, cfg, self.plan)})
        return self._entry(r, Phase.SUFFSTATS, status, note, len(arrived), len(declined), len(dropped), book)

    def _dropouts(self, accepted: list[int]) -> list[int]:
        if self.cfg.dropout_rate <= 0:
            return list(accepted)
        keep = self._sim_rng.random(len(accepted)) >= self.cfg.dropout_rate
        return [i for i, k in zip(accepted, keep, strict=True) if k]

    def _stats_sum(self, arrived: list[int], book: DeviceBook, r: int,
                   codec: SecAggCodec | IntegerCodec) -> tuple[np.ndarray, list[int]]:
        """The released statistics sum and the devices in it (a device failing its range check is not)."""
        cfg, fleet = self.cfg, self.fleet
        if isinstance(codec, IntegerCodec):  # distributed-mechanism = skellam
            shards = [(fleet.x[fleet.starts[i]:fleet.starts[i + 1]].cpu().numpy(),
                       fleet.y[fleet.starts[i]:fleet.starts[i + 1]].cpu().numpy()) for i in arrived]
            return fleet_integer.stats_sum(cfg, self.numerics, shards, [fleet.ids[i] for i in arrived],
                                           [book.policies[i].guaranteed_arrivals for i in arrived], r, codec), arrived
        dp = cfg.dp_mode != DPMode.NONE
        mech = self.model.mechanism
        if self.numerics == FleetNumerics.FAST:
            rows = np.concatenate([np.arange(fleet.starts[i], fleet.starts[i + 1]) for i in arrived])
            weights = self._stats_weights()
            total = np.zeros(suffstats.vector_size(self.data.d_x, self.data.d_y))
            for c in range(0, len(rows), EXAMPLE_CHUNK):  # linear in the pairs: the sum of the devices' vectors
                part = rows[c:c + EXAMPLE_CHUNK]
                idx = torch.from_numpy(part).to(self.torch_device)
                total += suffstats.device_vector(fleet.x[idx].cpu().numpy(), fleet.y[idx].cpu().numpy(),
                                                 None if weights is None else weights[fleet.owner[part]])
            if dp:
                var = mech.released_variance(Phase.SUFFSTATS, self.plan,
                                             [book.policies[i].guaranteed_arrivals for i in arrived])
                total = total + summed_noise(self.cfg, r).normal(total.shape, math.sqrt(var))
            return fast_rounding(total, len(arrived), codec, cfg, r), arrived
        vectors = []
        for i in arrived:
            shard_x = fleet.x[fleet.starts[i]:fleet.starts[i + 1]].cpu().numpy()
            shard_y = fleet.y[fleet.starts[i]:fleet.starts[i + 1]].cpu().numpy()
            vec = suffstats.device_vector(shard_x, shard_y) * mech.stats_weight(int(fleet.n[i]))
            if dp:
                stream = noise_source(cfg.reproducible_noise, cfg.seed, "device", fleet.ids[i], r)
                std = mech.share_std(Phase.SUFFSTATS, self.plan, book.policies[i].guaranteed_arrivals)
                vec = vec + stream.normal(vec.shape, std)
            vectors.append(np.asarray(vec, np.float32))
        payloads, sent, failed = encode_all(vectors, arrived, codec)
        if failed:
            log.warning("round %d: %d device(s) failed their own range check and sent nothing", r, len(failed))
        return (modular_sum(payloads, codec) if payloads else np.zeros(0, np.float32)), sent

    def _stats_weights(self) -> np.ndarray | None:
        """Each device's statistics weight (the mechanism's; None: every pair at weight 1)."""
        return self.model.mechanism.stats_weights(self.fleet.n)

    # -- DP-SGD rounds ---------------------------------------------------------------------
    def _reserve_spans(self, book: DeviceBook, dp_rounds: list[int]) -> None:
        """Every device reserves the DP-SGD rounds it is scheduled for, as one span, within its budget."""
        cfg, fleet = self.cfg, self.fleet
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
                               **self._model_ids())
            why = fleet.refusal(req, i, int(fleet.n[i]), cfg, policy, ledger)
            rounds = kept
            if why or not rounds:
                book.refused[i] = why or separation_refusal(req.round, ledger.rounds(), policy) or "declined"
                continue
            one = planned_event(req, int(fleet.n[i]), cfg, policy)
            if one is None:  # no DP: nothing to reserve
                book.span_rounds[i] = rounds
                continue
            key = (one.sample_rate, one.noise_multiplier, one.unit, len(rounds),
                   tuple(sorted((e.sample_rate, e.noise_multiplier, e.steps, e.mechanism, e.unit)
                                for e in ledger.events())))
            if key not in cap_cache:
                cap_cache[key] = self._affordable(ledger, one, len(rounds))
            k = min(cap_cache[key], policy.max_participations - ledger.participations(), len(rounds))
            if k <= 0:
                book.refused[i] = "declined: the DP-SGD phase would take this device over its budget"
                continue
            joined = rounds[:k]
            # A Poisson DP-SGD span may skip rounds (cohorts); a device-level Gaussian sum is one
            # mechanism per round, so its spans are runs of consecutive rounds.
            runs = _runs(tuple(joined)) if one.mechanism == GAUSSIAN_SUM else [(joined[0], joined[-1])]
            seqs = []
            for first, last in runs:
                steps = k if one.mechanism != GAUSSIAN_SUM else last - first + 1
                span = DPEvent.from_dict({**one.to_dict(), "steps": steps, "round": first, "last_round": last,
                                          "note": f"{one.note}; span of {steps} scheduled round(s) reserved at "
                                                  "once (counted in full even if the device drops out)"})
                seqs.append((ledger.reserve(span, {"server_key_fingerprint": self._server_fp}), first, last))
            book.span_seq[i] = seqs
            book.span_rounds[i] = joined

    def _affordable(self, ledger: DeviceLedger, one: DPEvent, most: int) -> int:
        """The most rounds (<= most) a device with this history can join within its budget."""
        def fits(k: int) -> bool:
            span = DPEvent.from_dict({**one.to_dict(), "steps": k, "last_round": one.round + k - 1})
            return ledger.check_budget(span, self.cfg.epsilon_budget, self.cfg.delta).allowed

        if fits(most):
            return most
        lo, hi = 0, most
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    def _dpsgd_round(self, r: int, book: DeviceBook) -> dict[str, Any]:
        cfg, fleet = self.cfg, self.fleet
        cohort = sample_positions(len(fleet.ids), cfg, r, Phase.DPSGD).tolist()
        promised = promised_arrivals(cfg, len(cohort))
        self._send(Phase.DPSGD, r, promised)
        accepted = [i for i in cohort if r in book.span_rounds.get(i, ())]
        declined = len(cohort) - len(accepted)
        status, note = RoundStatus.SKIPPED, may_start(len(accepted), promised).reason
        sent: list[int] = []
        if may_start(len(accepted), promised).release:
            arrived = self._dropouts(accepted)
            codec = make_codec(self.model.payload_bound(Phase.DPSGD, self.plan), cfg.secagg_clipping_range,
                               cfg.secagg_quantization_range, len(accepted))
            q = self._rates(arrived)
            whole = self.model.mechanism.clips_whole_device
            if whole:  # every device's whole mean gradient, no sampling
                vectors = self._device_vectors(arrived, book, r)
                if self.numerics == FleetNumerics.EXACT:
                    payloads, sent, _failed = encode_all(vectors, arrived, codec)
                else:
                    sent = arrived
            elif self.numerics == FleetNumerics.EXACT:
                payloads, sent, _failed = encode_all(self._exact_vectors(arrived, book, r, q), arrived, codec)
            else:
                rows, owner = self._sample(arrived, r, q)
                fits = np.bincount(owner, minlength=len(arrived)) <= max_sampled(cfg, self.plan.sample_rate)
                sent = [i for i, ok in zip(arrived, fits, strict=True) if ok]
                # a device whose sample could saturate fails locally: nothing sent, counted as failed
                rows = rows[fits[owner]]
            unmask = may_unmask(len(sent), promised)
            if not unmask.release:
                status, note = RoundStatus.REFUSED, unmask.reason
            else:
                if self.numerics == FleetNumerics.EXACT:
                    total = modular_sum(payloads, codec)
                elif whole:
                    total = self._fast_device_total(vectors[0], sent, book, r, codec)
                else:
                    total = self._fast_gradient_total(rows, sent, book, r, codec)
                self.model.apply(Phase.DPSGD, total, len(sent), gradients=True,
                                 noise_arrivals=[book.policies[i].guaranteed_arrivals for i in sent],
                                 quantization_std=codec.device_error_std(), plan=self.plan)
                status, note = RoundStatus.APPLIED, f"sum of {len(sent)} devices released (g = {promised})"
        self._dropped[r] = sorted(set(accepted) - set(sent))
        return self._entry(r, Phase.DPSGD, status, note, len(sent), declined, len(accepted) - len(sent), book)

    def _sample(self, arrived: list[int], r: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, position in ``arrived``) of the fast numerics' fleet-wide Poisson sample."""
        fleet = self.fleet
        owner_all = fleet.owner
        position = np.full(len(fleet.ids), -1)
        position[np.asarray(arrived, np.int64)] = np.arange(len(arrived))
        rows_all = np.flatnonzero(position[owner_all] >= 0)
        owner = position[owner_all[rows_all]]
        keep = uniforms(self.cfg, len(rows_all), r) < q[owner]
        return rows_all[keep], owner[keep]

    def _rates(self, arrived: list[int]) -> np.ndarray:
        cfg, n = self.cfg, self.fleet.n
        fleet = len(self.fleet.ids)
        if cfg.sample_rate > 0:  # one fleet-wide rate
            return np.full(len(arrived), cfg.round_sample_rate(1, fleet, cfg.cohort_size(fleet)))
        return np.array([cfg.round_sample_rate(int(n[i]), fleet, cfg.cohort_size(fleet)) for i in arrived])

    def _fast_gradient_total(self, rows: np.ndarray, sent: list[int], book: DeviceBook, r: int,
                             codec: SecAggCodec) -> np.ndarray:
        cfg = self.cfg
        net = self.model.net.to(self.torch_device)
        dp = cfg.dp_mode != DPMode.NONE
        total = torch.zeros(sum(p.numel() for p in trainable(net)), device=self.torch_device)
        for c in range(0, len(rows), EXAMPLE_CHUNK):
            idx = torch.from_numpy(rows[c:c + EXAMPLE_CHUNK]).to(self.torch_device)
            s, _ = clipped_gradient_sums(net, self.fleet.x[idx], self.fleet.y[idx], cfg.clip_norm, clip_enabled=dp)
            total += s
        self.model.net.to("cpu")
        out = total.cpu().numpy().astype(np.float64)
        if dp:
            var = self.model.mechanism.released_variance(Phase.DPSGD, self.plan,
                                                         [book.policies[i].guaranteed_arrivals for i in sent])
            out = out + summed_noise(self.cfg, r).normal(out.shape, math.sqrt(var))
        return fast_rounding(out, len(sent), codec, self.cfg, r)

    def _device_vectors(self, arrived: list[int], book: DeviceBook, r: int) -> list[np.ndarray]:
        """Device level: each device's clipped mean gradient over its round's pairs.

        Fast numerics: ONE vector, the clipped vectors' sum (without per-device vectors);
        exact: per-device vectors plus each device's noise share from its own stream, in the
        draw order of ``model.training.device_update``.
        """
        if self.cfg.device_update == DeviceUpdate.FEDAVG:
            return self._fedavg_vectors(arrived, book, r)
        cfg, fleet = self.cfg, self.fleet
        net = self.model.net.to(self.torch_device)
        params = trainable(net)
        dp = cfg.dp_mode != DPMode.NONE
        rows_of = self._device_rows(arrived, r)
        n = {i: len(rows_of[i]) for i in arrived}
        total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=self.torch_device)
        vectors: dict[int, np.ndarray] = {}
        for chunk in _blocks(arrived, n, len(arrived)):
            rows = np.concatenate([rows_of[i] for i in chunk])
            seg = np.repeat(np.arange(len(chunk)), [n[i] for i in chunk])
            idx = torch.from_numpy(rows).to(self.torch_device)
            segments = torch.from_numpy(seg).to(self.torch_device)
            if self.numerics == FleetNumerics.FAST:
                total += device_clipped_sum(net, fleet.x[idx], fleet.y[idx], segments, len(chunk),
                                            cfg.device_clip_norm, clip_enabled=dp).double()
                continue
            vecs = device_clipped_vectors(net, fleet.x[idx], fleet.y[idx], segments, len(chunk),
                                          cfg.device_clip_norm, clip_enabled=dp)
            host = vecs.cpu().numpy().astype(np.float64)
            for j, i in enumerate(chunk):
                vec = host[j]
                if dp:
                    stream = self._streams.pop(i)
                    std = self.model.mechanism.share_std(Phase.DPSGD, self.plan, book.policies[i].guaranteed_arrivals)
                    vec = vec + np.concatenate([np.asarray(stream.normal(tuple(p.shape), std)).reshape(-1)
                                                for p in params])
                vectors[i] = vec.astype(np.float32)
        self.model.net.to("cpu")
        if self.numerics == FleetNumerics.FAST:
            return [total.cpu().numpy()]
        return [vectors[i] for i in arrived]

    def _fedavg_vectors(self, arrived: list[int], book: DeviceBook, r: int) -> list[np.ndarray]:
        """Device level, ``device-update = fedavg``: each device's clipped DP-FedAvg delta, by blocks.

        The update is :func:`fed_nessa.sim.fedavg.fedavg_block` (the ClientApp's
        :meth:`DeviceLevel.fedavg_vector` vectorised). Exact numerics: per-device vectors, each device's
        row orders and then its noise share drawn from its own stream in the device's order; fast:
        ONE vector, the clipped deltas' sum (the engine adds one draw of the summed shares).
        Clipped with or without DP, as on the device (the codec's range assumes it).
        """
        cfg, fleet = self.cfg, self.fleet
        net = self.model.net.to(self.torch_device)
        params = trainable(net)
        dp = cfg.dp_mode != DPMode.NONE
        orders, streams = self._fedavg_orders(arrived, r)
        n = {i: int(fleet.n[i]) for i in arrived}
        total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=self.torch_device)
        vectors: dict[int, np.ndarray] = {}
        for chunk in _blocks(arrived, n, FEDAVG_BLOCK):
            width = max(n[i] for i in chunk)
            local = np.arange(width)
            # row l of device i is fleet row starts[i] + l; padding points at the device's first row
            idx = np.stack([fleet.starts[i] + np.where(local < n[i], local, 0) for i in chunk])
            gather = torch.from_numpy(idx).to(self.torch_device)
            steps = block_steps([orders[i] for i in chunk], cfg.local_batch)
            clipped = fedavg_block(net, fleet.x[gather], fleet.y[gather], steps, lr=cfg.local_lr,
                                   clip_norm=cfg.device_clip_norm).clipped
            if self.numerics == FleetNumerics.FAST:
                total += clipped.double().sum(dim=0)
                continue
            host = clipped.cpu().numpy().astype(np.float64)
            for j, i in enumerate(chunk):
                std = (self.model.mechanism.share_std(Phase.DPSGD, self.plan, book.policies[i].guaranteed_arrivals)
                       if dp else 0.0)
                vectors[i] = with_noise_share(host[j], params, std, streams[i])
        self.model.net.to("cpu")
        if self.numerics == FleetNumerics.FAST:
            return [total.cpu().numpy()]
        return [vectors[i] for i in arrived]

    def _fedavg_orders(self, arrived: list[int], r: int) -> tuple[dict[int, list[np.ndarray]], dict[int, NoiseSource]]:
        """Each device's ``local-epochs`` row orders (local indices) and, exact numerics, its stream.

        Exact: :func:`local_orders` from the device's own stream, as on a device (the stream is kept
        for the noise share, drawn next). Fast: per epoch, one fleet-wide draw of sort keys (keyed
        like the fast Poisson samples), each device's rows sorted by them: a uniform permutation each.
        """
        cfg, fleet, epochs = self.cfg, self.fleet, self.cfg.local_epochs
        if self.numerics == FleetNumerics.EXACT:
            streams = {i: noise_source(cfg.reproducible_noise, cfg.seed, "device", fleet.ids[i], r) for i in arrived}
            return {i: local_orders(streams[i], int(fleet.n[i]), epochs) for i in arrived}, streams
        devices = sorted(arrived)
        rows = np.concatenate([np.arange(fleet.starts[i], fleet.starts[i + 1]) for i in devices])
        owner = fleet.owner[rows]  # ascending: each device's rows are contiguous, in device order
        keys = uniforms(cfg, len(rows) * epochs, r).reshape(epochs, len(rows))
        ordered = [rows[np.lexsort((keys[e], owner))] - fleet.starts[owner] for e in range(epochs)]
        bounds = np.searchsorted(owner, np.asarray(devices, np.int64), side="left")
        out = {i: [o[a:a + int(fleet.n[i])] for o in ordered] for i, a in zip(devices, bounds, strict=True)}
        return out, {}

    def _device_rows(self, arrived: list[int], r: int) -> dict[int, np.ndarray]:
        """Each arrived device's rows for a device-level round (``device-batch`` of its pairs, or all).

        Exact numerics: drawn from the device's own stream, as on a device (the stream is kept for
        its noise share, which comes next in the same order). Fast: one fleet-wide PCG64 draw of
        sort keys, keyed like the fast Poisson samples.
        """
        fleet, batch = self.fleet, self.cfg.device_batch
        if self.numerics == FleetNumerics.EXACT:
            out = {}
            for i in arrived:
                stream = noise_source(self.cfg.reproducible_noise, self.cfg.seed, "device", fleet.ids[i], r)
                self._streams[i] = stream
                out[i] = fleet.starts[i] + device_subset(stream.uniform(int(fleet.n[i])), batch)
            return out
        if batch <= 0:
            return {i: np.arange(fleet.starts[i], fleet.starts[i + 1]) for i in arrived}
        rows = np.concatenate([np.arange(fleet.starts[i], fleet.starts[i + 1]) for i in arrived])
        owner = fleet.owner[rows]
        order = np.lexsort((uniforms(self.cfg, len(rows), r), owner))
        rows, owner = rows[order], owner[order]
        first = np.searchsorted(owner, owner, side="left")
        keep = (np.arange(len(rows)) - first) < batch
        rows, owner = rows[keep], owner[keep]
        bounds = np.searchsorted(owner, np.asarray(arrived, np.int64), side="left")
        ends = np.searchsorted(owner, np.asarray(arrived, np.int64), side="right")
        return {i: np.sort(rows[a:b]) for i, a, b in zip(arrived, bounds, ends, strict=True)}

    def _fast_device_total(self, clipped_sum: np.ndarray, sent: list[int], book: DeviceBook, r: int,
                           codec: SecAggCodec) -> np.ndarray:
        """The released device-level sum: the clipped sum plus ONE draw of the summed noise shares."""
        out = np.asarray(clipped_sum, np.float64)
        if self.cfg.dp_mode != DPMode.NONE:
            var = self.model.mechanism.released_variance(Phase.DPSGD, self.plan,
                                                         [book.policies[i].guaranteed_arrivals for i in sent])
            out = out + summed_noise(self.cfg, r).normal(out.shape, math.sqrt(var))
        return fast_rounding(out, len(sent), codec, self.cfg, r)

    def _exact_vectors(self, arrived: list[int], book: DeviceBook, r: int, q: np.ndarray) -> list[np.ndarray]:
        """Per-device vectors with the Flower engine's draw order: the Poisson sample, then one Gaussian
        per trainable parameter tensor in order (as Opacus' ``add_noise``)."""
        cfg, fleet = self.cfg, self.fleet
        net = self.model.net.to(self.torch_device)
        params = trainable(net)
        dp = cfg.dp_mode != DPMode.NONE
        vectors: list[np.ndarray] = []
        for c in range(0, len(arrived), DEVICE_CHUNK):
            chunk = arrived[c:c + DEVICE_CHUNK]
            streams, rows, seg = [], [], []
            for j, i in enumerate(chunk):
                stream = noise_source(cfg.reproducible_noise, cfg.seed, "device", fleet.ids[i], r)
                keep = stream.uniform(int(fleet.n[i])) < q[c + j]
                idx = np.arange(fleet.starts[i], fleet.starts[i + 1])[keep]
                streams.append(stream)
                rows.append(idx)
                seg.append(np.full(len(idx), j))
            all_rows = torch.from_numpy(np.concatenate(rows)).to(self.torch_device)
            segments = torch.from_numpy(np.concatenate(seg)).to(self.torch_device)
            sums, _ = clipped_gradient_sums(net, fleet.x[all_rows], fleet.y[all_rows], cfg.clip_norm,
                                            segments=segments, groups=len(chunk), clip_enabled=dp)
            sums_np = sums.cpu().numpy()
            for j, i in enumerate(chunk):
                vec = sums_np[j].astype(np.float32)
                if dp:
                    share = self.model.mechanism.share_std(Phase.DPSGD, self.plan, book.policies[i].guaranteed_arrivals)
                    noise = np.concatenate([streams[j].normal(tuple(p.shape), share).reshape(-1) for p in params])
                    vec = (vec + noise.astype(np.float32)).astype(np.float32)
                vectors.append(vec)
        self.model.net.to("cpu")
        return vectors

    # -- evidence: pins and what each round sent ------------------------------------------
    def _model_ids(self) -> dict[str, str]:
        """The federation's model ids, stated in every round (a device with other models declines)."""
        return {"enroll_model": self.data.enroll_model, "runtime_model": self.data.runtime_model}

    def _send(self, phase: Phase, r: int, promised: int) -> dict[str, Any]:
        """Hash the model and round config of round ``r`` (what every device of the round receives)."""
        config = round_config(str(phase), r, promised, len(self.fleet.ids), self._server_fp, **self._model_ids())
        self._sent[r] = (model_sha256(self.model.vector()), config_sha256(config))
        return {"round": r, "model_sha256": self._sent[r][0], "config_sha256": self._sent[r][1],
                "server_key_fingerprint": self._server_fp}

    def _sent_extra(self, rounds: list[int], span: bool = False) -> dict[str, Any]:
        """Federation-ledger evidence: per-round hashes (one round) or their chain (a span), plus new pins."""
        pins, self._pins = self._pins, {}
        if len(rounds) == 1 and not span:
            model, config = self._sent[rounds[0]]
            return {"model_sha256": model, "config_sha256": config, "device_key_fingerprints": pins}
        return {"models": {str(r): list(self._sent[r]) for r in rounds}, "model_chain_scheme": CHAIN_SCHEME,
                "model_chain": received_chain((r, *self._sent[r]) for r in rounds),
                "device_key_fingerprints": pins}

    def _close_spans(self, book: DeviceBook, dp_rounds: list[int], fed_ledger: FederationLedger) -> None:
        chains: dict[tuple[int, ...], dict[str, Any]] = {}  # devices on one schedule share one chain
        with ledger_batch(self._store):
            for i, spans in book.span_seq.items():
                ledger = book.ledgers[i]
                for seq, first, last in spans:
                    rounds = tuple(r for r in book.span_rounds[i] if first <= r <= last)
                    if rounds not in chains:
                        chains[rounds] = {"scheme": CHAIN_SCHEME, "rounds": [[a, b] for a, b in _runs(rounds)],
                                          "chain": received_chain((r, *self._sent[r]) for r in rounds)}
                    ledger.complete(seq, float(ledger.epsilon(book.policies[i].delta)), status="done",
                                    received=chains[rounds])
        ids = self.fleet.ids
        joined = sorted(book.span_rounds)
        heads = _heads(book, book.span_seq)
        dropped = {str(r): [ids[i] for i in devs] for r, devs in self._dropped.items() if devs}
        extra = {"phase": str(Phase.DPSGD), "engine": ENGINE, "dropped": dropped,
                 "decline_reasons": {reason: sum(1 for v in book.refused.values() if v == reason)
                                     for reason in set(book.refused.values())},
                 PUBLIC_PARAMETERS: public_parameters(Phase.DPSGD, self.cfg, self.plan)}
        if self.cfg.cohort_size(len(ids)) >= len(ids):
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
                                        **self._sent_extra(list(range(first, last + 1)), span=True),
                                        LEDGER_HEADS: ending})
            if not groups and refused:
                fed_ledger.record_span(dp_rounds[0], dp_rounds[-1], [], refused, [], extra)
            return
        for r in dp_rounds:  # cohorts: one entry per round (each lists only its cohort)
            in_round = [i for i in joined if r in book.span_rounds[i]]
            lost = set(self._dropped.get(r, []))
            ending = {ids[i]: heads[ids[i]] for i in in_round if book.span_rounds[i][-1] == r and ids[i] in heads}
            fed_ledger.record_round(r, [ids[i] for i in in_round if i not in lost], [],
                                    [ids[i] for i in sorted(lost)], {**extra, "dropped": {}, **self._sent_extra([r]),
                                                                     LEDGER_HEADS: ending})

    # -- reporting -------------------------------------------------------------------------
    def _evaluate(self, aligners: dict[str, Any] | None = None) -> Any:
        return evaluate_eval_set(self.data.eval, SCENARIO, {"federated": self.model.comparator(), **(aligners or {})})

    _row = staticmethod(summary_row)

    def _entry(self, r: int, phase: Phase, status: RoundStatus, note: str, joined: int, declined: int,
               failed: int, book: DeviceBook) -> dict[str, Any]:
        if evaluates(self.cfg, r, len(self.model.phases(self.plan.aligner)), phase, statistics_rounds=True):
            fed = self._row(self._evaluate(), "asym_federated")
        else:
            fed = not_evaluated()
        return {**round_entry(r, phase, status, note, fed, participants=joined, declined=declined, failed=failed),
                "epsilon_max": 0.0, "epsilon_median": 0.0}  # stated by fed_nessa.sim.fleet_epsilon after the round

    def _epsilons(self, book: DeviceBook, unit: str | None = None) -> dict[str, float]:
        """Each device's epsilon from its ledger in ``unit`` (default: the run's privacy unit).

        Identical histories are computed once; a history with no bound in ``unit`` (an
        example-level event under a device-level claim) is infinite, so the claim fails loudly.
        """
        unit = unit or self.cfg.privacy_unit
        cache: dict[tuple[Any, ...], float] = {}
        out = {}
        for dev, ledger, policy in zip(self.fleet.ids, book.ledgers, book.policies, strict=True):
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

    def finish(self, book: DeviceBook) -> dict[str, Any]:
        """The protocol's end (:func:`fed_nessa.federated.rounds.finish_run`) with the fleet's references."""
        return finish_run(self.model, self.data, self.cfg, self.plan, OUTPUTS, rounds=len(self.history),
                          summary_of=lambda final: self._final_summary(final, book),
                          references=self._references if self.cfg.references else None,
                          card_extra=lambda summary: {"engine": ENGINE}, progress=self.progress)

    def _final_summary(self, final: dict[str, Any], book: DeviceBook) -> dict[str, Any]:
        """The summary with every device's epsilon from its ledger (the last round's entry states the same
        figures: fed_nessa.sim.fleet_epsilon) and, device level, the implied example-level figures."""
        summary = self.summary(final, self._epsilons(book))
        if self.cfg.privacy_unit != EXAMPLE:
            example = sorted(self._epsilons(book, EXAMPLE).values()) or [0.0]
            summary["privacy"]["epsilon_example_max"] = example[-1]
            summary["privacy"]["epsilon_example_median"] = statistics.median(example)
        return summary

    def _references(self) -> dict[str, Any]:
        """Pooled non-DP NESSA and ridge on the fleet's pairs (the same references as the Flower engine).

        Ridge comes from sufficient statistics summed in chunks (exactly centralised ridge, any fleet
        size); the NESSA reference trains its fixed step budget on at most
        :data:`REFERENCE_MAX_PAIRS` pairs drawn at random (all of them up to ~10k devices).
        """
        from fed_nessa.evaluation.centralised import REFERENCE_STEPS
        from fed_nessa.model.aligners import AlignerInfo, NessaAligner, NessaConfig, RidgeAligner
        from fed_nessa.model.aligners.base import l2_normalize
        from fed_nessa.model.aligners.linear import RidgeStats, ridge_from_stats
        from fed_nessa.model.training import TrainConfig

        info = AlignerInfo(d_x=self.data.d_x, d_y=self.data.d_y, enroll_model=self.data.enroll_model,
                           runtime_model=self.data.runtime_model)
        total = len(self.fleet.x)
        stats: RidgeStats | None = None
        for c in range(0, total, EXAMPLE_CHUNK):
            x = l2_normalize(self.fleet.x[c:c + EXAMPLE_CHUNK].cpu().numpy())
            y = l2_normalize(self.fleet.y[c:c + EXAMPLE_CHUNK].cpu().numpy())
            part = RidgeStats.from_pairs(x, y)
            stats = part if stats is None else stats + part
        assert stats is not None
        ridge = RidgeAligner(info, alpha=self.cfg.ridge_alpha)
        ridge.W, ridge.b = ridge_from_stats(stats, self.cfg.ridge_alpha)
        rows = np.arange(total)
        if total > REFERENCE_MAX_PAIRS:
            rows = np.sort(np.random.default_rng([self.cfg.seed, 13]).choice(total, REFERENCE_MAX_PAIRS, replace=False))
        x_ref, y_ref = self.fleet.x[rows].cpu().numpy(), self.fleet.y[rows].cpu().numpy()
        # The rounds are over: release the fleet's pairs before the reference fit (memory at 30k devices).
        self.fleet.x, self.fleet.y = self.fleet.x[:0], self.fleet.y[:0]
        epochs = max(1, min(20, math.ceil(REFERENCE_STEPS * 256 / len(rows))))
        nessa = NessaAligner(AlignerInfo(**{k: getattr(info, k) for k in ("d_x", "d_y", "enroll_model",
                                                                          "runtime_model")}),
                             NessaConfig(hidden=self.cfg.hidden, depth=self.cfg.depth)).fit(
            x_ref, y_ref, train_cfg=TrainConfig(epochs=epochs, batch_size=256, lr=1e-3, seed=self.cfg.seed))
        report = self._evaluate({"centralised_nessa": nessa, "ridge": ridge})
        return {"centralised_nessa": self._row(report, "asym_centralised_nessa"),
                "ridge": self._row(report, "asym_ridge"),
                "sym_before": self._row(report, "sym_before"), "sym_after": self._row(report, "sym_after")}

    def _noise_statement(self) -> str:
        """Where this simulation's draws came from (a deployed device draws all of them from the OS CSPRNG)."""
        if self.cfg.integer_noise:
            return fleet_integer.noise_statement(self.numerics)
        if self.numerics == FleetNumerics.EXACT:
            return ("fleet engine, exact numerics: every device's Gaussian share and Poisson sample drawn from the OS "
                    "CSPRNG, as on a device; residual risk: floating-point Gaussian samplers (Mironov, CCS 2012)")
        return ("fleet engine, distribution-equivalent numerics (a simulation): the summed Gaussian noise is one draw "
                "from the OS CSPRNG; the Poisson samples come from a PCG64 stream keyed with 128 fresh bits of OS "
                "entropy per round; the rounding errors from their distribution. A deployed device draws its own "
                "noise share and sample from the OS CSPRNG")

    def _progress_summary(self, rounds: int) -> dict[str, Any]:
        """The light summary written while the run goes on: rounds so far, no ``final`` (a run in progress)."""
        return {"config": run_folder.portable_config(self.cfg.to_run_config()), "rounds": self.history,
                "final": None, "progress": {"rounds_done": len(self.history), "rounds": rounds},
                "noise_plan": run_folder.noise_plan_block(self.plan),
                "engine": {"name": ENGINE, "numerics": str(self.numerics), "device": str(self.torch_device),
                           "devices": len(self.fleet.ids), "pairs": int(self.fleet.starts[-1])}}

    def summary(self, final: dict[str, Any], eps: dict[str, float]) -> dict[str, Any]:
        seconds = [e["seconds"] for e in self.history if e["phase"] == str(Phase.DPSGD)]
        return {
            "config": run_folder.portable_config(self.cfg.to_run_config()),
            "rounds": self.history,
            "final": final,
            "privacy": run_folder.privacy_block(self.cfg, eps, len(self.fleet.ids),
                                                noise_source=self._noise_statement(),
                                                ledger_layout=self.cfg.ledger_layout),
            "noise_plan": run_folder.noise_plan_block(self.plan),
            "secure_aggregation": {**run_folder.secagg_block(self.cfg, self.saturated_total),
                                   "simulated": MASKS_NOTE},
            "engine": {"name": ENGINE, "numerics": str(self.numerics), "masks": MASKS_NOTE,
                       "device": str(self.torch_device), "devices": len(self.fleet.ids),
                       "pairs": int(self.fleet.starts[-1]),
                       "seconds_per_dpsgd_round_median": statistics.median(seconds) if seconds else None,
                       "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        }


def _blocks(devices: list[int], n: dict[int, int], most: int) -> list[list[int]]:
    """The devices in blocks of similar row counts (little padding): at most ``most`` devices and
    :data:`DEVICE_LEVEL_PADDED_ROWS` padded rows (devices x the block's largest) per block."""
    order = sorted(devices, key=lambda i: n[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < most and (len(out[-1]) + 1) * n[i] <= DEVICE_LEVEL_PADDED_ROWS:
            out[-1].append(i)
        else:
            out.append([i])
    return out


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


def _heads(book: DeviceBook, reserved: dict[int, Any]) -> dict[str, list[int | str]]:
    """The ledger head ``[seq, sha256]`` of every device in ``reserved`` (the server signs them)."""
    return {book.ledgers[i].device_id: list(book.ledgers[i].head()) for i in reserved}


def _runs(rounds: tuple[int, ...]) -> list[tuple[int, int]]:
    """Sorted rounds as maximal runs of consecutive rounds ``(first, last)``."""
    out: list[tuple[int, int]] = []
    for r in rounds:
        if out and r == out[-1][1] + 1:
            out[-1] = (out[-1][0], r)
        else:
            out.append((r, r))
    return out


def run_fleet(cfg: FederationConfig, policy: DevicePolicy, *, device: str = "cpu",
              progress: Progress | None = None) -> dict[str, Any]:
    """Build the fleet's devices in memory and run every round with the fleet engine."""
    from fed_nessa.data.population import load_federation_data

    t0 = time.perf_counter()
    engine = FleetEngine(cfg, policy, load_federation_data(cfg, None), device=device, progress=progress)
    summary = engine.run()
    summary.setdefault("timing", {})["total_seconds"] = time.perf_counter() - t0
    return summary


__all__ = ["ENGINE", "FleetEngine", "FleetError", "ReplyStatus", "run_fleet"]
