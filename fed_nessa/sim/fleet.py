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

Ledgers at fleet scale: a device reserves its whole DP-SGD phase as one *span* and
completes it at the end; the federation ledger records a full-participation phase as one
span entry (:mod:`fed_nessa.sim.fleet_ledgers`). The rounds themselves are the library's
round protocol (:func:`fed_nessa.federated.protocol_loop.run_protocol`): this engine is its
transport (:class:`fed_nessa.federated.engine.Engine`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fed_nessa.config import (
    DevicePolicy,
    DeviceUpdate,
    DPMode,
    FederationConfig,
    FleetNumerics,
    Phase,
    ReplyStatus,
)
from fed_nessa.data.datasets import device_filename
from fed_nessa.data.population import Population
from fed_nessa.data.shards import SHARD_SUFFIX, Shard
from fed_nessa.errors import FedNessaError
from fed_nessa.evaluation import run_folder
from fed_nessa.evaluation.gate import SHIPPED, card_fields, gate_run
from fed_nessa.evaluation.protocol import evaluate_held_out, federated_row, reference_rows
from fed_nessa.federated import suffstats
from fed_nessa.federated.codec import SecAggCodec
from fed_nessa.federated.cohort import sample_positions
from fed_nessa.federated.device import (
    ModelIds,
    RoundRequest,
    model_refusal,
    plan_below_floor,
    planned_event,
    policy_refusal,
)
from fed_nessa.federated.engine import Answers, Ending, Engine, Pins, Released, RunState
from fed_nessa.federated.layout import trainable
from fed_nessa.federated.mechanism import device_subset, local_orders, max_sampled
from fed_nessa.federated.noise_plan import NoisePlan, noise_plan
from fed_nessa.federated.protocol import PROMISED_ARRIVALS_KEY, request_centre
from fed_nessa.federated.protocol_loop import run_protocol
from fed_nessa.federated.release import may_unmask
from fed_nessa.federated.rounds import CLIP_COLUMN, Progress, RunOutputs
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.federated.skellam_mechanism import IntegerCodec, RoundCodec
from fed_nessa.model.centre import about_centre, centred_targets
from fed_nessa.privacy.ledger import (
    DeviceLedger,
    FederationLedger,
    ledger_batch,
)
from fed_nessa.randomness import NoiseSource, noise_source
from fed_nessa.sim import fleet_integer
from fed_nessa.sim.fedavg import (
    bit_sum,
    block_steps,
    device_payloads,
    fedavg_block,
    fedavg_block_sum,
    round_clip,
)
from fed_nessa.sim.fleet_epsilon import SpentEpsilon
from fed_nessa.sim.fleet_ledgers import DeviceBook
from fed_nessa.sim.fleet_numerics import (
    encode_all,
    fast_rounding,
    modular_sum,
    rounding_keys,
    summed_noise,
    uniforms,
)
from fed_nessa.sim.ghost import clipped_gradient_sums, device_clipped_sum, device_clipped_vectors

if TYPE_CHECKING:
    from fed_nessa.model.training import TrainConfig

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
OUTPUTS = RunOutputs(gate_run, card_fields, SHIPPED, run_folder.write_outputs, federated_row)


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


class _Ids(Mapping[int, str]):
    """The fleet's device ids as the handle -> id mapping an answer carries (no copy per round)."""

    def __init__(self, ids: list[str]) -> None:
        self._ids = ids

    def __getitem__(self, i: int) -> str:
        return self._ids[i]

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self._ids)))

    def __len__(self) -> int:
        return len(self._ids)


