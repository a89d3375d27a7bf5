"""The server's round loop: plan, SecAgg+ round, decode, apply, evaluate, record, checkpoint.

Per round ``r`` (phase from ``ServerModel.phases()``):

1. sample ``clients-per-round`` nodes (seeded by ``(seed, r)``: a resumed run
   samples the same cohorts);
2. send each a light ``query`` (the plan) with the round's promised ``g``
   (:func:`fed_nessa.federated.release.promised_arrivals` of the sampled cohort):
   devices whose policy or budget does not allow the round decline, bad shards
   answer with an error; neither enters the SecAgg+ cohort;
3. if at least ``g`` accepted, run one SecAgg+ round over them
   (:func:`server.secagg_round.secure_sum`); fewer than ``g`` masked vectors:
   nothing is unmasked (status ``refused``); otherwise the model is left unchanged;
4. ``ServerModel.apply`` the SUM, evaluate the global aligner on the held-out
   evaluation set, record the round in the signed federation ledger, rewrite
   ``summary.json`` and write a checkpoint.

At the end: the aligner artifact (``ServerModel.save_artifact``), the
centralised comparison rows (simulation), ``report.md`` and the plots.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.typing import ConfigRecordValues as ConfigRecordValue
from flwr.serverapp.grid import Grid

from fed_nessa.config import FederationConfig, Phase, ReplyStatus, RoundStatus, from_run_config
from fed_nessa.data.population import SCENARIO, FederationData, load_federation_data
from fed_nessa.errors import FedNessaError
from fed_nessa.evaluation import run_folder
from fed_nessa.evaluation.gate import SHIPPED, card_fields, gate_run
from fed_nessa.federated.codec import saturation_note
from fed_nessa.federated.cohort import sample_positions
from fed_nessa.federated.mechanism import public_parameters
from fed_nessa.federated.noise_plan import NoisePlan, noise_plan
from fed_nessa.federated.protocol import (
    DEVICE_ID_REPLY_KEY,
    KEY_FINGERPRINT_REPLY_KEY,
    LEDGER_HEAD_REPLY_KEY,
    LEDGER_SEQ_REPLY_KEY,
    PLAN_RECORD,
    ROUND_KEY,
    STATUS_KEY,
    shard_folder,
)
from fed_nessa.federated.protocol import round_config as _round_config
from fed_nessa.federated.release import may_start, promised_arrivals
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
from fed_nessa.federated.skellam_mechanism import round_codec
from fed_nessa.privacy.ledger import LEDGER_HEADS, PUBLIC_PARAMETERS, config_sha256, model_sha256, server_key_folder
from server.checkpoint import Checkpoint, check_resumable, latest_checkpoint, save_checkpoint
from server.secagg_round import secure_sum

log = logging.getLogger(__name__)
#: The end of a run: evaluation's gate and run folder, injected into the library's protocol.
OUTPUTS = RunOutputs(gate_run, card_fields, SHIPPED, run_folder.write_outputs)


class NotEnoughDevices(FedNessaError, RuntimeError):
    """Fewer nodes are connected than one SecAgg+ round needs."""


@dataclass
class Plan:
    accepted: list[int]
    declined: list[int]
    failed: list[int]
    device_ids: dict[int, str]
    epsilons: dict[int, float]
    reasons: dict[int, str] = field(default_factory=dict)
    fingerprints: dict[int, str] = field(default_factory=dict)  # node -> its ledger key fingerprint


def sample_cohort(node_ids: list[int], cfg: FederationConfig, round_num: int, phase: str = "") -> list[int]:
    """The round's devices (:func:`fed_nessa.federated.cohort.sample_positions` over the sorted node ids)."""
    nodes = sorted(int(n) for n in node_ids)
    # Sample positions, not ids: Flower's node ids reach 2**64 and numpy would turn them into floats.
    return sorted(nodes[i] for i in sample_positions(len(nodes), cfg, round_num, phase))


def round_config(phase: Phase, round_num: int, promised: int, fleet: int,
                 server_key_fingerprint: str | None = None, enroll_model: str | None = None,
                 runtime_model: str | None = None) -> dict[str, ConfigRecordValue]:
    """What every device of a round is told (plan and fit config alike), with the server's key
    fingerprint and the federation's model ids (a device whose shard holds other models declines)."""
    return cast(dict[str, ConfigRecordValue],
                _round_config(str(phase), round_num, promised, fleet, server_key_fingerprint,
                              enroll_model, runtime_model))


