"""A block worker: a contiguous block of lazy devices that answers a round with ONE partial sum.

The fleet engine (:mod:`fed_nessa.sim.fleet`) holds every pair and every ``DeviceLedger`` of the
fleet in memory, which stops it near 3x10^4 devices. A worker owns devices ``first .. stop - 1``
of a :class:`~fed_nessa.data.lazy_population.LazyPopulation` (their pairs regenerated on demand,
or cached when ``BlockSpec.cache`` says the block fits), their keys (derived from the run's seed)
and their ledgers, in ITS OWN ledger store (one SQLite file per block, the run's seed: a worker
never waits on another's transaction; the driver merges the parts into the run's store at the
end, so the audit sees one store). A ledger is opened for the step that needs it and dropped.

A round is three calls, each answered for the whole block (the driver keeps the protocol):

* :meth:`BlockWorker.reserve`: each device's model and policy checks, its budget check and its
  durable reserve (one transaction per block, committed before any mechanism runs);
* :meth:`BlockWorker.contribute`: the block's partial sum over the devices that reserved:
  ``exact`` numerics: each device's vector and noise share from its own stream, its codec step
  and range check, Flower's quantization, summed modulo SecAgg+'s modulus
  (:func:`~fed_nessa.sim.fleet_numerics.partial_modular_sum`); ``fast``: the float64 sum of the
  block's vectors plus ONE Gaussian draw of the block's summed noise shares;
* :meth:`BlockWorker.complete`: each device's complete entry; returns the ledger heads the
  federation ledger's record signs.

Under ``distributed-mechanism = skellam`` (the round's codec an
:class:`~fed_nessa.federated.skellam_mechanism.IntegerCodec`) the partial sum is the fleet engine's
(:mod:`fed_nessa.sim.fleet_integer`) over the block: ``exact``: each device's un-noised vector
encoded as its device encodes it (projection, public-seed rotation, rounding, integer Skellam share
from its own stream), summed modulo 2^bits (:func:`~fed_nessa.sim.fleet_integer.field_sum`); the
driver adds the blocks' parts in the field and decodes once. ``fast``: the float64 sum of the
block's projected vectors without noise; the driver adds ONE draw of the whole sum's Skellam noise
and rounding error (:func:`~fed_nessa.sim.fleet_integer.fast_sum`), as the fleet engine does.

DP-FedAvg's adaptive clip (``clip-target-quantile > 0``): the request states the round's C_t
(``SumRequest.clip``, from the round config); each device's delta is clipped to it and its centred bit
appended as the fleet engine appends it (:func:`~fed_nessa.sim.fedavg.device_payloads`: the delta's share,
then the bit's, from the device's own stream; fast numerics: :func:`~fed_nessa.sim.fedavg.bit_sum`, its
shares in the block's one draw), so the partial sum carries the bit coordinate the driver decodes.

Noise numbers come from the run's mechanism (:mod:`fed_nessa.federated.mechanism`) only.
"""

from __future__ import annotations

import copy
import math
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fed_nessa.config import DevicePolicy, DeviceUpdate, DPMode, FederationConfig, FleetNumerics, Phase
from fed_nessa.data.blocks import DeviceBlock, block_ranges
from fed_nessa.data.lazy_population import LazyPopulation
from fed_nessa.data.synthetic import PopulationConfig, household_counts
from fed_nessa.federated import suffstats
from fed_nessa.federated.codec import SaturationError, SecAggCodec
from fed_nessa.federated.cohort import sample_positions
from fed_nessa.federated.device import RoundRequest, model_refusal, planned_event, policy_refusal
from fed_nessa.federated.layout import trainable
from fed_nessa.federated.mechanism import device_subset, local_orders, mechanism_for
from fed_nessa.federated.noise_plan import NoisePlan
from fed_nessa.federated.skellam_mechanism import IntegerCodec, RoundCodec
from fed_nessa.model.centre import about_centre, centred, centred_targets
from fed_nessa.model.training import with_noise_share
from fed_nessa.privacy.events import DPEvent
from fed_nessa.privacy.ledger import DEVICE_KEYS, DeviceLedger
from fed_nessa.privacy.store import LedgerStore
from fed_nessa.randomness import NoiseSource, noise_source
from fed_nessa.sim import fleet_integer
from fed_nessa.sim.fedavg import (
    BlockDeltas,
    BlockSum,
    bit_sum,
    block_steps,
    device_payloads,
    fedavg_block,
    fedavg_block_sum,
    pad_block,
    round_clip,
)
from fed_nessa.sim.fleet import FEDAVG_BLOCK, device_id
from fed_nessa.sim.fleet_ledgers import span_event
from fed_nessa.sim.fleet_numerics import UNIFORMS_STREAM, partial_modular_sum, rounding_keys
from fed_nessa.sim.ghost import device_clipped_sum, device_clipped_vectors