class FleetEngine(Engine):
    """One fleet-engine run (see the module docstring): the round protocol's transport
    (:func:`fed_nessa.federated.protocol_loop.run_protocol` runs the rounds)."""

    name = ENGINE
    evaluates_statistics_round = True

    def __init__(self, cfg: FederationConfig, policy: DevicePolicy, data: Population, *,
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
        self.plan = noise_plan(cfg, len(self.fleet.ids), (data.d_x, data.d_y))
        self.progress = progress or (lambda event: None)
        self.state = RunState()
        self.numerics = FleetNumerics(cfg.fleet_numerics)
        self._sim_rng = np.random.default_rng([cfg.seed, 7])  # drop-outs only: not a privacy mechanism
        self._streams: dict[int, NoiseSource] = {}  # exact device level: each device's stream within a round
        self._spent = SpentEpsilon(cfg.privacy_unit)
        self.book = DeviceBook([], [])  # every device's ledger, policy and spans, opened by start()
        self._dp_rounds: list[int] = []
        self._centre: np.ndarray | None = None  # the DP-SGD round's loss centre, as its config states it
        self._seqs: dict[int, int] = {}  # the statistics round's reservations: device index -> seq

    # -- ledgers ---------------------------------------------------------------------------
    def _open_ledgers(self) -> DeviceBook:
        """Every device's ledger (its keys outside the run folder), in the run's ``ledger-layout``."""
        return DeviceBook.open(self.run_dir, self.fleet.ids, self.policy, self.cfg.ledger_layout)

    # -- the engine (fed_nessa.federated.engine.Engine) --------------------------------------
    def run(self) -> dict[str, Any]:
        """Every round through the library's round protocol; returns the summary."""
        return run_protocol(self, OUTPUTS, self.progress)

    def noise_plan(self) -> NoisePlan:
        return self.plan

    def start(self, ledger: FederationLedger, pins: Pins, state: RunState) -> int:
        """Every device's ledger opened; its key pinned from the ledger itself (written in the next record)."""
        self.state, self.book = state, self._open_ledgers()
        self.book.server_fp = ledger.key_fingerprint
        for dev, led in zip(self.fleet.ids, self.book.ledgers, strict=True):
            pins.offer(dev, led.key_fingerprint)
        phases = self.model.phases(self.plan.aligner)
        self._dp_rounds = [r for r, p in enumerate(phases, start=1) if p == Phase.DPSGD]
        for why in plan_below_floor(self.plan, phases, self.cfg, self.policy):
            log.warning(why)
        return 1

    def before_round(self, r: int, phase: Phase) -> None:
        if self._dp_rounds and r == self._dp_rounds[0]:
            with ledger_batch(self.book.store):  # every span reserved, durable, before round one
                self.book.reserve_spans(self.cfg, self.fleet, self._dp_rounds, self._model_ids(),
                                        (self.data.d_x, self.data.d_y))

    def cohort(self, r: int, phase: Phase) -> list[int]:
        return [int(i) for i in sample_positions(len(self.fleet.ids), self.cfg, r, phase).tolist()]

    def ask(self, r: int, phase: Phase, cohort: list[int], request: dict[str, Any]) -> Answers:
        """Statistics round: each device's policy and budget, its reservation durable before the sum.
        DP-SGD round: the devices whose span holds this round (reserved before the first one)."""
        received = self.book.send(r, request, self.model.vector())
        answers = Answers(device_ids=_Ids(self.fleet.ids), evidence={"model_sha256": received["model_sha256"],
                                                                     "config_sha256": received["config_sha256"]})
        if phase != Phase.SUFFSTATS:
            joins = [r in self.book.span_rounds.get(i, ()) for i in cohort]
            answers.accepted = [i for i, j in zip(cohort, joins, strict=True) if j]
            answers.declined = [i for i, j in zip(cohort, joins, strict=True) if not j]
            return answers
        cfg, fleet, book = self.cfg, self.fleet, self.book
        req = RoundRequest(Phase.SUFFSTATS, r, int(request[PROMISED_ARRIVALS_KEY]), len(fleet.ids), **self._model_ids(),
                           dims=(self.data.d_x, self.data.d_y))
        self._seqs = {}
        with ledger_batch(book.store):  # reserves durable before the mechanism runs
            for i in cohort:
                ledger, policy = book.ledgers[i], book.policies[i]
                why = fleet.refusal(req, i, int(fleet.n[i]), cfg, policy, ledger)
                event = None if why else planned_event(req, int(fleet.n[i]), cfg, policy,
                                                       (self.data.d_x, self.data.d_y))
                if event is not None:
                    decision = ledger.check_budget(event, cfg.epsilon_budget, cfg.delta)
                    why = None if decision.allowed else decision.reason
                if why:
                    answers.declined.append(i)
                    answers.reasons[i] = why
                    continue
                answers.accepted.append(i)
                if event is not None:
                    self._seqs[i] = ledger.reserve(event, received)
        return answers

    def secure_sum(self, r: int, phase: Phase, answers: Answers, request: dict[str, Any], codec: RoundCodec,
                   promised: int) -> Released:
        if phase == Phase.SUFFSTATS:
            return self._stats_release(r, answers.accepted, codec, promised)
        self._centre = request_centre(request)
        return self._dpsgd_release(r, answers.accepted, codec, promised)

    def settle(self, r: int, phase: Phase, answers: Answers, released: Released | None) -> dict[str, list[int | str]]:
        """Statistics round: every reservation completed, the heads signed. DP-SGD: who dropped out."""
        book = self.book
        if phase != Phase.SUFFSTATS:
            book.dropped[r] = sorted(set(answers.accepted) - set(released.arrived if released else []))
            return {}
        with ledger_batch(book.store):
            for i, seq in self._seqs.items():
                ledger = book.ledgers[i]
                ledger.complete(seq, float(ledger.epsilon(book.policies[i].delta)), status="done")
        return book.heads(self._seqs)

    def records_round(self, phase: Phase) -> bool:
        return phase == Phase.SUFFSTATS  # the DP-SGD phase is recorded as spans by close()

    def device_epsilons(self, r: int, phase: Phase, answers: Answers, released: Released | None) -> dict[str, Any]:
        """Every device's epsilon from its ledger after round ``r`` (fed_nessa.sim.fleet_epsilon)."""
        if phase == Phase.SUFFSTATS or r == self._dp_rounds[0]:
            self._spent.changed()
        book = self.book
        return self._spent.after(r, book.ledgers, [p.delta for p in book.policies], book.span_rounds)

    def round_done(self, r: int, rounds: int, entry: dict[str, Any]) -> None:
        entry["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if r < rounds and (r == 1 or r % PROGRESS_EVERY == 0):
            run_folder.write_summary(self.run_dir, self._progress_summary(rounds))

    def close(self, ledger: FederationLedger, pins: Pins) -> None:
        if self._dp_rounds:
            clips = {int(e["round"]): float(e[CLIP_COLUMN]) for e in self.state.history if CLIP_COLUMN in e}
            self.book.close_spans(self.cfg, self.plan, self._dp_rounds, ledger, pins, ENGINE, clips)

    def ending(self) -> Ending:
        """The fleet's summary (every device's epsilon from its ledger) and its pooled references."""
        return Ending(summary_of=lambda final: self._final_summary(final, self.book),
                      references=self._references if self.cfg.references else None,
                      card_extra=lambda summary: {"engine": ENGINE})

    def release(self) -> None:
        if self.book.store is not None:
            self.book.store.close()

    # -- statistics round ------------------------------------------------------------------
    def _stats_release(self, r: int, accepted: list[int], codec: RoundCodec, promised: int) -> Released:
        """The statistics sum of the devices that did not drop out (never computed below g)."""
        arrived = self._dropouts(accepted)
        unmask = may_unmask(len(arrived), promised)
        if unmask.release:
            total, arrived = self._stats_sum(arrived, self.book, r, codec)
            unmask = may_unmask(len(arrived), promised)
        if not unmask.release:
            return Released(None, arrived, len(arrived), refused=unmask.reason)
        return Released(total, arrived, len(arrived),
                        noise_arrivals=[self.book.policies[i].guaranteed_arrivals for i in arrived])

    def _dropouts(self, accepted: list[int]) -> list[int]:
        if self.cfg.dropout_rate <= 0:
            return list(accepted)
        keep = self._sim_rng.random(len(accepted)) >= self.cfg.dropout_rate
        return [i for i, k in zip(accepted, keep, strict=True) if k]

    def _stats_sum(self, arrived: list[int], book: DeviceBook, r: int,
                   codec: RoundCodec) -> tuple[np.ndarray, list[int]]:
        """The released statistics sum and the devices in it (a device failing its range check is not)."""
        cfg, fleet = self.cfg, self.fleet
        if isinstance(codec, IntegerCodec):  # distributed-mechanism = skellam
            shards = [(fleet.x[fleet.starts[i]:fleet.starts[i + 1]].cpu().numpy(),
                       fleet.y[fleet.starts[i]:fleet.starts[i + 1]].cpu().numpy()) for i in arrived]
            return fleet_integer.stats_sum(cfg, self.numerics, shards, [fleet.ids[i] for i in arrived],
                                           [book.policies[i].guaranteed_arrivals for i in arrived], r,
                                           codec), arrived
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
        return (modular_sum(payloads, codec, rounding_keys(cfg, r, sent)) if payloads
                else np.zeros(0, np.float32)), sent

    def _stats_weights(self) -> np.ndarray | None:
        """Each device's statistics weight (the mechanism's; None: every pair at weight 1)."""
        return self.model.mechanism.stats_weights(self.fleet.n)

    # -- DP-SGD rounds ---------------------------------------------------------------------
    def _dpsgd_release(self, r: int, accepted: list[int], codec: RoundCodec, promised: int) -> Released:
        """The DP-SGD sum of the devices that did not drop out or fail their own range check."""
        if isinstance(codec, IntegerCodec):  # distributed-mechanism = skellam
            return self._integer_dpsgd_release(r, accepted, codec, promised)
        cfg, book = self.cfg, self.book
        arrived = self._dropouts(accepted)
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
            return Released(None, sent, len(sent), refused=unmask.reason)
        if self.numerics == FleetNumerics.EXACT:
            total = modular_sum(payloads, codec, rounding_keys(cfg, r, sent))
        elif whole:
            total = self._fast_device_total(vectors[0], sent, book, r, codec)
        else:
            total = self._fast_gradient_total(rows, sent, book, r, codec)
        return Released(total, sent, len(sent), gradients=True,
                        noise_arrivals=[book.policies[i].guaranteed_arrivals for i in sent])

    def _integer_dpsgd_release(self, r: int, accepted: list[int], codec: IntegerCodec, promised: int) -> Released:
        """``skellam``: the devices' un-noised contributions (clipped-gradient sums of their Poisson samples, or
        their clipped updates), each rounded and given its integer share from its own stream (exact), or their
        float sum plus one draw of the summed Skellam noise and rounding error (fast; the projection onto the
        payload's ``vectors_per_device`` clips is not simulated: it acts only on a sample beyond that bound)."""
        book = self.book
        arrived = self._dropouts(accepted)
        unmask = may_unmask(len(arrived), promised)
        if not unmask.release:
            return Released(None, arrived, len(arrived), refused=unmask.reason)
        gs = [book.policies[i].guaranteed_arrivals for i in arrived]
        whole = self.model.mechanism.clips_whole_device
        if self.numerics == FleetNumerics.EXACT:
            vectors = (self._device_vectors(arrived, book, r, share=False) if whole
                       else self._exact_vectors(arrived, book, r, self._rates(arrived), share=False))
            total = fleet_integer.exact_sum(vectors, [self._streams.pop(i) for i in arrived], gs, codec)
        elif whole:
            total = fleet_integer.fast_sum(self.cfg, self._device_vectors(arrived, book, r)[0], gs, r, codec)
        else:
            rows, _owner = self._sample(arrived, r, self._rates(arrived))
            total = fleet_integer.fast_sum(self.cfg, self._clipped_sum(rows), gs, r, codec)
        return Released(total, arrived, len(arrived), gradients=True, noise_arrivals=gs)

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
        dp = self.cfg.dp_mode != DPMode.NONE
        out = self._clipped_sum(rows)
        if dp:
            var = self.model.mechanism.released_variance(Phase.DPSGD, self.plan,
                                                         [book.policies[i].guaranteed_arrivals for i in sent])
            out = out + summed_noise(self.cfg, r).normal(out.shape, math.sqrt(var))
        return fast_rounding(out, len(sent), codec, self.cfg, r)

    def _clipped_sum(self, rows: np.ndarray) -> np.ndarray:
        """The per-example clipped gradients of the fleet's ``rows`` summed (float64; unclipped without DP)."""
        cfg = self.cfg
        net = self._round_net()
        total = torch.zeros(sum(p.numel() for p in trainable(net)), device=self.torch_device)
        for c in range(0, len(rows), EXAMPLE_CHUNK):
            idx = torch.from_numpy(rows[c:c + EXAMPLE_CHUNK]).to(self.torch_device)
            s, _ = clipped_gradient_sums(net, self._targets(idx), self.fleet.y[idx], cfg.clip_norm,
                                         clip_enabled=cfg.dp_mode != DPMode.NONE)
            total += s
        self.model.net.to("cpu")
        return total.cpu().numpy().astype(np.float64)

    def _device_vectors(self, arrived: list[int], book: DeviceBook, r: int, share: bool = True) -> list[np.ndarray]:
        """Device level: each device's clipped mean gradient over its round's pairs.

        Fast numerics: ONE vector, the clipped vectors' sum (without per-device vectors);
        exact: per-device vectors plus each device's noise share from its own stream, in the
        draw order of ``model.training.device_update``. ``share = False`` (the integer mechanism):
        no share; each device's stream stays in ``self._streams`` for its encoder.
        """
        if self.cfg.device_update == DeviceUpdate.FEDAVG:
            return self._fedavg_vectors(arrived, book, r, share)
        cfg, fleet = self.cfg, self.fleet
        net = self._round_net()
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
                total += device_clipped_sum(net, self._targets(idx), fleet.y[idx], segments, len(chunk),
                                            cfg.device_clip_norm, clip_enabled=dp).double()
                continue
            vecs = device_clipped_vectors(net, self._targets(idx), fleet.y[idx], segments, len(chunk),
                                          cfg.device_clip_norm, clip_enabled=dp)
            host = vecs.cpu().numpy().astype(np.float64)
            for j, i in enumerate(chunk):
                vec = host[j]
                if dp and share:
                    stream = self._streams.pop(i)
                    std = self.model.mechanism.share_std(Phase.DPSGD, self.plan, book.policies[i].guaranteed_arrivals)
                    vec = vec + np.concatenate([np.asarray(stream.normal(tuple(p.shape), std)).reshape(-1)
                                                for p in params])
                vectors[i] = vec.astype(np.float32)
        self.model.net.to("cpu")
        if self.numerics == FleetNumerics.FAST:
            return [total.cpu().numpy()]
        return [vectors[i] for i in arrived]

    def _fedavg_vectors(self, arrived: list[int], book: DeviceBook, r: int, share: bool = True) -> list[np.ndarray]:
        """Device level, ``device-update = fedavg``: each device's clipped DP-FedAvg delta, by blocks.

        The update is :func:`fed_nessa.sim.fedavg.fedavg_block` (the ClientApp's
        :meth:`DeviceLevel.fedavg_vector` vectorised). Exact numerics: per-device vectors, each device's
        row orders and then its noise share drawn from its own stream in the device's order; fast:
        ONE vector, the clipped deltas' sum (the engine adds one draw of the summed shares).
        Clipped with or without DP, as on the device (the codec's range assumes it). ``share = False``:
        as :meth:`_device_vectors`.
        """
        cfg, fleet, mech = self.cfg, self.fleet, self.model.mechanism
        net = self._round_net()
        params = trainable(net)
        dp = cfg.dp_mode != DPMode.NONE
        clip, scale = self._round_clip()
        orders, streams = self._fedavg_orders(arrived, r)
        n = {i: int(fleet.n[i]) for i in arrived}
        total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=self.torch_device)
        bits = 0.0  # fast numerics: the centred bits' sum (their shares are in the one summed draw)
        vectors: dict[int, np.ndarray] = {}
        for chunk in _blocks(arrived, n, FEDAVG_BLOCK):
            width = max(n[i] for i in chunk)
            local = np.arange(width)
            # row l of device i is fleet row starts[i] + l; padding points at the device's first row
            idx = np.stack([fleet.starts[i] + np.where(local < n[i], local, 0) for i in chunk])
            gather = torch.from_numpy(idx).to(self.torch_device)
            steps = block_steps([orders[i] for i in chunk], cfg.local_batch)
            weights = mech.update_weights([n[i] for i in chunk])
            if self.numerics == FleetNumerics.FAST:
                summed = fedavg_block_sum(net, self._targets(gather), fleet.y[gather], steps, lr=cfg.local_lr,
                                          clip_norm=clip, weights=weights)
                total += summed.total
                bits += bit_sum(summed, clip)
                continue
            block = fedavg_block(net, self._targets(gather), fleet.y[gather], steps, lr=cfg.local_lr, clip_norm=clip,
                                 weights=weights)
            stds = [mech.share_std(Phase.DPSGD, self.plan, book.policies[i].guaranteed_arrivals, clip)
                    if dp and share else 0.0 for i in chunk]
            payloads = device_payloads(block, params, clip, scale, stds, [streams[i] for i in chunk])
            for i, vec in zip(chunk, payloads, strict=True):
                vectors[i] = vec
                if not share:
                    self._streams[i] = streams[i]
        self.model.net.to("cpu")
        if self.numerics == FleetNumerics.FAST:
            out = total.cpu().numpy()
            return [out if scale is None else np.append(out, bits * scale)]
        return [vectors[i] for i in arrived]

    def _round_net(self) -> nn.Module:
        """The net the devices' loss is taken on this round, on the engine's torch device: the server's, or with
        the round's loss centre a copy moved by it (fed_nessa/model/centre.py)."""
        net = self.model.net.to(self.torch_device)
        return net if self._centre is None else about_centre(net, self._centre)

    def _targets(self, idx: torch.Tensor) -> torch.Tensor:
        """The fleet's enrollment rows ``idx`` as this round's loss reads them (centred with a loss centre)."""
        x = self.fleet.x[idx]
        return x if self._centre is None else centred_targets(x, self._centre)

    def _round_clip(self) -> tuple[float, float | None]:
        """This DP-SGD round's clip (the adaptive clip's C_t the round config states, else ``device-clip-norm``)
        and the adaptive clip's bit scale (None: no bit)."""
        return round_clip(self.model.mechanism, self.plan, self.model.round_clip(Phase.DPSGD))

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
        if self.cfg.dp_mode != DPMode.NONE:  # the adaptive clip's scaled bit has the same share std
            var = self.model.mechanism.released_variance(Phase.DPSGD, self.plan,
                                                         [book.policies[i].guaranteed_arrivals for i in sent],
                                                         self.model.round_clip(Phase.DPSGD))
            out = out + summed_noise(self.cfg, r).normal(out.shape, math.sqrt(var))
        return fast_rounding(out, len(sent), codec, self.cfg, r)

    def _exact_vectors(self, arrived: list[int], book: DeviceBook, r: int, q: np.ndarray,
                       share: bool = True) -> list[np.ndarray]:
        """Per-device vectors with the Flower engine's draw order: the Poisson sample, then one Gaussian
        per trainable parameter tensor in order (as Opacus' ``add_noise``). ``share = False`` (the integer
        mechanism): no Gaussian; each device's stream stays in ``self._streams`` for its encoder."""
        cfg, fleet = self.cfg, self.fleet
        net = self._round_net()
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
            sums, _ = clipped_gradient_sums(net, self._targets(all_rows), fleet.y[all_rows], cfg.clip_norm,
                                            segments=segments, groups=len(chunk), clip_enabled=dp)
            sums_np = sums.cpu().numpy()
            for j, i in enumerate(chunk):
                vec = sums_np[j].astype(np.float32)
                if dp and share:
                    std = self.model.mechanism.share_std(Phase.DPSGD, self.plan, book.policies[i].guaranteed_arrivals)
                    noise = np.concatenate([streams[j].normal(tuple(p.shape), std).reshape(-1) for p in params])
                    vec = (vec + noise.astype(np.float32)).astype(np.float32)
                elif not share:
                    self._streams[i] = streams[j]
                vectors.append(vec)
        self.model.net.to("cpu")
        return vectors

    # -- evidence: pins and what each round sent ------------------------------------------
    def _model_ids(self) -> ModelIds:
        """The federation's model ids, stated in every round (a device with other models declines)."""
        return {"enroll_model": self.data.enroll_model, "runtime_model": self.data.runtime_model}

    # -- reporting -------------------------------------------------------------------------
    def _final_summary(self, final: dict[str, Any], book: DeviceBook) -> dict[str, Any]:
        """The summary with every device's epsilon from its ledger (the last round's entry states the same
        figures: fed_nessa.sim.fleet_epsilon) and the figures its unit implies (device level: example level)."""
        summary = self.summary(final, book.epsilons(self.cfg))
        for unit in self.model.mechanism.implied_units():
            implied = sorted(book.epsilons(self.cfg, unit.value).values()) or [0.0]
            summary["privacy"][f"epsilon_{unit.value}_max"] = implied[-1]
            summary["privacy"][f"epsilon_{unit.value}_median"] = statistics.median(implied)
        return summary

    def _references(self) -> dict[str, Any]:
        """Pooled non-DP NESSA and ridge on the fleet's pairs (:func:`pooled_references`); the fleet's
        pairs are released before the NESSA fit (memory at 30k devices)."""
        def drop_pairs() -> None:
            self.fleet.x, self.fleet.y = self.fleet.x[:0], self.fleet.y[:0]

        return pooled_references(self.cfg, self.data, self.model.comparator(), self.fleet.x, self.fleet.y,
                                 release=drop_pairs)

    def _progress_summary(self, rounds: int) -> dict[str, Any]:
        """The light summary written while the run goes on: rounds so far, no ``final`` (a run in progress)."""
        return {"config": run_folder.portable_config(self.cfg.to_run_config()), "rounds": self.state.history,
                "final": None, "progress": {"rounds_done": len(self.state.history), "rounds": rounds},
                "noise_plan": run_folder.noise_plan_block(self.plan),
                "engine": {"name": ENGINE, "numerics": str(self.numerics), "device": str(self.torch_device),
                           "devices": len(self.fleet.ids), "pairs": int(self.fleet.starts[-1])}}

    def summary(self, final: dict[str, Any], eps: dict[str, float]) -> dict[str, Any]:
        seconds = [e["seconds"] for e in self.state.history if e["phase"] == str(Phase.DPSGD)]
        return {
            "config": run_folder.portable_config(self.cfg.to_run_config()),
            "rounds": self.state.history,
            "final": final,
            "privacy": run_folder.privacy_block(self.cfg, eps, len(self.fleet.ids),
                                                noise_source=noise_statement(self.numerics, self.cfg),
                                                ledger_layout=self.cfg.ledger_layout),
            "noise_plan": run_folder.noise_plan_block(self.plan),
            "secure_aggregation": {**run_folder.secagg_block(self.cfg, self.state.saturated_total),
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


def reference_rows_of(cfg: FederationConfig, total: int) -> np.ndarray:
    """The pairs the pooled NESSA reference trains on: every one, or a seeded sample of :data:`REFERENCE_MAX_PAIRS`."""
    if total <= REFERENCE_MAX_PAIRS:
        return np.arange(total)
    return np.sort(np.random.default_rng([cfg.seed, 13]).choice(total, REFERENCE_MAX_PAIRS, replace=False))


def reference_train_config(cfg: FederationConfig, pairs: int) -> TrainConfig:
    """The pooled NESSA reference's optimisation: its fixed step budget in epochs of batch 256, Adam 1e-3."""
    from fed_nessa.evaluation.centralised import REFERENCE_STEPS
    from fed_nessa.model.training import TrainConfig

    return TrainConfig(epochs=max(1, min(20, math.ceil(REFERENCE_STEPS * 256 / pairs))), batch_size=256, lr=1e-3,
                       seed=cfg.seed)


def pooled_references(cfg: FederationConfig, data: Population, federated: Any, x: torch.Tensor,
                      y: torch.Tensor, release: Callable[[], None] | None = None) -> dict[str, Any]:
    """Pooled non-DP NESSA and ridge on the pairs ``x, y`` (the same references as the Flower engine).

    Ridge comes from sufficient statistics summed in chunks (exactly centralised ridge, any number
    of pairs); the NESSA reference trains its fixed step budget on at most
    :data:`REFERENCE_MAX_PAIRS` pairs drawn at random. ``release`` is called once the pairs are no
    longer needed, before the NESSA fit.
    """
    from fed_nessa.model.aligners import AlignerInfo, NessaAligner, NessaConfig, RidgeAligner
    from fed_nessa.model.aligners.base import l2_normalize
    from fed_nessa.model.aligners.linear import RidgeStats, ridge_from_stats

    info = AlignerInfo(d_x=data.d_x, d_y=data.d_y, enroll_model=data.enroll_model, runtime_model=data.runtime_model)
    total = len(x)
    stats: RidgeStats | None = None
    for c in range(0, total, EXAMPLE_CHUNK):
        part = RidgeStats.from_pairs(l2_normalize(x[c:c + EXAMPLE_CHUNK].cpu().numpy()),
                                     l2_normalize(y[c:c + EXAMPLE_CHUNK].cpu().numpy()))
        stats = part if stats is None else stats + part
    assert stats is not None
    ridge = RidgeAligner(info, alpha=cfg.ridge_alpha)
    ridge.W, ridge.b = ridge_from_stats(stats, cfg.ridge_alpha)
    rows = reference_rows_of(cfg, total)
    x_ref, y_ref = x[rows].cpu().numpy(), y[rows].cpu().numpy()
    if release is not None:
        release()
    nessa = NessaAligner(AlignerInfo(**{k: getattr(info, k) for k in ("d_x", "d_y", "enroll_model", "runtime_model")}),
                         NessaConfig(hidden=cfg.hidden, depth=cfg.depth)).fit(
        x_ref, y_ref, train_cfg=reference_train_config(cfg, len(rows)))
    aligners = {"federated": federated, "centralised_nessa": nessa, "ridge": ridge}
    return reference_rows(evaluate_held_out(*data.evaluation(), aligners))


def noise_statement(numerics: FleetNumerics, cfg: FederationConfig) -> str:
    """Where this simulation's draws came from (a deployed device draws all of them from the OS CSPRNG)."""
    if cfg.integer_noise:
        return fleet_integer.noise_statement(numerics)
    if numerics == FleetNumerics.EXACT:
        return ("fleet engine, exact numerics: every device's Gaussian share and Poisson sample drawn from the OS "
                "CSPRNG, as on a device; residual risk: floating-point Gaussian samplers (Mironov, CCS 2012)")
    return ("fleet engine, distribution-equivalent numerics (a simulation): the summed Gaussian noise is one draw "
            "from the OS CSPRNG; the Poisson samples come from a PCG64 stream keyed with 128 fresh bits of OS "
            "entropy per round; the rounding errors from their distribution. A deployed device draws its own "
            "noise share and sample from the OS CSPRNG")


def run_fleet(cfg: FederationConfig, policy: DevicePolicy, *, device: str = "cpu",
              progress: Progress | None = None) -> dict[str, Any]:
    """Build the fleet's devices in memory and run every round with the fleet engine."""
    from fed_nessa.data.registry import load_federation_data

    t0 = time.perf_counter()
    engine = FleetEngine(cfg, policy, load_federation_data(cfg, None), device=device, progress=progress)
    summary = engine.run()
    summary.setdefault("timing", {})["total_seconds"] = time.perf_counter() - t0
    return summary


__all__ = ["ENGINE", "FleetEngine", "FleetError", "ReplyStatus", "run_fleet"]
