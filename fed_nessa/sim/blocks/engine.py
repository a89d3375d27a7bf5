"""The block engine: the round protocol's transport over block workers (lazy devices, in-process or on Ray).

``fed-nessa simulate --engine blocks`` runs the library's round protocol
(:func:`fed_nessa.federated.protocol_loop.run_protocol`: cohort, promised g, round config, key
pinning, the release rule, ``ServerModel.apply``, the federation-ledger records, evaluation, the
promotion gate and the run folder) with the devices held by block workers
(:mod:`fed_nessa.sim.blocks.worker`): each owns a contiguous block of a lazy synthetic population
(a device's pairs a pure function of (population seed, j), never held fleet-wide), its devices'
keys and ledgers in its own ledger store, and answers each step for its whole block; the backend
(:mod:`fed_nessa.sim.blocks.backends`) runs the workers in this process or as Ray actors.

A statistics round is three calls to every worker: ``reserve`` (the engine's :meth:`ask`),
``contribute`` (one partial sum each; :meth:`secure_sum` combines them as SecAgg+'s modular sum,
or the fast numerics' float sum; under ``distributed-mechanism = skellam`` the integer mechanism's
field sum, decoded once, or the float sum plus one draw of its Skellam noise, as the fleet engine's
:mod:`fed_nessa.sim.fleet_integer`) and ``complete`` (:meth:`settle`: the ledger heads the round's
record signs). The device-level DP-SGD phase is reserved as one span per device before its first
round and completed after its last, and recorded in the federation ledger as one span entry, in
the fleet engine's words (:mod:`fed_nessa.sim.fleet_ledgers`): the device ledgers of a block run
and a fleet run on the same devices compare line for line (tests/test_sim_blocks_engine.py).

DP-FedAvg's adaptive clip (``clip-target-quantile > 0``, under ``gaussian`` and ``skellam``, both
numerics) runs as in the fleet engine: the driver states each DP-SGD round's C_t to the blocks as the
round config states it (``SumRequest.clip``), each block's devices clip their deltas to it and append
their bits (:func:`fed_nessa.sim.fedavg.device_payloads`, or the fast numerics'
:func:`~fed_nessa.sim.fedavg.bit_sum`), the blocks' partial sums carry the bit coordinate, and the driver
decodes once and moves the clip through ``ServerModel.apply`` (the span entry records each round's C_t).

What it does not do, refused before anything is written (:func:`refusal`): drop-outs, cohorts
smaller than the fleet, a device's min-separation, partial spans (a device whose budget cannot
take the whole DP-SGD phase declines all of it, where the fleet engine joins it for a prefix),
example-level DP-SGD rounds, local DP, resuming, and any data source but the built-in synthetic
population.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fed_nessa.config import (
    SECAGG_MODULUS_RANGE,
    DevicePolicy,
    DPMode,
    FederationConfig,
    FleetNumerics,
    LedgerLayout,
    Phase,
)
from fed_nessa.data.blocks import block_ranges
from fed_nessa.data.lazy_population import LazyPopulation
from fed_nessa.data.population import Population, Scenario
from fed_nessa.data.synthetic import PopulationConfig, population_config
from fed_nessa.evaluation import run_folder
from fed_nessa.federated.cohort import sample_positions
from fed_nessa.federated.device import RoundRequest, plan_below_floor
from fed_nessa.federated.engine import Answers, Ending, Engine, Pins, Released, RunState
from fed_nessa.federated.integer_mechanism import modular_sum
from fed_nessa.federated.mechanism import mechanism_for, public_parameters
from fed_nessa.federated.noise_plan import NoisePlan, noise_plan
from fed_nessa.federated.protocol import PROMISED_ARRIVALS_KEY, request_centre, request_clip
from fed_nessa.federated.protocol_loop import run_protocol
from fed_nessa.federated.release import may_unmask, promised_arrivals
from fed_nessa.federated.rounds import CLIP_COLUMN, Progress
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.federated.skellam_mechanism import IntegerCodec, RoundCodec
from fed_nessa.privacy.accounting import EpsilonMemo, UnitNotCoveredError
from fed_nessa.privacy.ledger import (
    CHAIN_SCHEME,
    DEVICE_KEYS,
    LEDGER_HEADS,
    PUBLIC_PARAMETERS,
    FederationLedger,
    config_sha256,
    key_store,
    model_sha256,
    received_chain,
)
from fed_nessa.privacy.store import SQLITE, LedgerStore, merge_parts
from fed_nessa.sim import fleet_integer
from fed_nessa.sim.blocks.backends import AUTO, Backend, make_backend
from fed_nessa.sim.blocks.worker import (
    BlockError,
    BlockSpec,
    CompleteReply,
    CompleteRequest,
    History,
    PartialSum,
    ReserveReply,
    ReserveRequest,
    SumRequest,
)
from fed_nessa.sim.fleet import OUTPUTS, device_id, pooled_references
from fed_nessa.sim.fleet_epsilon import events_up_to
from fed_nessa.sim.fleet_ledgers import adaptive_clips
from fed_nessa.sim.fleet_numerics import dequantized_total, fast_rounding

log = logging.getLogger(__name__)

ENGINE = "blocks"
#: Devices per block unless ``--devices-per-block`` says otherwise (one worker, one Ray actor each).
DEVICES_PER_BLOCK = 50_000
#: The one data source the block engine runs: the synthetic population, generated lazily (its default).
LAZY_SOURCE = FederationConfig.data_source
#: The pooled non-DP references train on the pairs of at most this many devices, drawn at random
#: (stated in the summary's engine block): the fleet's pairs are never held at once.
REFERENCE_MAX_DEVICES = 10_000
MASKS_NOTE = ("SecAgg+'s pairwise and private masks are left out: they cancel exactly in the modular sum of the "
              "blocks' partial sums, so the released aggregate does not depend on them")


@dataclass(frozen=True)
class BlockOptions:
    """How the fleet is cut and where the workers run (``fed-nessa simulate --engine blocks`` flags)."""

    devices_per_block: int = DEVICES_PER_BLOCK
    backend: str = AUTO
    ray_address: str | None = None
    cache: bool = False  # workers hold their blocks' pairs between rounds


@dataclass(frozen=True)
class Combined:
    """A round's combined partial sums: the released sum, how many devices are in it, their policies' g."""

    total: np.ndarray
    sent: int
    failed: list[int]
    arrivals: list[int]


def refusal(cfg: FederationConfig, policy: DevicePolicy) -> str | None:
    """Why the block engine cannot run ``cfg`` (None: it can); one sentence naming the setting."""
    from fed_nessa.federated.noise_plan import dpsgd_rounds

    n = cfg.num_devices
    if cfg.resume:
        return "--resume: block-engine runs are simulations without checkpoints; start a new run folder"
    if cfg.dp_mode == DPMode.LOCAL:
        return "dp-mode = 'local': the block engine simulates distributed DP (and dp-mode none); use --engine flower"
    if cfg.data_source != LAZY_SOURCE:
        return (f"data-source {cfg.data_source}: the block engine generates the built-in synthetic population "
                f"lazily ({LAZY_SOURCE!r}); use --engine fleet or flower for other sources")
    if cfg.cohort_size(n) < n:
        return "clients-per-round: the block engine runs full-participation rounds (clients-per-round = 0)"
    if cfg.dropout_rate > 0:
        return "dropout-rate: the block engine does not simulate drop-outs (dropout-rate must be 0)"
    if dpsgd_rounds(cfg) > 0 and not mechanism_for(cfg).clips_whole_device:
        return ("privacy-unit = 'example': the block engine runs device-level DP-SGD rounds only "
                "(privacy-unit = 'device'), or only the statistics rounds (aligner = 'linear')")
    if cfg.ledger_layout != LedgerLayout.SQLITE:
        return "ledger-layout = 'files': the block engine keeps every device's ledger in the ledger store ('sqlite')"
    if policy.min_separation > 1:
        return "min-separation: the block engine does not apply a device's min-separation (leave it at 1)"
    return None


def block_specs(population: PopulationConfig, devices_per_block: int, run_dir: Path, cache: bool = False
                ) -> list[BlockSpec]:
    """Consecutive blocks tiling the population, each with its ledger store under the run folder."""
    folder = str(key_store(run_dir) / DEVICE_KEYS)
    return [BlockSpec(population, a, b, str(run_dir), folder, cache)
            for a, b in block_ranges(population.num_devices, devices_per_block)]


def combine(partials: Sequence[PartialSum], codec: RoundCodec, numerics: FleetNumerics, cfg: FederationConfig,
            round_num: int) -> Combined:
    """The blocks' partial sums as one released sum (exact: modular sum then dequantization; fast: float
    sum plus the devices' summed rounding error, drawn once). ``skellam``: the field's modular sum decoded
    once (exact), or the float sum plus one draw of the whole sum's Skellam noise and rounding error (fast)."""
    parts = [p for p in partials if p.sent]
    sent = sum(p.sent for p in parts)
    failed = [int(i) for p in partials for i in p.failed]
    arrivals = [g for p in parts for g, k in sorted(p.arrivals.items()) for _ in range(k)]
    if not parts:
        return Combined(np.zeros(0), 0, failed, [])
    if isinstance(codec, IntegerCodec):
        if numerics == FleetNumerics.EXACT:  # a WrapAroundError propagates: the sum is refused, never applied
            field = modular_sum(np.stack([p.total for p in parts]), codec.params)
            return Combined(codec.decode_sum(field, sent), sent, failed, arrivals)
        total = np.sum([p.total for p in parts], axis=0)
        return Combined(fleet_integer.fast_sum(cfg, total, arrivals, round_num, codec), sent, failed, arrivals)
    if numerics == FleetNumerics.EXACT:
        acc = np.zeros_like(parts[0].total)
        for p in parts:
            acc = (acc + p.total) % SECAGG_MODULUS_RANGE
        return Combined(dequantized_total(acc, sent, codec), sent, failed, arrivals)
    total = np.sum([p.total for p in parts], axis=0)
    return Combined(fast_rounding(total, sent, codec, cfg, round_num), sent, failed, arrivals)


