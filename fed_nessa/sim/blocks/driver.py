"""The block engine's driver: the round protocol over block workers, end to end with ledgers.

The driver keeps everything the protocol decides (the cohort's request, the release rule, the
codec, the server's model, the federation ledger); the workers (:mod:`fed_nessa.sim.blocks.worker`)
hold the devices and answer each step for their whole block, in-process or on Ray
(:mod:`fed_nessa.sim.blocks.backends`). Per run: the statistics round(s) (each device reserves,
contributes its statistics plus its share, completes), then the device-level DP-SGD rounds
(``device-update = fedsgd``: each device's mean gradient over ``device-batch`` pairs clipped as one
vector; ``fedavg``: its DP-FedAvg delta at the fixed ``device-clip-norm``) with each device's rounds
reserved as one span before the first and completed after the last, as the fleet engine does. At
the end the blocks' ledger stores are merged into the run's ``ledger-store.sqlite`` and
``summary.json`` states the privacy block and the rounds, so ``fed-nessa audit`` checks the run
folder like a fleet run's.

What it leaves out (the fleet engine has them): drop-outs, cohorts smaller than the fleet in
DP-SGD rounds, per-device min-separation, the adaptive clip, evaluation and the promotion gate.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fed_nessa.config import SECAGG_MODULUS_RANGE, DevicePolicy, FederationConfig, FleetNumerics, Phase, RoundStatus
from fed_nessa.data.blocks import block_ranges
from fed_nessa.data.lazy_population import LazyPopulation
from fed_nessa.data.synthetic import PopulationConfig
from fed_nessa.evaluation import run_folder
from fed_nessa.federated.codec import SecAggCodec, make_codec
from fed_nessa.federated.cohort import sample_positions
from fed_nessa.federated.device import RoundRequest
from fed_nessa.federated.mechanism import public_parameters
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.protocol import round_config
from fed_nessa.federated.release import may_start, may_unmask, promised_arrivals
from fed_nessa.federated.rounds import LEDGER_FILE, not_evaluated, round_entry
from fed_nessa.federated.server_model import ServerModel
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
    server_key_folder,
)
from fed_nessa.privacy.store import SQLITE, LedgerStore, merge_parts
from fed_nessa.sim.blocks.backends import Backend, make_backend
from fed_nessa.sim.blocks.worker import (
    BlockError,
    BlockSpec,
    CompleteReply,
    CompleteRequest,
    PartialSum,
    ReserveReply,
    ReserveRequest,
    SumRequest,
)
from fed_nessa.sim.fleet import device_id
from fed_nessa.sim.fleet_numerics import dequantized_total, fast_rounding

log = logging.getLogger(__name__)

ENGINE = "blocks"


@dataclass(frozen=True)
class Released:
    """A round's combined partial sums: the released sum, the devices in it, their policies' g."""

    total: np.ndarray
    sent: int
    failed: list[int]
    arrivals: list[int]


def block_specs(population: PopulationConfig, devices_per_block: int, run_dir: Path, cache: bool = False
                ) -> list[BlockSpec]:
    """Consecutive blocks tiling the population, each with its ledger store under the run folder."""
    folder = str(key_store(run_dir) / DEVICE_KEYS)
    return [BlockSpec(population, a, b, str(run_dir), folder, cache)
            for a, b in block_ranges(population.num_devices, devices_per_block)]


def combine(partials: Sequence[PartialSum], codec: SecAggCodec, numerics: FleetNumerics, cfg: FederationConfig,
            round_num: int) -> Released:
    """The blocks' partial sums as one released sum (exact: modular sum then dequantization; fast: float
    sum plus the devices' summed rounding error, drawn once)."""
    parts = [p for p in partials if p.sent]
    sent = sum(p.sent for p in parts)
    failed = [int(i) for p in partials for i in p.failed]
    arrivals = [g for p in parts for g, k in sorted(p.arrivals.items()) for _ in range(k)]
    if not parts:
        return Released(np.zeros(0), 0, failed, [])
    if numerics == FleetNumerics.EXACT:
        acc = np.zeros_like(parts[0].total)
        for p in parts:
            acc = (acc + p.total) % SECAGG_MODULUS_RANGE
        return Released(dequantized_total(acc, sent, codec), sent, failed, arrivals)
    total = np.sum([p.total for p in parts], axis=0)
    return Released(fast_rounding(total, sent, codec, cfg, round_num), sent, failed, arrivals)