#: Devices generated and computed on at once inside a block (bounds a worker's memory: ~1 GiB at ~114 pairs each).
CHUNK_DEVICES = 2048
#: Pairs per statistics-vector call in fast numerics (its float64 temporaries: ~0.25 GiB).
STATS_ROWS = 65_536
#: The folder of a run holding each block's ledger store until the driver merges them.
BLOCK_STORES = "ledger-blocks"
#: The stream name of a block's one draw of summed noise (fast numerics).
BLOCK_NOISE = "block"


class BlockError(ValueError):
    """A round a block worker cannot run (a mode it does not simulate)."""


@dataclass(frozen=True)
class BlockSpec:
    """What a worker needs to rebuild its devices anywhere (picklable: it is sent to a Ray actor)."""

    population: PopulationConfig
    first: int
    stop: int
    run_dir: str
    key_folder: str  # the key store's folder holding the run's device-key seed
    cache: bool = False  # hold the block's pairs between rounds (when they fit in memory)
    device: str = "cpu"  # where the round maths run (``cuda``: the actor's GPU)

    @property
    def store_dir(self) -> Path:
        """This block's own ledger store's folder (merged into the run's store at the end)."""
        return Path(self.run_dir) / BLOCK_STORES / f"{self.first:07d}-{self.stop:07d}"


@dataclass(frozen=True)
class ReserveRequest:
    """Reserve ``rounds`` (one statistics round, or a DP-SGD phase's consecutive rounds as one span)."""

    request: RoundRequest  # what the devices check (its round is the first of ``rounds``)
    rounds: tuple[int, ...]
    received: dict[str, Any]  # what the server sent, signed into each reserve entry


@dataclass(frozen=True)
class ReserveReply:
    """A block's answer to a reserve: who reserved, who declined and why, the devices' key pins."""

    first: int
    accepted: np.ndarray  # global indices of the devices that reserved (or joined without DP)
    declined: np.ndarray  # global indices of the devices that declined
    reasons: dict[int, str]  # global index of a declined device -> why
    arrivals: dict[int, int]  # each accepted device's policy g -> how many
    pins: dict[int, str]  # global index -> its key fingerprint (devices whose ledger is new)


@dataclass(frozen=True)
class SumRequest:
    """One round's contribution: the phase's model (DP-SGD) and the round's codec and plan."""

    phase: Phase
    round: int
    codec: RoundCodec  # the Gaussian's SecAgg+ codec, or the integer mechanism's field (skellam)
    plan: NoisePlan
    net: nn.Module | None = None  # the global model (DP-SGD rounds)
    clip: float | None = None  # the round's adaptive clip C_t as its round config states it (None: a fixed clip)
    centre: np.ndarray | None = None  # the round's loss centre as its round config states it (None: the plain loss)


@dataclass(frozen=True)
class PartialSum:
    """A block's one partial sum and the devices in it."""

    first: int
    total: np.ndarray  # exact: int64 modular sum of the payloads; fast: float64 sum (with the block's Gaussian noise)
    sent: int  # devices in the sum
    failed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # own range check failed
    arrivals: dict[int, int] = field(default_factory=dict)  # g of the devices in the sum -> how many


