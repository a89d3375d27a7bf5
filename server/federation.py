"""The Flower + SecAgg+ engine: the round protocol's transport over a Flower Grid.

The rounds themselves are the library's (:func:`fed_nessa.federated.protocol_loop.run_protocol`:
cohort, promised g, key pinning, the release rule, apply, the federation-ledger record, evaluation,
the end of the run). This engine says how they travel:

* the cohort: ``clients-per-round`` of the connected nodes (seeded by ``(seed, r)``: a resumed run
  samples the same cohorts), never fewer than 3 connected;
* asking: a light ``query`` message per device with the round config (:func:`plan_round`); devices
  whose policy or budget does not allow the round decline, bad shards answer with an error;
* the secure sum: one SecAgg+ round over the accepted devices (:func:`server.secagg_round.secure_sum`),
  which never unmasks fewer than g masked vectors;
* after each round: a checkpoint and ``summary.json`` (``resume = true`` restarts from the last one).

At the end: the aligner artifact, the centralised comparison rows (simulation), ``report.md`` and
the plots (:func:`fed_nessa.federated.rounds.finish_run`).
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.grid import Grid

from fed_nessa.config import FederationConfig, Phase, ReplyStatus, from_run_config
from fed_nessa.data.population import Population
from fed_nessa.data.registry import load_federation_data
from fed_nessa.errors import FedNessaError
from fed_nessa.evaluation import run_folder
from fed_nessa.evaluation.gate import SHIPPED, card_fields, gate_run
from fed_nessa.evaluation.protocol import evaluate_held_out, federated_row, reference_rows
from fed_nessa.federated.cohort import sample_positions
from fed_nessa.federated.engine import Answers, Ending, Engine, Pins, Released, RunState
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
from fed_nessa.federated.protocol_loop import run_protocol
from fed_nessa.federated.rounds import Progress, RunOutputs
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.federated.skellam_mechanism import RoundCodec
from fed_nessa.privacy.ledger import FederationLedger, config_sha256, model_sha256
from server.checkpoint import Checkpoint, check_resumable, latest_checkpoint, save_checkpoint
from server.secagg_round import secure_sum

log = logging.getLogger(__name__)
#: The end of a run: evaluation's gate and run folder, injected into the library's protocol.
OUTPUTS = RunOutputs(gate_run, card_fields, SHIPPED, run_folder.write_outputs, federated_row)


class NotEnoughDevices(FedNessaError, RuntimeError):
    """Fewer nodes are connected than one SecAgg+ round needs."""


def sample_cohort(node_ids: list[int], cfg: FederationConfig, round_num: int, phase: str = "") -> list[int]:
    """The round's devices (:func:`fed_nessa.federated.cohort.sample_positions` over the sorted node ids)."""
    nodes = sorted(int(n) for n in node_ids)
    # Sample positions, not ids: Flower's node ids reach 2**64 and numpy would turn them into floats.
    return sorted(nodes[i] for i in sample_positions(len(nodes), cfg, round_num, phase))


def plan_round(grid: Grid, cfg: FederationConfig, cohort: list[int], request: dict[str, Any]) -> Answers:
    """Ask every sampled device whether it takes part (policy and budget check, no training)."""
    msgs = [Message(RecordDict({PLAN_RECORD: ConfigRecord(dict(request))}), nid, "query",
                    group_id=str(request[ROUND_KEY])) for nid in cohort]
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(msgs, timeout=cfg.secagg_timeout)}
    ids: dict[int, str] = {}
    answers = Answers(device_ids=ids)
    for nid in cohort:
        reply = replies.get(nid)
        if reply is None or reply.has_error():
            answers.failed.append(nid)
            if reply is not None:
                log.warning("round %d: node %d failed its plan: %s", request[ROUND_KEY], nid, reply.error.reason)
            continue
        rec = reply.content.config_records[PLAN_RECORD]
        ids[nid] = str(rec.get(DEVICE_ID_REPLY_KEY, nid))
        if isinstance(rec.get(KEY_FINGERPRINT_REPLY_KEY), str):
            answers.fingerprints[nid] = str(rec[KEY_FINGERPRINT_REPLY_KEY])
        if "epsilon_spent" in rec:
            answers.epsilons[nid] = float(cast(float, rec["epsilon_spent"]))
        if rec.get(STATUS_KEY) == ReplyStatus.OK:
            answers.accepted.append(nid)
        else:
            answers.declined.append(nid)
            answers.reasons[nid] = str(rec.get("reason", ""))
    return answers