def plan_round(grid: Grid, cfg: FederationConfig, cohort: list[int],
               request: dict[str, ConfigRecordValue]) -> Plan:
    """Ask every sampled device whether it takes part (policy and budget check, no training)."""
    msgs = [Message(RecordDict({PLAN_RECORD: ConfigRecord(dict(request))}), nid, "query",
                    group_id=str(request[ROUND_KEY])) for nid in cohort]
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(msgs, timeout=cfg.secagg_timeout)}
    plan = Plan([], [], [], {}, {})
    for nid in cohort:
        reply = replies.get(nid)
        if reply is None or reply.has_error():
            plan.failed.append(nid)
            if reply is not None:
                log.warning("round %d: node %d failed its plan: %s", request[ROUND_KEY], nid, reply.error.reason)
            continue
        rec = reply.content.config_records[PLAN_RECORD]
        plan.device_ids[nid] = str(rec.get(DEVICE_ID_REPLY_KEY, nid))
        if isinstance(rec.get(KEY_FINGERPRINT_REPLY_KEY), str):
            plan.fingerprints[nid] = str(rec[KEY_FINGERPRINT_REPLY_KEY])
        if "epsilon_spent" in rec:
            plan.epsilons[nid] = float(cast(float, rec["epsilon_spent"]))
        if rec.get(STATUS_KEY) == ReplyStatus.OK:
            plan.accepted.append(nid)
        else:
            plan.declined.append(nid)
            plan.reasons[nid] = str(rec.get("reason", ""))
    return plan