@dataclass(frozen=True)
class History:
    """Devices of a block sharing one ledger history: their events, delta and scheduled DP-SGD rounds."""

    events: tuple[DPEvent, ...]
    delta: float
    scheduled: tuple[int, ...]  # the DP-SGD rounds of the span the devices joined (empty: none)
    count: int


@dataclass(frozen=True)
class CompleteRequest:
    """Close the reservations of the last reserve (``received``: a span's chain of what was received)."""

    status: str = "done"
    received: dict[str, Any] | None = None


@dataclass(frozen=True)
class CompleteReply:
    """The closed devices' ledger heads ``[seq, sha256]`` (the server signs them) and epsilons after."""

    heads: dict[str, list[Any]]
    epsilons: dict[str, float]


class BlockWorker:
    """Devices ``spec.first .. spec.stop - 1``: their pairs, keys, ledgers and partial sums."""

    def __init__(self, spec: BlockSpec, cfg: FederationConfig, policy: DevicePolicy) -> None:
        if cfg.dp_mode == DPMode.LOCAL:
            raise BlockError("the block engine simulates distributed DP (and dp-mode none), not local mode")
        self.spec, self.cfg, self.policy = spec, cfg, policy
        self.population = LazyPopulation(spec.population)
        models = self.population.world.models
        #: The devices' own shard dimensions (d_x, d_y): they size the integer mechanism's payload.
        self.dims = (models[self.population.enroll_model].dim, models[self.population.runtime_model].dim)
        self.mechanism = mechanism_for(cfg)
        self.numerics = FleetNumerics(cfg.fleet_numerics)
        pc = spec.population
        # Pair counts are the first draws of each device's stream: cheap, and needed before any pair is.
        self.n = np.array([int(household_counts(pc.seed, j, pc.speakers_per_device, pc.utts_per_speaker)[1].sum())
                           for j in range(spec.first, spec.stop)], np.int64)
        self.ids = [device_id(j) for j in range(spec.first, spec.stop)]
        spec.store_dir.mkdir(parents=True, exist_ok=True)
        self.store = LedgerStore.open(spec.store_dir, spec.key_folder)
        self._cache: DeviceBlock | None = None
        self._seqs: dict[int, int] = {}  # local index -> seq of its open reservation
        self._accepted = np.zeros(0, np.int64)  # local indices that reserved in the last reserve
        self._g = np.zeros(0, np.int64)  # their policies' g
        # Each device's ledger history as of its last reserve, as a hashable key (absent: never asked, no
        # events): (its events' keys, delta, scheduled DP-SGD rounds); the key's events in ``_events``.
        self._history: dict[int, tuple[Any, float, tuple[int, ...]]] = {}
        self._interned: dict[Any, Any] = {}
        self._events: dict[Any, tuple[DPEvent, ...]] = {}
        self._scheduled: dict[int, tuple[int, ...]] = {}  # local index -> DP-SGD rounds its span covers

    # -- data ------------------------------------------------------------------------------
    def chunks(self) -> Iterator[DeviceBlock]:
        """The pairs of the chunks holding an accepted device, :data:`CHUNK_DEVICES` devices at a time
        (views of the cached block, or generated; a chunk no accepted device is in is never generated)."""
        first, stop = self.spec.first, self.spec.stop
        if self.spec.cache and self._cache is None:
            self._cache = self.population.block(first, stop)
        for a, b in block_ranges(stop - first, CHUNK_DEVICES):
            if not ((self._accepted >= a) & (self._accepted < b)).any():
                continue
            yield _view(self._cache, a, b) if self._cache is not None else self.population.block(first + a, first + b)

    # -- ledgers ---------------------------------------------------------------------------
    def _ledger(self, i: int) -> DeviceLedger:
        dev = self.ids[i]
        return DeviceLedger.open(Path(self.spec.run_dir) / DEVICE_KEYS / dev, dev, policy=self.policy, store=self.store)

    def reserve(self, req: ReserveRequest) -> ReserveReply:
        """Each cohort device's checks and durable reserve (one transaction; see the module doc)."""
        cfg, first = self.cfg, self.spec.first
        fleet = req.request.fleet_size
        cohort = sample_positions(fleet, cfg, req.rounds[0], req.request.phase)
        mine = cohort[(cohort >= first) & (cohort < self.spec.stop)] - first
        models = self.population.model_ids
        enroll, runtime = models[self.population.enroll_model], models[self.population.runtime_model]
        accepted, declined, g, pins = [], [], [], {}
        reasons: dict[int, str] = {}
        self._seqs = {}
        span = req.request.phase == Phase.DPSGD
        request = replace(req.request, dims=self.dims).at_clip(req.request.clip)  # each device sizes by its shard
        with self.store.batch():
            for i in mine.tolist():
                ledger = self._ledger(i)
                policy = ledger.policy or self.policy
                if len(ledger.entries()) == 1:  # a new ledger (its header alone): the server pins its key once
                    pins[i + first] = ledger.key_fingerprint
                why = (model_refusal(request, enroll, runtime)
                       or policy_refusal(request, int(self.n[i]), cfg, policy, ledger))
                event = None if why else _span(planned_event(request, int(self.n[i]), cfg, policy, self.dims),
                                               req.rounds)
                if event is not None:
                    decision = ledger.check_budget(event, cfg.epsilon_budget, cfg.delta)
                    why = None if decision.allowed else decision.reason
                if why:
                    declined.append(i)
                    reasons[i + first] = why
                    self._remember(i, ledger, policy.delta)
                    continue
                accepted.append(i)
                g.append(policy.guaranteed_arrivals)
                if span:
                    self._scheduled[i] = tuple(req.rounds)
                if event is not None:
                    self._seqs[i] = ledger.reserve(event, req.received)
                self._remember(i, ledger, policy.delta)
        self._accepted, self._g = np.asarray(accepted, np.int64), np.asarray(g, np.int64)
        return ReserveReply(first, self._accepted + first, np.asarray(declined, np.int64) + first, reasons,
                            _counts(self._g), pins)

    def _remember(self, i: int, ledger: DeviceLedger, delta: float) -> None:
        """Device ``i``'s history as it stands; equal histories share one key and one tuple of events (memory
        at 10^5 devices)."""
        events, scheduled = tuple(ledger.events()), self._scheduled.get(i, ())
        key = (tuple(_event_key(e) for e in events), delta, scheduled)
        self._history[i] = self._interned.setdefault(key, key)
        self._events.setdefault(key, events)

    def histories(self, _request: object = None) -> list[History]:
        """The block's distinct ledger histories (as of each device's last reserve) and how many devices
        hold each; devices never asked hold none. The driver composes each once (the round's epsilon)."""
        counts = Counter(self._history.values())
        out = [History(self._events[key], key[1], key[2], k) for key, k in counts.items()]
        unseen = len(self.ids) - len(self._history)
        if unseen:
            out.append(History((), self.policy.delta, (), unseen))
        return out

    def complete(self, req: CompleteRequest) -> CompleteReply:
        """Close every open reservation; returns each such device's ledger head and epsilon."""
        heads: dict[str, list[Any]] = {}
        spent: dict[str, float] = {}
        epsilons: dict[tuple[Any, ...], float] = {}  # identical histories are composed once
        with self.store.batch():
            for i, seq in self._seqs.items():
                ledger = self._ledger(i)
                delta = (ledger.policy or self.policy).delta
                key = (tuple(_event_key(e) for e in ledger.events()), delta)
                if key not in epsilons:
                    epsilons[key] = float(ledger.epsilon(delta))
                ledger.complete(seq, epsilons[key], status=req.status, received=req.received)
                heads[self.ids[i]] = list(ledger.head())
                spent[self.ids[i]] = epsilons[key]
        self._seqs = {}
        return CompleteReply(heads, spent)

    # -- the partial sum -------------------------------------------------------------------
    def contribute(self, req: SumRequest) -> PartialSum:
        """The block's one partial sum over the devices of the last reserve (see the module doc)."""
        if req.phase == Phase.DPSGD and not self.mechanism.clips_whole_device:
            raise BlockError("the block engine runs device-level DP-SGD rounds (privacy-unit = device) only")
        if req.phase == Phase.DPSGD:
            round_clip(self.mechanism, req.plan, req.clip)  # an adaptive run's round states its C_t, or is refused
        if isinstance(req.codec, IntegerCodec):
            return self._integer_exact(req, req.codec) if self.numerics == FleetNumerics.EXACT else self._fast(req)
        if self.numerics == FleetNumerics.EXACT:
            return self._exact(req, req.codec)
        return self._fast(req)

    def _std(self, phase: Phase, plan: NoisePlan, g: int, clip: float | None = None) -> float:
        """A device's noise share (``clip``: the round's adaptive C_t, as its round config states it)."""
        return self.mechanism.share_std(phase, plan, g, clip)

    def _exact(self, req: SumRequest, codec: SecAggCodec) -> PartialSum:
        """Per device: its vector, its share from its own stream, its codec step; summed modulo the field."""
        first = self.spec.first
        g_of = dict(zip(self._accepted.tolist(), self._g.tolist(), strict=True))
        payloads, failed, sent_g, sent = [], [], [], []
        for chunk in self.chunks():
            lo = chunk.first - first
            local = [i for i in self._accepted.tolist() if lo <= i < lo + chunk.devices]
            streams = self._streams(req.round, local)
            for i, vec in zip(local, self._device_vectors(req, chunk, local, streams), strict=True):
                try:
                    payloads.append(codec.encode(vec)[0])
                    sent_g.append(g_of[i])
                    sent.append(i + first)
                except SaturationError:
                    failed.append(i + first)
        keys = rounding_keys(self.cfg, req.round, sent)  # the rounding replays only when the noise does
        total = partial_modular_sum(payloads, codec, keys) if payloads else np.zeros(0, np.int64)
        return PartialSum(first, total, len(payloads), np.asarray(failed, np.int64), _counts(np.asarray(sent_g)))

    def _integer_exact(self, req: SumRequest, codec: IntegerCodec) -> PartialSum:
        """``skellam``: the block's devices' field elements, each device's un-noised vector encoded from its own
        stream (:func:`fed_nessa.sim.fleet_integer.field_sum`, the fleet engine's), summed modulo 2^bits."""
        first, modulus = self.spec.first, codec.params.modulus
        g_of = dict(zip(self._accepted.tolist(), self._g.tolist(), strict=True))
        total: np.ndarray | None = None
        for chunk in self.chunks():
            lo = chunk.first - first
            local = [i for i in self._accepted.tolist() if lo <= i < lo + chunk.devices]
            streams = self._streams(req.round, local)
            vectors = self._device_vectors(req, chunk, local, streams, share=False)
            part = fleet_integer.field_sum(vectors, [streams[i] for i in local], [g_of[i] for i in local], codec)
            total = part if total is None else np.mod(total + part, modulus)
        if total is None:
            return PartialSum(first, np.zeros(0, np.int64), 0)
        return PartialSum(first, total, len(self._accepted), arrivals=_counts(self._g))

    def _streams(self, round_num: int, local: list[int]) -> dict[int, NoiseSource]:
        """Each device's own noise stream of the round (the one its device draws from; fleet engine's keys)."""
        cfg = self.cfg
        return {i: noise_source(cfg.reproducible_noise, cfg.seed, "device", self.ids[i], round_num) for i in local}

    def _device_vectors(self, req: SumRequest, chunk: DeviceBlock, local: list[int], streams: dict[int, NoiseSource],
                        share: bool = True) -> list[np.ndarray]:
        """The chunk's devices' noisy vectors, each drawn as its device draws it (fleet engine's order).

        ``share = False`` (the integer mechanism): each device's vector without its Gaussian share, as its
        encoder takes it (statistics in float64; a DP-SGD vector as float32, as the device's); what the device
        draws before its share (its rows) is drawn from ``streams``, which its encoder then continues.
        """
        cfg, first = self.cfg, self.spec.first
        dp = cfg.dp_mode != DPMode.NONE and share
        g_of = dict(zip(self._accepted.tolist(), self._g.tolist(), strict=True))
        rows = {i: _rows(chunk, i + first) for i in local}
        if req.phase == Phase.SUFFSTATS:
            out = []
            for i in local:
                vec = (suffstats.device_vector(chunk.x[rows[i]], chunk.y[rows[i]])
                       * self.mechanism.stats_weight(int(self.n[i])))
                if not share:
                    out.append(vec)
                    continue
                if dp:
                    vec = vec + streams[i].normal(vec.shape, self._std(Phase.SUFFSTATS, req.plan, g_of[i]))
                out.append(np.asarray(vec, np.float32))
            return out
        assert req.net is not None
        params = trainable(req.net)
        stds = [self._std(Phase.DPSGD, req.plan, g_of[i], req.clip) if dp else 0.0 for i in local]
        if cfg.device_update == DeviceUpdate.FEDAVG:  # the row orders, the share, the bit (fedavg_vector's order)
            orders = [local_orders(streams[i], len(rows[i]), cfg.local_epochs) for i in local]
            return self._fedavg_payloads(req, chunk, [rows[i] for i in local], orders, stds,
                                         [streams[i] for i in local])
        picked = {i: rows[i][device_subset(streams[i].uniform(len(rows[i])), cfg.device_batch)] for i in local}
        vecs = self._gradients(req, chunk, [picked[i] for i in local], per_device=True)
        return [with_noise_share(vecs[j], params, stds[j], streams[i]) for j, i in enumerate(local)]

    def _gradients(self, req: SumRequest, chunk: DeviceBlock, rows: list[np.ndarray], per_device: bool) -> np.ndarray:
        """Each device's mean gradient over ``rows`` clipped as one vector (per device, or their sum), of the loss
        about the round's centre if it states one."""
        cfg = self.cfg
        idx = np.concatenate(rows)
        on = torch.device(self.spec.device)
        seg = torch.from_numpy(np.repeat(np.arange(len(rows)), [len(r) for r in rows])).to(on)
        assert req.net is not None
        net, x_rows = centred(req.net, chunk.x[idx], req.centre)
        x, y = torch.from_numpy(x_rows).to(on), torch.from_numpy(chunk.y[idx]).to(on)
        if on.type != "cpu":
            net = copy.deepcopy(net).to(on)  # the request's net stays where the driver keeps it
        fn = device_clipped_vectors if per_device else device_clipped_sum
        out = fn(net, x, y, seg, len(rows), cfg.device_clip_norm, clip_enabled=cfg.dp_mode != DPMode.NONE)
        return out.cpu().numpy().astype(np.float64)

    def _fedavg(self, req: SumRequest, chunk: DeviceBlock, rows: list[np.ndarray], orders: list[list[np.ndarray]],
                clip: float, summed: bool = False) -> Iterator[tuple[list[int], BlockDeltas | BlockSum]]:
        """The devices' DP-FedAvg deltas clipped to the round's ``clip`` and their norms
        (:func:`fed_nessa.sim.fedavg.fedavg_block`, clipped with or without DP, as on the device), :data:`FEDAVG_BLOCK`
        devices per vectorised pass: each pass's positions in ``rows`` and its deltas (similar sizes together);
        ``summed``: each pass's clipped deltas summed instead (:func:`fed_nessa.sim.fedavg.fedavg_block_sum`);
        the loss about the round's centre if it states one."""
        cfg, on = self.cfg, torch.device(self.spec.device)
        assert req.net is not None
        net = req.net if req.centre is None else about_centre(req.net, req.centre)
        if on.type != "cpu":
            net = copy.deepcopy(net).to(on)
        by_size = np.argsort([len(r) for r in rows], kind="stable")  # similar sizes together: little padding
        for s in range(0, len(rows), FEDAVG_BLOCK):
            part = by_size[s:s + FEDAVG_BLOCK].tolist()
            xs = [chunk.x[rows[j]] for j in part]
            xs = xs if req.centre is None else [centred_targets(a, req.centre) for a in xs]
            x, y = pad_block(xs, [chunk.y[rows[j]] for j in part])
            steps = block_steps([orders[j] for j in part], cfg.local_batch)
            update = fedavg_block_sum if summed else fedavg_block
            weights = self.mechanism.update_weights([len(rows[j]) for j in part])
            yield part, update(net, x.to(on), y.to(on), steps, lr=cfg.local_lr, clip_norm=clip, weights=weights)

    def _fedavg_payloads(self, req: SumRequest, chunk: DeviceBlock, rows: list[np.ndarray],
                         orders: list[list[np.ndarray]], stds: list[float],
                         streams: list[NoiseSource]) -> list[np.ndarray]:
        """Exact numerics: each device's DP-FedAvg payload at the round's clip, in the devices' order
        (:func:`fed_nessa.sim.fedavg.device_payloads`: the delta's share, then the adaptive clip's bit)."""
        assert req.net is not None
        clip, scale = round_clip(self.mechanism, req.plan, req.clip)
        params = trainable(req.net)
        out: list[np.ndarray] = [np.zeros(0)] * len(rows)
        for part, deltas in self._fedavg(req, chunk, rows, orders, clip):
            assert isinstance(deltas, BlockDeltas)
            payloads = device_payloads(deltas, params, clip, scale, [stds[j] for j in part], [streams[j] for j in part])
            for j, vec in zip(part, payloads, strict=True):
                out[j] = vec
        return out

    def _fedavg_sum(self, req: SumRequest, chunk: DeviceBlock, rows: list[np.ndarray],
                    orders: list[list[np.ndarray]]) -> np.ndarray:
        """Fast numerics: the chunk's clipped deltas summed (float64) and, with the adaptive clip, its centred
        bits summed and scaled as one more coordinate (:func:`fed_nessa.sim.fedavg.bit_sum`; the fleet engine's)."""
        assert req.net is not None
        clip, scale = round_clip(self.mechanism, req.plan, req.clip)
        total: torch.Tensor | None = None
        bits = 0.0
        for _part, summed in self._fedavg(req, chunk, rows, orders, clip, summed=True):
            assert isinstance(summed, BlockSum)
            part_sum = summed.total.cpu()
            total = part_sum if total is None else total + part_sum
            bits += bit_sum(summed, clip)
        assert total is not None
        out = total.numpy()
        return out if scale is None else np.append(out, bits * scale)

    def _fast(self, req: SumRequest) -> PartialSum:
        """The block's float64 sum of its devices' vectors plus ONE draw of its summed noise shares (Gaussian);
        ``skellam``: without noise, each device's statistics projected as its encoder projects them (the driver
        draws the whole sum's Skellam noise and rounding error once: the fleet engine's fast numerics)."""
        cfg, first = self.cfg, self.spec.first
        integer = req.codec if isinstance(req.codec, IntegerCodec) else None
        accepted = set(self._accepted.tolist())
        weights = self.mechanism.stats_weights(self.n)
        total: np.ndarray | None = None
        for chunk in self.chunks():
            lo = chunk.first - first
            local = [i for i in range(lo, lo + chunk.devices) if i in accepted]
            if not local:
                continue
            rows = [_rows(chunk, i + first) for i in local]
            if req.phase == Phase.SUFFSTATS and integer is not None:
                part = fleet_integer.projected_sum(
                    [suffstats.device_vector(chunk.x[r], chunk.y[r]) * self.mechanism.stats_weight(int(self.n[i]))
                     for i, r in zip(local, rows, strict=True)], integer)
            elif req.phase == Phase.SUFFSTATS:
                idx = np.concatenate(rows)
                w = None if weights is None else np.repeat(weights[local], [len(r) for r in rows])
                part = np.zeros(suffstats.vector_size(chunk.x.shape[1], chunk.y.shape[1]))
                for c in range(0, len(idx), STATS_ROWS):  # linear in the pairs: float64 temporaries bounded
                    rc, wc = idx[c:c + STATS_ROWS], None if w is None else w[c:c + STATS_ROWS]
                    part += suffstats.device_vector(chunk.x[rc], chunk.y[rc], wc)
            else:
                assert req.net is not None
                at = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
                if cfg.device_update == DeviceUpdate.FEDAVG:  # per epoch, a uniform permutation of each device's rows
                    keys = self._uniforms(req.round, chunk.first, int(at[-1]) * cfg.local_epochs)
                    keys = keys.reshape(cfg.local_epochs, -1)
                    orders = [[np.argsort(k[a:b], kind="stable") for k in keys] for a, b in zip(at[:-1], at[1:])]
                    part = self._fedavg_sum(req, chunk, rows, orders)
                else:
                    keys = self._uniforms(req.round, chunk.first, int(at[-1]))
                    picked = [r[device_subset(keys[a:b], cfg.device_batch)] for r, a, b in zip(rows, at[:-1], at[1:])]
                    part = self._gradients(req, chunk, picked, per_device=False)
            total = part if total is None else total + part
        if total is None:
            return PartialSum(first, np.zeros(0), 0)
        if cfg.dp_mode != DPMode.NONE and integer is None:
            var = self.mechanism.released_variance(req.phase, req.plan, self._g.tolist(), req.clip)
            noise = noise_source(cfg.reproducible_noise, cfg.seed, BLOCK_NOISE, first, req.round)
            total = total + noise.normal(total.shape, math.sqrt(var))
        return PartialSum(first, np.asarray(total, np.float64), len(self._accepted), arrivals=_counts(self._g))

    def _uniforms(self, round_num: int, chunk_first: int, n: int) -> np.ndarray:
        """Fast numerics: a chunk's row-selection keys (keyed by (seed, round, chunk) when reproducible)."""
        if self.cfg.reproducible_noise:
            return np.random.default_rng([self.cfg.seed, UNIFORMS_STREAM, round_num, chunk_first]).random(n)
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(secrets.randbits(128)))).random(n)

    def usage(self, _request: object = None) -> dict[str, float]:
        """This worker's process: peak RSS (MiB) and CPU seconds so far (benchmarks; a Ray actor is its own)."""
        import resource
        import time

        return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "cpu_seconds": time.process_time()}

    def close(self) -> str:
        """Close the block's store; returns its folder (for the driver's merge)."""
        self.store.close()
        return str(self.spec.store_dir)