def lazy_federation(cfg: FederationConfig, population: PopulationConfig, *, devices: bool = False) -> Population:
    """The server's side of a lazy population: dimensions, model ids, the evaluation and validation sets
    (``cfg.eval_speakers`` and ``cfg.validation_speakers`` speakers: bounded, whatever the fleet). With
    ``devices``, every device's pairs too (a small fleet for the fleet engine: the equivalence tests)."""
    lazy = LazyPopulation(population)
    models = lazy.world.models
    enroll, runtime = models[lazy.enroll_model], models[lazy.runtime_model]
    validation = lazy.validation_set(cfg.validation_speakers) if cfg.validation_speakers > 0 else None
    shards = tuple(lazy.device(j) for j in range(population.num_devices)) if devices else ()
    return Population(cfg.data_source, lazy.eval_set(), validation=validation,
                      scenario=Scenario(lazy.enroll_model, lazy.runtime_model), devices=shards,
                      d_x=enroll.dim, d_y=runtime.dim, enroll_model=enroll.model_id,
                      runtime_model=runtime.model_id)


def default_population(cfg: FederationConfig) -> PopulationConfig:
    """The synthetic data source's population as a lazy one (the eager generator's devices to float32
    rounding: docs/synthetic.md "The lazy population")."""
    return population_config(cfg.num_devices, cfg.seed, eval_speakers=cfg.eval_speakers)