class Federation(Engine):
    """One federated run bound to a Grid (in-process, Flower's simulation engine, or a SuperLink)."""

    name = "flower"

    def __init__(self, grid: Grid, context: Context, cfg: FederationConfig | None = None,
                 data: Population | None = None, progress: Progress | None = None) -> None:
        self.grid, self.context = grid, context
        self.cfg = cfg or from_run_config(dict(context.run_config))
        self.run_dir = Path(self.cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data = data or load_federation_data(self.cfg, shard_folder(self.cfg))
        self.model = ServerModel(self.cfg, self.data.d_x, self.data.d_y, self.data.enroll_model,
                                 self.data.runtime_model)
        self.progress = progress or (lambda event: None)
        self.state = RunState()
        self.device_epsilon: dict[str, float] = {}
        self.plan: NoisePlan | None = None

    def run(self) -> dict[str, Any]:
        """Every round through the library's round protocol; returns the summary."""
        return run_protocol(self, OUTPUTS, self.progress)

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, aligners: dict[str, Any] | None = None) -> Any:
        """The global aligner (and ``aligners``) on the held-out evaluation set."""
        return evaluate_held_out(*self.data.evaluation(), {"federated": self.model.comparator(), **(aligners or {})})

    # -- the engine (fed_nessa.federated.engine.Engine) ------------------------------------
    def noise_plan(self) -> NoisePlan:
        """The run's noise plan, built ONCE from the fleet connected when it starts.

        Every round's sigmas, round config (``fleet``) and signed public parameters come from this
        one plan: nodes joining or leaving mid-run change the cohorts sampled, never the noise the
        devices were promised.
        """
        if self.plan is None:
            self.plan = noise_plan(self.cfg, len(list(self.grid.get_node_ids())), (self.data.d_x, self.data.d_y))
        return self.plan

    def start(self, ledger: FederationLedger, pins: Pins, state: RunState) -> int:
        """``resume = true``: the model, history and reported epsilons of the last checkpoint."""
        self.state = state
        if not self.cfg.resume:
            return 1
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            log.info("resume requested but no checkpoint in %s: starting at round 1", self.run_dir)
            return 1
        check_resumable(ckpt, self.cfg.to_run_config())
        self.model.load_state_dict(ckpt.model_state)
        state.history[:] = list(ckpt.history)
        for entry in state.history:
            self.device_epsilon.update(entry.get("device_epsilon", {}))
            state.saturated_total += int(entry.get("saturated", 0))
        log.info("resumed from round %d", ckpt.round)
        return ckpt.round + 1

    def cohort(self, r: int, phase: Phase) -> list[int]:
        nodes = list(self.grid.get_node_ids())
        if len(nodes) < 3:
            raise NotEnoughDevices(f"round {r}: {len(nodes)} node(s) connected; SecAgg+ needs at least 3")
        return sample_cohort(nodes, self.cfg, r, phase)

    def ask(self, r: int, phase: Phase, cohort: list[int], request: dict[str, Any]) -> Answers:
        return plan_round(self.grid, self.cfg, cohort, request)

    def secure_sum(self, r: int, phase: Phase, answers: Answers, request: dict[str, Any], codec: RoundCodec,
                   promised: int) -> Released:
        """One SecAgg+ round; the workflow refuses to unmask fewer than ``promised`` masked vectors."""
        vector = np.asarray(self.model.vector(), np.float32).reshape(-1)
        # What every device of the round is sent, hashed for the federation ledger; each device
        # signs the hashes of what it received, and the audit proves they all match.
        sent = {"model_sha256": model_sha256(vector), "config_sha256": config_sha256({**request, **codec.to_config()})}
        res = secure_sum(self.grid, self.context, self.cfg, r, answers.accepted, vector, request, codec,
                         min_release=promised)
        out = Released(None, res.arrived, res.n_arrived, refused=res.refused, saturated=res.saturated,
                       heads=_ledger_heads(res.metrics, answers), evidence=sent,
                       aborted=None if res.completed or res.refused is not None
                       else "SecAgg+ halted (too many drop-outs for its threshold)")
        if res.refused is None and res.completed and res.sum_vector is not None:
            out.total = res.sum_vector
            out.noise_arrivals = [int(m.get("noise_arrivals", promised)) for m in res.metrics.values()]
            out.epsilons = {answers.device_id(nid): float(m["epsilon_spent"])
                            for nid, m in res.metrics.items() if "epsilon_spent" in m}
        return out

    def device_epsilons(self, r: int, phase: Phase, answers: Answers, released: Released | None) -> dict[str, Any]:
        """Epsilon as the devices reported it: with their contribution, else as of the plan (declined ones too)."""
        round_eps = dict(released.epsilons) if released is not None else {}
        for nid, eps in answers.epsilons.items():
            dev = answers.device_id(nid)
            round_eps.setdefault(dev, max(eps, self.device_epsilon.get(dev, 0.0)))
        self.device_epsilon.update(round_eps)
        eps_all = list(self.device_epsilon.values()) or [0.0]
        return {"epsilon_max": max(eps_all), "epsilon_median": statistics.median(eps_all), "device_epsilon": round_eps}

    def round_done(self, r: int, rounds: int, entry: dict[str, Any]) -> None:
        """A checkpoint and summary.json after every round (a resumed run restarts from here)."""
        save_checkpoint(self.run_dir, Checkpoint(r, self.model.state_dict(), self.state.history,
                                                 self.cfg.to_run_config()))
        run_folder.write_summary(self.run_dir, self.summary(final=None))

    def ending(self) -> Ending:
        """The pooled references when the run has the devices' shards (simulation), and the final
        evaluation report in the summary."""
        return Ending(summary_of=self.summary, evaluation=lambda: self.evaluate().to_dict(),
                      references=self.centralised_rows if self.data.shards else None,
                      card_extra=lambda summary: {"secure_aggregation": summary["secure_aggregation"]})

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
        rounds = [{k: v for k, v in e.items() if k != "device_epsilon"} for e in self.state.history]
        return {
            "config": run_folder.portable_config(self.cfg.to_run_config()),
            **({"noise_plan": run_folder.noise_plan_block(self.plan)} if self.plan else {}),
            "rounds": rounds,
            "final": final or {},
            "privacy": run_folder.privacy_block(self.cfg, eps, num_ledgers),
            "secure_aggregation": run_folder.secagg_block(self.cfg, self.state.saturated_total),
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
        return reference_rows(self.evaluate(dict(refs)))


def _ledger_heads(metrics: dict[int, dict], answers: Answers) -> dict[str, list[int | str]]:
    """Each replying device's ledger head ``{id: [seq, sha256]}`` as its train reply states it."""
    heads: dict[str, list[int | str]] = {}
    for nid, m in metrics.items():
        seq, digest = m.get(LEDGER_SEQ_REPLY_KEY), m.get(LEDGER_HEAD_REPLY_KEY)
        if isinstance(seq, int) and isinstance(digest, str):
            heads[answers.device_id(nid)] = [seq, digest]
    return heads


def run_federation(grid: Grid, context: Context, **kwargs: Any) -> dict[str, Any]:
    """Run every round of the configured federation on ``grid``; returns the summary."""
    return Federation(grid, context, **kwargs).run()