def _view(block: DeviceBlock, a: int, b: int) -> DeviceBlock:
    """Devices ``a .. b - 1`` (local) of ``block`` as a block of views (no copy)."""
    lo, hi = int(block.starts[a]), int(block.starts[b])
    return replace(block, first=block.first + a, x=block.x[lo:hi], y=block.y[lo:hi],
                               starts=block.starts[a:b + 1] - lo, speaker=block.speaker[lo:hi])


def _rows(chunk: DeviceBlock, device: int) -> np.ndarray:
    """Device ``device``'s rows in ``chunk``."""
    k = device - chunk.first
    return np.arange(int(chunk.starts[k]), int(chunk.starts[k + 1]))


def _span(event: DPEvent | None, rounds: tuple[int, ...]) -> DPEvent | None:
    """A round's event over consecutive ``rounds`` (one reserve line: the fleet engine's span, word for word)."""
    if event is None or len(rounds) == 1:
        return event
    if list(rounds) != list(range(rounds[0], rounds[-1] + 1)):
        raise BlockError(f"a span covers consecutive rounds, got {rounds}")
    return span_event(event, rounds[0], rounds[-1], len(rounds))


def _event_key(event: DPEvent) -> tuple[Any, ...]:
    """Every field of ``event`` as a hashable value (a skellam event's parameters, a dict, as sorted pairs):
    equal keys, equal events."""
    return tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v
                 for v in (getattr(event, f.name) for f in fields(event)))


def _counts(g: np.ndarray) -> dict[int, int]:
    """Policy g -> how many devices hold it."""
    values, counts = np.unique(np.asarray(g, np.int64), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}