class BlockEngine:
    """One run of the block engine over a lazy synthetic population (see the module docstring)."""

    def __init__(self, cfg: FederationConfig, policy: DevicePolicy, population: PopulationConfig, *,
                 devices_per_block: int, backend: str = "auto", ray_address: str | None = None,
                 cache: bool = False) -> None:
        if cfg.cohort_size(population.num_devices) < population.num_devices:
            raise BlockError("the block engine runs full-participation DP-SGD rounds (clients-per-round = 0)")
        if cfg.dropout_rate > 0:
            raise BlockError("the block engine does not simulate drop-outs (dropout-rate must be 0)")
        self.cfg, self.policy = cfg, policy
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        LedgerStore.open(self.run_dir, key_store(self.run_dir) / DEVICE_KEYS).close()  # the run's seed, first
        lazy = LazyPopulation(population)
        models = lazy.world.models
        self.model_ids = {"enroll_model": models[lazy.enroll_model].model_id,
                          "runtime_model": models[lazy.runtime_model].model_id}
        self.fleet = population.num_devices
        self.model = ServerModel(cfg, models[lazy.enroll_model].dim, models[lazy.runtime_model].dim,
                                 self.model_ids["enroll_model"], self.model_ids["runtime_model"])
        self.plan = noise_plan(cfg, self.fleet, (self.model.d_x, self.model.d_y))
        self.numerics = FleetNumerics(cfg.fleet_numerics)
        self.backend: Backend = make_backend(backend, block_specs(population, devices_per_block, self.run_dir, cache),
                                             cfg, policy, ray_address=ray_address)
        self.history: list[dict[str, Any]] = []
        self.epsilons: dict[str, float] = {}
        self._server_fp: str | None = None
        self._pins: dict[str, str] = {}
        self._sent: dict[int, tuple[str, str]] = {}
        self._span: list[ReserveReply] = []  # the blocks' replies to the DP-SGD phase's span reservation

    def run(self) -> dict[str, Any]:
        """Every round, the blocks' stores merged, ``summary.json`` written; returns the summary."""
        fed = FederationLedger.open(self.run_dir / LEDGER_FILE, server_key_folder(self.run_dir))
        self._server_fp = fed.key_fingerprint
        phases = self.model.phases(self.plan.aligner)
        dp_rounds = [r for r, p in enumerate(phases, start=1) if p == Phase.DPSGD]
        try:
            for r, phase in enumerate(phases, start=1):
                t0 = time.perf_counter()
                if phase == Phase.SUFFSTATS:
                    entry = self._stats_round(r, fed)
                else:
                    entry = self._dpsgd_round(r, dp_rounds, fed)
                entry["seconds"] = time.perf_counter() - t0
                entry["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                self.history.append(entry)
            fed.record_end()
        finally:
            parts = sorted(self.backend.close())
        merge_parts(self.run_dir, [Path(p) for p in parts])
        summary = self.summary()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    # -- one statistics round --------------------------------------------------------------
    def _stats_round(self, r: int, fed: FederationLedger) -> dict[str, Any]:
        cohort = len(sample_positions(self.fleet, self.cfg, r, Phase.SUFFSTATS))
        promised = promised_arrivals(self.cfg, cohort)
        req = self._request(Phase.SUFFSTATS, r, promised)
        replies: list[ReserveReply] = self.backend.call("reserve", ReserveRequest(req, (r,), self._send(req)))
        accepted, declined, reasons = _tally(replies)
        self._pin(replies)
        status, note, sent = self._release(Phase.SUFFSTATS, r, promised, accepted)
        done: list[CompleteReply] = self.backend.call("complete", CompleteRequest())
        heads = self._heads(done)
        joined = [device_id(int(i)) for rep in replies for i in rep.accepted]
        fed.record_round(r, joined if sent else [], [device_id(int(i)) for rep in replies for i in rep.declined],
                         [] if sent else joined,
                         {"phase": str(Phase.SUFFSTATS), "status": str(status), "note": note,
                          "guaranteed_arrivals": promised, "engine": ENGINE, "decline_reasons": reasons,
                          **self._sent_extra([r]), LEDGER_HEADS: heads,
                          PUBLIC_PARAMETERS: public_parameters(Phase.SUFFSTATS, self.cfg, self.plan)})
        return round_entry(r, Phase.SUFFSTATS, status, note, not_evaluated(), participants=sent,
                           declined=len(declined), failed=accepted - sent)

    # -- device-level DP-SGD rounds --------------------------------------------------------
    def _dpsgd_round(self, r: int, dp_rounds: list[int], fed: FederationLedger) -> dict[str, Any]:
        promised = promised_arrivals(self.cfg, self.fleet)
        req = self._request(Phase.DPSGD, r, promised)
        if r == dp_rounds[0]:  # every device reserves the whole phase as one span, before round one
            self._span = self.backend.call("reserve", ReserveRequest(req, tuple(dp_rounds),
                                                                     {"server_key_fingerprint": self._server_fp}))
            self._pin(self._span)
        self._send(req)
        accepted, declined, _reasons = _tally(self._span)
        status, note, sent = self._release(Phase.DPSGD, r, promised, accepted)
        if r == dp_rounds[-1]:
            self._close_span(dp_rounds, fed)
        return round_entry(r, Phase.DPSGD, status, note, not_evaluated(), participants=sent,
                           declined=len(declined), failed=accepted - sent)

    def _close_span(self, dp_rounds: list[int], fed: FederationLedger) -> None:
        chain = {"scheme": CHAIN_SCHEME, "rounds": [[dp_rounds[0], dp_rounds[-1]]],
                 "chain": received_chain((r, *self._sent[r]) for r in dp_rounds)}
        done: list[CompleteReply] = self.backend.call("complete", CompleteRequest(received=chain))
        _accepted, declined, reasons = _tally(self._span)
        joined = sorted(device_id(int(i)) for rep in self._span for i in rep.accepted)
        fed.record_span(dp_rounds[0], dp_rounds[-1], joined, [device_id(int(i)) for i in declined], [],
                        {"phase": str(Phase.DPSGD), "engine": ENGINE, "dropped": {}, "decline_reasons": reasons,
                         **self._sent_extra(dp_rounds, span=True), LEDGER_HEADS: self._heads(done),
                         PUBLIC_PARAMETERS: public_parameters(Phase.DPSGD, self.cfg, self.plan)})

    # -- the release -----------------------------------------------------------------------
    def _release(self, phase: Phase, r: int, promised: int, accepted: int) -> tuple[RoundStatus, str, int]:
        """Ask the blocks for their partial sums (when the round may start), combine, apply when it may unmask."""
        start = may_start(accepted, promised)
        if not start.release:
            return RoundStatus.SKIPPED, start.reason, 0
        codec = make_codec(self.model.payload_bound(phase, self.plan), self.cfg.secagg_clipping_range,
                           self.cfg.secagg_quantization_range, accepted)
        net = self.model.net if phase == Phase.DPSGD else None
        partials: list[PartialSum] = self.backend.call("contribute", SumRequest(phase, r, codec, self.plan, net))
        out = combine(partials, codec, self.numerics, self.cfg, r)
        if out.failed:
            log.warning("round %d: %d device(s) failed their own range check and sent nothing", r, len(out.failed))
        unmask = may_unmask(out.sent, promised)
        if not unmask.release:
            return RoundStatus.REFUSED, unmask.reason, 0
        self.model.apply(phase, out.total, out.sent, noise_arrivals=out.arrivals,
                         quantization_std=codec.device_error_std(), plan=self.plan,
                         gradients=True if phase == Phase.DPSGD else None)
        return RoundStatus.APPLIED, f"sum of {out.sent} devices released (g = {promised})", out.sent

    # -- evidence --------------------------------------------------------------------------
    def _request(self, phase: Phase, r: int, promised: int) -> RoundRequest:
        config = round_config(str(phase), r, promised, self.fleet, self._server_fp, **self.model_ids)
        return RoundRequest(phase, r, promised, self.fleet, self._server_fp, config_sha256(config), **self.model_ids,
                            dims=(self.model.d_x, self.model.d_y))

    def _send(self, req: RoundRequest) -> dict[str, Any]:
        """Hash the model and round config of the round (what every device receives)."""
        assert req.config_sha256 is not None
        self._sent[req.round] = (model_sha256(self.model.vector()), req.config_sha256)
        return {"round": req.round, "model_sha256": self._sent[req.round][0],
                "config_sha256": self._sent[req.round][1], "server_key_fingerprint": self._server_fp}

    def _pin(self, replies: Sequence[ReserveReply]) -> None:
        """Device key pins not yet written to the federation ledger (the next record carries them)."""
        for rep in replies:
            for dev, fp in rep.pins.items():
                self._pins.setdefault(dev, fp)

    def _sent_extra(self, rounds: list[int], span: bool = False) -> dict[str, Any]:
        pins, self._pins = self._pins, {}
        if len(rounds) == 1 and not span:
            model, config = self._sent[rounds[0]]
            return {"model_sha256": model, "config_sha256": config, "device_key_fingerprints": pins}
        return {"models": {str(r): list(self._sent[r]) for r in rounds}, "model_chain_scheme": CHAIN_SCHEME,
                "model_chain": received_chain((r, *self._sent[r]) for r in rounds), "device_key_fingerprints": pins}

    def _heads(self, done: Sequence[CompleteReply]) -> dict[str, list[Any]]:
        heads: dict[str, list[Any]] = {}
        for rep in done:
            heads.update(rep.heads)
            self.epsilons.update(rep.epsilons)
        return heads

    def noise_statement(self) -> str:
        """Where this simulation's draws came from (a deployed device draws all of them from the OS CSPRNG)."""
        if self.numerics == FleetNumerics.EXACT:
            return ("block engine, exact numerics: every device's Gaussian share and row subset drawn from the OS "
                    "CSPRNG, as on a device; residual risk: floating-point Gaussian samplers (Mironov, CCS 2012)")
        return ("block engine, distribution-equivalent numerics (a simulation): each block's summed Gaussian noise is "
                "one draw from the OS CSPRNG; the devices' row subsets come from PCG64 streams keyed with 128 fresh "
                "bits of OS entropy per chunk and round; the rounding errors from their distribution. A deployed "
                "device draws its own noise share and rows from the OS CSPRNG")

    def summary(self) -> dict[str, Any]:
        return {"config": run_folder.portable_config(self.cfg.to_run_config()), "rounds": self.history,
                "privacy": run_folder.privacy_block(self.cfg, self.epsilons, self.fleet, ledger_layout=SQLITE,
                                                    noise_source=self.noise_statement()),
                "engine": {"name": ENGINE, "numerics": str(self.numerics), "devices": self.fleet,
                           "backend": type(self.backend).__name__,
                           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}


def _tally(replies: Sequence[ReserveReply]) -> tuple[int, list[int], dict[str, int]]:
    """Accepted count, declined devices and decline reasons over the blocks."""
    reasons: Counter[str] = Counter()
    for rep in replies:
        reasons.update(rep.reasons)
    return (sum(len(rep.accepted) for rep in replies), [int(i) for rep in replies for i in rep.declined],
            dict(reasons))