class Federation:
    """One federated run bound to a Grid (in-process, Flower's simulation engine, or a SuperLink)."""

    def __init__(self, grid: Grid, context: Context, cfg: FederationConfig | None = None,
                 data: FederationData | None = None, progress: Progress | None = None) -> None:
        self.grid, self.context = grid, context
        self.cfg = cfg or from_run_config(dict(context.run_config))
        self.run_dir = Path(self.cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data = data or load_federation_data(self.cfg, shard_folder(self.cfg))
        self.model = ServerModel(self.cfg, self.data.d_x, self.data.d_y, self.data.enroll_model,
                                        self.data.runtime_model)
        self.progress = progress or (lambda event: None)
        self.history: list[dict[str, Any]] = []
        self.device_epsilon: dict[str, float] = {}
        self.saturated_total = 0
        self.plan: NoisePlan | None = None
        self.pins: dict[str, str] = {}  # device id -> ledger key fingerprint pinned at first sight

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, aligners: dict[str, Any] | None = None) -> Any:
        from fed_nessa.evaluation.protocol import evaluate_eval_set

        return evaluate_eval_set(self.data.eval, SCENARIO, {"federated": self.model.comparator(), **(aligners or {})})

    @staticmethod
    def _row(report: Any, name: str) -> dict[str, Any]:
        from fed_nessa.evaluation.protocol import summary_row

        return summary_row(report, name)

    # -- the loop -----------------------------------------------------------------------
    def _noise_plan(self) -> NoisePlan:
        """The run's noise plan, built ONCE from the fleet connected when it starts.

        Every round's sigmas, round config (``fleet``) and signed public parameters come from this
        one plan: nodes joining or leaving mid-run change the cohorts sampled, never the noise the
        devices were promised.
        """
        if self.plan is None:
            self.plan = noise_plan(self.cfg, len(list(self.grid.get_node_ids())))
        return self.plan

    def _resume(self) -> int:
        if not self.cfg.resume:
            return 1
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            log.info("resume requested but no checkpoint in %s: starting at round 1", self.run_dir)
            return 1
        check_resumable(ckpt, self.cfg.to_run_config())
        self.model.load_state_dict(ckpt.model_state)
        self.history = list(ckpt.history)
        for entry in self.history:
            self.device_epsilon.update(entry.get("device_epsilon", {}))
            self.saturated_total += int(entry.get("saturated", 0))
        log.info("resumed from round %d", ckpt.round)
        return ckpt.round + 1

    def run(self) -> dict[str, Any]:
        from fed_nessa.privacy.ledger import FederationLedger

        # The private key lives in the run's key store (deployment: beside the run folder), never in it.
        ledger = FederationLedger.open(self.run_dir / LEDGER_FILE, server_key_folder(self.run_dir))
        self.pins = ledger.pinned_devices()
        self.plan = self._noise_plan()
        log.info(self.plan.reason)
        phases = self.model.phases(self.plan.aligner)
        start = self._resume()
        self.progress({"event": "start", "first_round": start, "rounds": len(phases)})
        for r in range(start, len(phases) + 1):
            entry = self.run_round(r, phases[r - 1], ledger)
            self.history.append(entry)
            save_checkpoint(self.run_dir, Checkpoint(r, self.model.state_dict(), self.history,
                                                     self.cfg.to_run_config()))
            run_folder.write_summary(self.run_dir, self.summary(final=None))
            self.progress({"event": "round", **entry})
        ledger.record_end()  # signed: a federation ledger cut back to an earlier round lacks it
        return self.finish()

    def run_round(self, r: int, phase: Phase, ledger: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        cfg = self.cfg
        nodes = list(self.grid.get_node_ids())
        if len(nodes) < 3:
            raise NotEnoughDevices(f"round {r}: {len(nodes)} node(s) connected; SecAgg+ needs at least 3")
        cohort = sample_cohort(nodes, cfg, r, phase)
        promised = promised_arrivals(cfg, len(cohort))
        server_fp = getattr(ledger, "key_fingerprint", None)
        noise = self._noise_plan()
        request = round_config(phase, r, promised, noise.fleet, server_fp if isinstance(server_fp, str) else None,
                               self.data.enroll_model, self.data.runtime_model)
        plan = plan_round(self.grid, cfg, cohort, request)
        new_pins, mismatched = self._pin(plan)
        sent: dict[str, str] = {}
        status, arrived, failed = RoundStatus.SKIPPED, [], list(plan.failed)
        saturated, note = 0, may_start(len(plan.accepted), promised).reason
        round_eps: dict[str, float] = {}
        heads: dict[str, list[int | str]] = {}
        if may_start(len(plan.accepted), promised).release:
            codec = round_codec(cfg, phase, noise, (self.model.d_x, self.model.d_y), r, promised,
                                len(plan.accepted), self.model.payload_bound(phase, noise))
            vector = np.asarray(self.model.vector(), np.float32).reshape(-1)
            # What every device of the round is sent, hashed for the federation ledger; each device
            # signs the hashes of what it received, and the audit proves they all match.
            sent = {"model_sha256": model_sha256(vector),
                    "config_sha256": config_sha256({**request, **codec.to_config()})}
            res = secure_sum(self.grid, self.context, cfg, r, plan.accepted, vector,
                             request, codec, min_release=promised)
            arrived = res.arrived
            failed += [n for n in plan.accepted if n not in set(arrived)]
            heads = _ledger_heads(res.metrics, plan.device_ids)
            if res.refused is not None:
                status, note = RoundStatus.REFUSED, res.refused
            elif not res.completed:
                status, note = RoundStatus.ABORTED, "SecAgg+ halted (too many drop-outs for its threshold)"
            elif res.sum_vector is not None:
                saturated = res.saturated
                self.saturated_total += saturated
                diag = saturation_note(saturated, r)
                if diag:
                    log.warning(diag)
                noise_g = [int(m.get("noise_arrivals", promised)) for m in res.metrics.values()]
                self.model.apply(phase, res.sum_vector, res.n_arrived, noise_arrivals=noise_g,
                                 quantization_std=codec.device_error_std(), plan=noise)
                status, note = RoundStatus.APPLIED, f"sum of {res.n_arrived} devices released (g = {promised})"
                for nid, metrics in res.metrics.items():
                    if "epsilon_spent" in metrics:
                        round_eps[plan.device_ids.get(nid, str(nid))] = float(metrics["epsilon_spent"])
        for nid, eps in plan.epsilons.items():  # devices' spend as of the plan (declined ones too)
            dev = plan.device_ids.get(nid, str(nid))
            round_eps.setdefault(dev, max(eps, self.device_epsilon.get(dev, 0.0)))
        self.device_epsilon.update(round_eps)
        if evaluates(cfg, r, len(self.model.phases(noise.aligner)), phase):
            fed = self._row(self.evaluate(), "asym_federated")
        else:
            fed = not_evaluated()
        ids = plan.device_ids
        ledger.record_round(r, [ids.get(n, str(n)) for n in arrived], [ids.get(n, str(n)) for n in plan.declined],
                            [ids.get(n, str(n)) for n in failed],
                            {"phase": str(phase), "status": str(status), "saturated": saturated,
                             "guaranteed_arrivals": promised, "note": note,
                             "decline_reasons": dict(Counter(plan.reasons.values())),
                             **sent, "device_key_fingerprints": new_pins, LEDGER_HEADS: heads,
                             PUBLIC_PARAMETERS: public_parameters(phase, cfg, noise),
                             **({"key_mismatch": mismatched} if mismatched else {})})
        eps_all = list(self.device_epsilon.values()) or [0.0]
        return {**round_entry(r, phase, status, note, fed, participants=len(arrived), declined=len(plan.declined),
                              failed=len(failed), saturated=saturated),
                "epsilon_max": max(eps_all), "epsilon_median": statistics.median(eps_all),
                "seconds": time.perf_counter() - t0, "device_epsilon": round_eps}

    def _pin(self, plan: Plan) -> tuple[dict[str, str], dict[str, str]]:
        """Pin each device's key fingerprint at first sight; refuse (as failed) a device whose key changed.

        Returns the new pins (recorded in this round's ledger entry) and the mismatches.
        """
        new, mismatched = {}, {}
        for nid, fp in plan.fingerprints.items():
            dev = plan.device_ids.get(nid, str(nid))
            known = self.pins.get(dev)
            if known is None:
                self.pins[dev] = new[dev] = fp
            elif known != fp:
                mismatched[dev] = fp
                log.warning("device %s answers with key %s, pinned %s: refused this round", dev, fp[:16], known[:16])
                for group in (plan.accepted, plan.declined):
                    if nid in group:
                        group.remove(nid)
                plan.failed.append(nid)
        return new, mismatched

    # -- outputs ------------------------------------------------------------------------
    def _device_ledgers(self) -> tuple[dict[str, float], int]:
        """Per-device epsilon from the ledgers on disk (simulation) or as devices reported it, and how
        many ledgers the run folder holds."""
        folder = self.run_dir / "devices"
        found = 0
        eps = dict(self.device_epsilon)
        if folder.is_dir():
            from fed_nessa.privacy.accounting import UnitNotCoveredError
            from fed_nessa.privacy.ledger import DEVICE_LEDGER_NAME, DeviceLedger

            for dev_dir in sorted(p for p in folder.iterdir() if (p / DEVICE_LEDGER_NAME).is_file()):
                found += 1
                ledger = DeviceLedger.open(dev_dir, dev_dir.name)
                try:  # in the run's unit: a history with no bound in it makes the claim fail loudly
                    eps[dev_dir.name] = float(ledger.epsilon(self.cfg.delta, unit=self.cfg.privacy_unit))
                except UnitNotCoveredError:
                    eps[dev_dir.name] = math.inf
        return eps, found

    def summary(self, final: dict[str, Any] | None) -> dict[str, Any]:
        eps, num_ledgers = self._device_ledgers() if final is not None else (self.device_epsilon, 0)
        rounds = [{k: v for k, v in e.items() if k != "device_epsilon"} for e in self.history]
        return {
            "config": run_folder.portable_config(self.cfg.to_run_config()),
            **({"noise_plan": run_folder.noise_plan_block(self.plan)} if self.plan else {}),
            "rounds": rounds,
            "final": final or {},
            "privacy": run_folder.privacy_block(self.cfg, eps, num_ledgers),
            "secure_aggregation": run_folder.secagg_block(self.cfg, self.saturated_total),
        }

    def centralised_rows(self) -> dict[str, Any]:
        """Non-DP NESSA and ridge fitted on the pooled device data (simulation only)."""
        from fed_nessa.evaluation.centralised import pooled_references
        from fed_nessa.model.aligners import AlignerInfo

        x, y = self.data.pooled()
        info = AlignerInfo(d_x=self.data.d_x, d_y=self.data.d_y, enroll_model=self.data.enroll_model,
                           runtime_model=self.data.runtime_model)
        refs = pooled_references(x, y, info, hidden=self.cfg.hidden, depth=self.cfg.depth,
                                 ridge_alpha=self.cfg.ridge_alpha, seed=self.cfg.seed)
        report = self.evaluate(dict(refs))
        return {"centralised_nessa": self._row(report, "asym_centralised_nessa"),
                "ridge": self._row(report, "asym_ridge"),
                "sym_before": self._row(report, "sym_before"), "sym_after": self._row(report, "sym_after")}

    def finish(self) -> dict[str, Any]:
        """The protocol's end (:func:`fed_nessa.federated.rounds.finish_run`): the pooled references when the
        run has the devices' shards (simulation), and the final evaluation report in the summary."""
        return finish_run(self.model, self.data, self.cfg, self.plan, OUTPUTS, rounds=len(self.history),
                          summary_of=self.summary, evaluation=lambda: self.evaluate().to_dict(),
                          references=self.centralised_rows if self.data.shards else None,
                          card_extra=lambda summary: {"secure_aggregation": summary["secure_aggregation"]},
                          progress=self.progress)


def _ledger_heads(metrics: dict[int, dict], device_ids: dict[int, str]) -> dict[str, list[int | str]]:
    """Each replying device's ledger head ``{id: [seq, sha256]}`` as its train reply states it."""
    heads: dict[str, list[int | str]] = {}
    for nid, m in metrics.items():
        seq, digest = m.get(LEDGER_SEQ_REPLY_KEY), m.get(LEDGER_HEAD_REPLY_KEY)
        if isinstance(seq, int) and isinstance(digest, str):
            heads[device_ids.get(nid, str(nid))] = [seq, digest]
    return heads


def run_federation(grid: Grid, context: Context, **kwargs: Any) -> dict[str, Any]:
    """Run every round of the configured federation on ``grid``; returns the summary."""
    return Federation(grid, context, **kwargs).run()
