"""One SecAgg+ round over a chosen cohort, returning the decoded secure SUM.

Flower 1.42's SecAgg+ server side (``SecAggPlusWorkflow``) only runs through
the legacy compatibility layer: it reads the cohort from a legacy
``Strategy.configure_fit`` and hands the unmasked aggregate to
``Strategy.aggregate_fit``. This module wraps that in one call,
:func:`secure_sum`, with a tiny capture strategy, so the rest of the server
deals only in numpy vectors:

* the cohort is exactly the devices the server chose (those that accepted the
  round's plan), each receiving the same legacy ``FitIns`` (global vector +
  round config, including the :class:`~fed_nessa.federated.codec.SecAggCodec`);
* every device answers with the same weight, so the workflow's output is the
  plain mean of the arrived payloads, which :meth:`SecAggCodec.decode` turns
  back into the SUM and the cohort's total saturation count;
* the server never sees an individual vector: only masked vectors go through
  the Grid, and the workflow reveals only their sum;
* the release rule is checked **before unmasking**: :class:`GuardedSecAggPlusWorkflow`
  refuses to enter the unmask stage when fewer masked vectors arrived than the round's
  promised ``g``, so no unmasking share is requested and no sum exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp.grid import Grid

from fed_nessa.config import SECAGG_MODULUS_RANGE, FederationConfig
from fed_nessa.federated.codec import MAX_WEIGHT, SecAggCodec
from fed_nessa.federated.integer_mechanism import WrapAroundError
from fed_nessa.federated.release import may_unmask
from fed_nessa.federated.skellam_mechanism import IntegerCodec


@dataclass
class SecureSum:
    """What one SecAgg+ round revealed: the sum, how many devices it covers, and who failed."""

    completed: bool
    sum_vector: np.ndarray | None  # float32, devices' units; None when the protocol halted or refused
    n_arrived: int
    saturated: int
    arrived: list[int] = field(default_factory=list)  # node ids whose masked vector is in the sum
    failures: list[str] = field(default_factory=list)  # error reasons (no data, only what failed)
    metrics: dict[int, dict] = field(default_factory=dict)  # per-node reply metrics (contract-limited)
    refused: str | None = None  # why the server refused to unmask (too few arrivals), if it did
    masked_arrivals: int = 0  # masked vectors that reached the server (before unmasking)


class _CohortStrategy(Strategy):
    """Legacy strategy that configures exactly the given cohort and captures the aggregate."""

    def __init__(self, grid: Grid, run_id: int, cohort: list[int], fit_config: dict) -> None:
        self._grid = grid
        self._run_id = run_id
        self._cohort = list(cohort)
        self._fit_config = dict(fit_config)
        self.mean: np.ndarray | None = None
        self.arrived: list[int] = []
        self.metrics: dict[int, dict] = {}
        self.failures: list[str] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        ins = FitIns(parameters=parameters, config=self._fit_config)
        return [(GridClientProxy(nid, self._grid, self._run_id), ins) for nid in self._cohort]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        self.failures = [str(f) for f in failures]
        if not results:
            return None, {}
        # After unmasking, every result carries the same (aggregated) parameters.
        self.mean = parameters_to_ndarrays(results[0][1].parameters)[0]
        self.arrived = [int(proxy.node_id) for proxy, _ in results]  # type: ignore[attr-defined]
        self.metrics = {int(proxy.node_id): dict(res.metrics) for proxy, res in results}  # type: ignore[attr-defined]
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        return None, {}

    def evaluate(self, server_round, parameters):  # type: ignore[no-untyped-def]
        return None


class GuardedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow that checks the release rule before it asks for unmasking shares."""

    def __init__(self, *, min_release: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_release = int(min_release)
        self.refused: str | None = None
        self.masked_arrivals = 0

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        self.masked_arrivals = len(state.active_node_ids)
        decision = may_unmask(self.masked_arrivals, self.min_release)
        if not decision.release:
            self.refused = decision.reason
            return False  # no unmask message is sent: the masked sum stays masked
        return bool(super().unmask_stage(grid, context, state))


def make_workflow(cfg: FederationConfig, min_release: int,
                  ranges: tuple[float, int, int] | None = None) -> GuardedSecAggPlusWorkflow:
    """The guarded SecAgg+ workflow: integer shares/threshold, a constant weight (never num_examples).

    ``ranges`` (clipping range, quantization range, modulus) are the round codec's
    (:meth:`SecAggCodec.flower_ranges`; the integer mechanism's make the quantizer exact); None:
    the run config's.
    """
    clipping, quantization, modulus = ranges or (cfg.secagg_clipping_range, cfg.secagg_quantization_range,
                                                 SECAGG_MODULUS_RANGE)
    return GuardedSecAggPlusWorkflow(
        min_release=min_release,
        num_shares=int(cfg.secagg_num_shares),
        reconstruction_threshold=int(cfg.secagg_reconstruction_threshold),
        max_weight=MAX_WEIGHT,
        clipping_range=float(clipping),
        quantization_range=int(quantization),
        modulus_range=int(modulus),
        timeout=cfg.secagg_timeout,
    )


def secure_sum(grid: Grid, context: Context, cfg: FederationConfig, round_num: int, cohort: list[int],
               global_vector: np.ndarray, fit_config: dict, codec: SecAggCodec | IntegerCodec, *,
               min_release: int) -> SecureSum:
    """Run one SecAgg+ round over ``cohort`` and decode the SUM of the arrived devices' vectors.

    ``fit_config`` (flat, ConfigRecord-safe) and the codec travel to every
    device with the global vector. Drop-outs below the reconstruction
    threshold are survived by the protocol; if it halts, ``completed`` is
    False and no sum is revealed. Fewer than ``min_release`` masked vectors:
    the unmask stage never starts (``refused`` says why) and no sum is revealed.
    """
    strategy = _CohortStrategy(grid, context.run_id, cohort, {**fit_config, **codec.to_config()})
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(round_num)})
    state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
        [np.asarray(global_vector, dtype=np.float32).reshape(-1)]
    )
    legacy = LegacyContext(
        Context(run_id=context.run_id, node_id=context.node_id, node_config=dict(context.node_config),
                state=state, run_config=dict(context.run_config)),
        strategy=strategy,
        client_manager=SimpleClientManager(),
    )
    workflow = make_workflow(cfg, min_release, codec.flower_ranges())
    workflow(grid, legacy)
    if strategy.mean is None:
        return SecureSum(completed=False, sum_vector=None, n_arrived=0, saturated=0,
                         failures=strategy.failures, refused=workflow.refused,
                         masked_arrivals=workflow.masked_arrivals)
    try:
        total, saturated = codec.decode(strategy.mean, len(strategy.arrived))
    except WrapAroundError as exc:  # the integer mechanism's sum may have wrapped: refused, never used
        return SecureSum(completed=True, sum_vector=None, n_arrived=len(strategy.arrived), saturated=0,
                         arrived=sorted(strategy.arrived), failures=strategy.failures, metrics=strategy.metrics,
                         refused=str(exc), masked_arrivals=workflow.masked_arrivals)
    return SecureSum(completed=True, sum_vector=total, n_arrived=len(strategy.arrived), saturated=saturated,
                     arrived=sorted(strategy.arrived), failures=strategy.failures, metrics=strategy.metrics,
                     masked_arrivals=workflow.masked_arrivals)


def fit_parameters(vector: np.ndarray) -> Parameters:
    """Legacy ``Parameters`` holding one flat vector (what devices reply with)."""
    return ndarrays_to_parameters([np.asarray(vector).reshape(-1)])