class BlockEngine(Engine):
    """One block-engine run (see the module docstring): the round protocol's transport over block workers."""

    name = ENGINE
    evaluates_statistics_round = True  # as the fleet engine: the linear start's own EER is in the history

    def __init__(self, cfg: FederationConfig, policy: DevicePolicy, population: PopulationConfig,
                 options: BlockOptions = BlockOptions(), *, progress: Progress | None = None) -> None:
        why = refusal(cfg, policy)
        if why:
            raise BlockError(why)
        if population.num_devices != cfg.num_devices:
            raise BlockError(f"num-devices = {cfg.num_devices}: the population holds {population.num_devices} devices")
        self.cfg, self.policy, self.options = cfg, policy, options
        self.population = population
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data = lazy_federation(cfg, population)
        self.fleet = population.num_devices
        self.model = ServerModel(cfg, self.data.d_x, self.data.d_y, self.data.enroll_model, self.data.runtime_model)
        self.plan = noise_plan(cfg, self.fleet, (self.data.d_x, self.data.d_y))  # the dims size skellam's payload
        self.numerics = FleetNumerics(cfg.fleet_numerics)
        self.progress = progress or (lambda event: None)
        self.state = RunState()
        self.backend: Backend | None = None
        self._ids = _Ids(self.fleet)
        self._dp_rounds: list[int] = []
        self._pins = Pins({})
        self._server_fp = ""
        self._sent: dict[int, tuple[str, str]] = {}
        self._span: list[ReserveReply] = []  # the blocks' replies to the DP-SGD phase's span reservation
        self._histories: list[History] | None = None
        self._memo = EpsilonMemo()
        self.epsilons: dict[str, float] = {}  # device id -> epsilon, from the blocks' completes
        self._workers_rss: list[float] = []  # each worker's peak RSS (MiB) after the last round

    def run(self) -> dict[str, Any]:
        """Every round through the library's round protocol; returns the summary."""
        t0 = time.perf_counter()
        summary = run_protocol(self, OUTPUTS, self.progress)
        summary.setdefault("timing", {})["total_seconds"] = time.perf_counter() - t0
        return summary

    # -- the engine (fed_nessa.federated.engine.Engine) --------------------------------------
    def noise_plan(self) -> NoisePlan:
        return self.plan

    def start(self, ledger: FederationLedger, pins: Pins, state: RunState) -> int:
        """The run's ledger store and seed first, then the workers (each opens its block's store)."""
        self.state, self._pins, self._server_fp = state, pins, ledger.key_fingerprint
        LedgerStore.open(self.run_dir, key_store(self.run_dir) / DEVICE_KEYS).close()
        opts = self.options
        self.backend = make_backend(opts.backend, block_specs(self.population, opts.devices_per_block, self.run_dir,
                                                              opts.cache), self.cfg, self.policy,
                                    ray_address=opts.ray_address)
        phases = self.model.phases(self.plan.aligner)
        self._dp_rounds = [r for r, p in enumerate(phases, start=1) if p == Phase.DPSGD]
        for why in plan_below_floor(self.plan, phases, self.cfg, self.policy):
            log.warning(why)
        return 1

    def before_round(self, r: int, phase: Phase) -> None:
        """Before the first DP-SGD round every device reserves the whole phase as one span."""
        if not self._dp_rounds or r != self._dp_rounds[0]:
            return
        req = self._request(Phase.DPSGD, r, promised_arrivals(self.cfg, self.fleet))
        self._span = self._call("reserve", ReserveRequest(req, tuple(self._dp_rounds),
                                                          {"server_key_fingerprint": self._server_fp}))
        for rep in self._span:
            for i, fp in rep.pins.items():
                self._pins.offer(device_id(i), fp)
        self._histories = None

    def cohort(self, r: int, phase: Phase) -> list[int]:
        return [int(i) for i in sample_positions(self.fleet, self.cfg, r, phase).tolist()]

    def ask(self, r: int, phase: Phase, cohort: list[int], request: dict[str, Any]) -> Answers:
        """Statistics round: every block's reserve (checks, budget, durable reserve). DP-SGD round: the
        devices whose span holds this round (reserved by :meth:`before_round`)."""
        self._sent[r] = (model_sha256(self.model.vector()), config_sha256(request))
        answers = Answers(device_ids=self._ids, evidence={"model_sha256": self._sent[r][0],
                                                          "config_sha256": self._sent[r][1]})
        if phase == Phase.SUFFSTATS:
            req = self._request(Phase.SUFFSTATS, r, int(request[PROMISED_ARRIVALS_KEY]))
            received = {"round": r, "model_sha256": self._sent[r][0], "config_sha256": self._sent[r][1],
                        "server_key_fingerprint": self._server_fp}
            replies: list[ReserveReply] = self._call("reserve", ReserveRequest(req, (r,), received))
            for rep in replies:
                answers.fingerprints.update(rep.pins)
            self._histories = None
        else:
            replies = self._span
        for rep in replies:
            answers.accepted.extend(int(i) for i in rep.accepted)
            answers.declined.extend(int(i) for i in rep.declined)
            answers.reasons.update(rep.reasons)
        return answers

    def secure_sum(self, r: int, phase: Phase, answers: Answers, request: dict[str, Any], codec: RoundCodec,
                   promised: int) -> Released:
        """Every block's partial sum, combined (drop-outs are not simulated: every accepted device sends,
        unless it fails its own range check)."""
        net = self.model.net if phase == Phase.DPSGD else None
        # the adaptive clip's C_t travels as the round config states it: each block clips and sends its bit by it
        partials: list[PartialSum] = self._call("contribute", SumRequest(phase, r, codec, self.plan, net,
                                                                         request_clip(request),
                                                                         request_centre(request)))
        out = combine(partials, codec, self.numerics, self.cfg, r)
        if out.failed:
            log.warning("round %d: %d device(s) failed their own range check and sent nothing", r, len(out.failed))
        lost = set(out.failed)
        arrived = [i for i in answers.accepted if i not in lost]
        unmask = may_unmask(out.sent, promised)
        if not unmask.release:
            return Released(None, arrived, out.sent, refused=unmask.reason)
        return Released(out.total, arrived, out.sent, gradients=True if phase == Phase.DPSGD else None,
                        noise_arrivals=out.arrivals)

    def settle(self, r: int, phase: Phase, answers: Answers, released: Released | None) -> dict[str, list[int | str]]:
        """Statistics round: every reservation completed, the heads the record signs. DP-SGD: none yet."""
        if phase != Phase.SUFFSTATS:
            return {}
        return self._heads(self._call("complete", CompleteRequest()))

    def records_round(self, phase: Phase) -> bool:
        return phase == Phase.SUFFSTATS  # the DP-SGD phase is one span entry, written by close()

    def device_epsilons(self, r: int, phase: Phase, answers: Answers, released: Released | None) -> dict[str, Any]:
        """Every device's epsilon after round ``r``: its ledger's events for rounds <= r, a span counted for
        its rounds <= r (:func:`fed_nessa.sim.fleet_epsilon.events_up_to`, as the fleet engine states it);
        each distinct history composed once."""
        if self._histories is None:
            self._histories = [h for part in self._call("histories", None) for h in part]
        values: list[float] = []
        for h in self._histories:
            values.extend([self._epsilon(events_up_to(h.events, h.scheduled, r), h.delta)] * h.count)
        values = values or [0.0]
        return {"epsilon_max": max(values), "epsilon_median": statistics.median(values)}

    def round_done(self, r: int, rounds: int, entry: dict[str, Any]) -> None:
        """The round entry's memory: this process's peak RSS and each worker's (a Ray actor is its own process)."""
        entry["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self._workers_rss = [round(u["peak_rss_mib"], 1) for u in self._call("usage", None)]
        entry["workers_peak_rss_mib"] = self._workers_rss

    def close(self, ledger: FederationLedger, pins: Pins) -> None:
        """The DP-SGD spans completed and recorded as one span entry; the blocks' stores merged into the run's."""
        if self._dp_rounds and self._span:
            self._close_span(ledger, pins)
        self._merge()

    def ending(self) -> Ending:
        return Ending(summary_of=self.summary, references=self._references if self.cfg.references else None,
                      card_extra=lambda summary: {"engine": ENGINE})

    def release(self) -> None:
        """A run that failed still leaves one ledger store (the blocks' parts merged) where its workers
        can still say where their parts are; a worker that died (a Ray actor killed) is logged, so the
        run's own error is the one raised."""
        try:
            self._merge()
        except Exception as exc:  # noqa: BLE001 - cleanup after a failed run: the run's error is what matters
            log.warning("the blocks' ledger stores were not merged: %s", str(exc).splitlines()[0][:200])

    # -- the DP-SGD span -------------------------------------------------------------------
    def _close_span(self, ledger: FederationLedger, pins: Pins) -> None:
        rounds = self._dp_rounds
        chain = {"scheme": CHAIN_SCHEME, "rounds": [[rounds[0], rounds[-1]]],
                 "chain": received_chain((r, *self._sent[r]) for r in rounds)}
        heads = self._heads(self._call("complete", CompleteRequest(received=chain)))
        joined = sorted(device_id(int(i)) for rep in self._span for i in rep.accepted)
        declined = [device_id(int(i)) for rep in self._span for i in rep.declined]
        reasons: dict[str, int] = {}
        for rep in self._span:
            for why in rep.reasons.values():
                reasons[why] = reasons.get(why, 0) + 1
        extra: dict[str, Any] = {"phase": str(Phase.DPSGD), "engine": ENGINE, "dropped": {}, "decline_reasons": reasons,
                 PUBLIC_PARAMETERS: public_parameters(Phase.DPSGD, self.cfg, self.plan)}
        if joined:
            clips = {int(e["round"]): float(e[CLIP_COLUMN]) for e in self.state.history if CLIP_COLUMN in e}
            extra.update({"models": {str(r): list(self._sent[r]) for r in rounds}, "model_chain_scheme": CHAIN_SCHEME,
                          "model_chain": received_chain((r, *self._sent[r]) for r in rounds),
                          "device_key_fingerprints": pins.flush(), **adaptive_clips(clips, rounds),
                          LEDGER_HEADS: heads})
        ledger.record_span(rounds[0], rounds[-1], joined, sorted(declined), [], extra)

    # -- helpers ---------------------------------------------------------------------------
    def _call(self, method: str, request: Any) -> list[Any]:
        assert self.backend is not None, "start() opens the workers"
        return self.backend.call(method, request)

    def _merge(self) -> None:
        if self.backend is None:
            return
        backend, self.backend = self.backend, None
        merge_parts(self.run_dir, [Path(p) for p in sorted(backend.close())])

    def _heads(self, done: Sequence[CompleteReply]) -> dict[str, list[int | str]]:
        heads: dict[str, list[int | str]] = {}
        for rep in done:
            heads.update(rep.heads)
            self.epsilons.update(rep.epsilons)
        self._histories = None
        return heads

    def _epsilon(self, events: list[Any], delta: float) -> float:
        try:
            return float(self._memo.epsilon(events, delta, unit=self.cfg.privacy_unit))
        except UnitNotCoveredError:
            return math.inf

    def _request(self, phase: Phase, r: int, promised: int) -> RoundRequest:
        """The round's request as every device of the blocks receives it (the federation's model ids)."""
        return RoundRequest(phase, r, promised, self.fleet, enroll_model=self.data.enroll_model,
                            runtime_model=self.data.runtime_model)

    def _reference_devices(self) -> np.ndarray:
        """The devices the pooled references train on: all, or :data:`REFERENCE_MAX_DEVICES` drawn at random."""
        if self.fleet <= REFERENCE_MAX_DEVICES:
            return np.arange(self.fleet)
        return np.sort(np.random.default_rng([self.cfg.seed, 13]).choice(self.fleet, REFERENCE_MAX_DEVICES,
                                                                         replace=False))

    def _references(self) -> dict[str, Any]:
        """Pooled non-DP NESSA and ridge on the pairs of :meth:`_reference_devices` (bounded: the fleet's
        pairs are never held), as the fleet engine fits them (:func:`fed_nessa.sim.fleet.pooled_references`)."""
        lazy = LazyPopulation(self.population)
        shards = [lazy.device(int(j)) for j in self._reference_devices()]
        x = torch.from_numpy(np.concatenate([s.enroll for s in shards]).astype(np.float32))
        y = torch.from_numpy(np.concatenate([s.runtime for s in shards]).astype(np.float32))
        del shards
        return pooled_references(self.cfg, self.data, self.model.comparator(), x, y)

    def noise_statement(self) -> str:
        """Where this simulation's draws came from (a deployed device draws all of them from the OS CSPRNG)."""
        if self.cfg.integer_noise:
            return fleet_integer.noise_statement(self.numerics, engine="block engine")
        if self.numerics == FleetNumerics.EXACT:
            return ("block engine, exact numerics: every device's Gaussian share and row subset drawn from the OS "
                    "CSPRNG, as on a device; residual risk: floating-point Gaussian samplers (Mironov, CCS 2012)")
        return ("block engine, distribution-equivalent numerics (a simulation): each block's summed Gaussian noise is "
                "one draw from the OS CSPRNG; the devices' row subsets come from PCG64 streams keyed with 128 fresh "
                "bits of OS entropy per chunk and round; the rounding errors from their distribution. A deployed "
                "device draws its own noise share and rows from the OS CSPRNG")

    def summary(self, final: dict[str, Any]) -> dict[str, Any]:
        """The run's summary: every device's epsilon from the blocks' completes (a device never completed
        spent nothing), the engine block (backend, blocks, what the references and evaluation ran on)."""
        eps = {device_id(i): 0.0 for i in range(self.fleet)}
        eps.update(self.epsilons)
        seconds = [e["seconds"] for e in self.state.history if e["phase"] == str(Phase.DPSGD)]
        opts = self.options
        return {
            "config": run_folder.portable_config(self.cfg.to_run_config()),
            "rounds": self.state.history,
            "final": final,
            "privacy": run_folder.privacy_block(self.cfg, eps, self.fleet, noise_source=self.noise_statement(),
                                                ledger_layout=SQLITE),
            "noise_plan": run_folder.noise_plan_block(self.plan),
            "secure_aggregation": {**run_folder.secagg_block(self.cfg, self.state.saturated_total),
                                   "simulated": MASKS_NOTE},
            "engine": {"name": ENGINE, "numerics": str(self.numerics), "masks": MASKS_NOTE, "devices": self.fleet,
                       "devices_per_block": opts.devices_per_block,
                       "blocks": math.ceil(self.fleet / opts.devices_per_block),
                       "backend": opts.backend, "ray_address": opts.ray_address,
                       "evaluation": f"every evaluated round on the held-out set: {self.population.eval_speakers} "
                                     "speakers", "workers_peak_rss_mib": self._workers_rss,
                       "references_devices": (int(min(self.fleet, REFERENCE_MAX_DEVICES))
                                              if self.cfg.references else None),
                       "seconds_per_dpsgd_round_median": statistics.median(seconds) if seconds else None,
                       "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        }


class _Ids(Mapping[int, str]):
    """Handle -> device id for the whole fleet, computed on demand (no 10^6-entry dict)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < self.n:
            raise KeyError(i)
        return device_id(i)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def run_blocks(cfg: FederationConfig, policy: DevicePolicy, options: BlockOptions = BlockOptions(), *,
               progress: Progress | None = None) -> dict[str, Any]:
    """Run every round of ``cfg`` with the block engine over the synthetic source's lazy population."""
    return BlockEngine(cfg, policy, default_population(cfg), options, progress=progress).run()


__all__ = ["ENGINE", "BlockEngine", "BlockError", "BlockOptions", "block_specs", "combine", "lazy_federation",
           "refusal", "run_blocks"]
