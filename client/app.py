"""The fed-nessa ClientApp (``app``): one edge device of the federation.

Two messages per round, both answered from the device's own shard and ledger:

* ``query`` (the plan): the server says which phase and round come next and the
  number of arrivals g it promises; the device checks the request against its own
  policy (from its node config, fixed in its ledger header) and its budget
  (``plan_round``, no training) and answers ``status`` ``ok`` or ``declined`` with a
  reason. A device that declines never enters the SecAgg+ cohort.
* ``train`` (the SecAgg+ stages): ``secaggplus_mod`` runs the protocol (``distributed-mechanism =
  skellam``: :data:`~fed_nessa.federated.secagg_field.exact_secaggplus_mod`, whose quantizer is the
  identity on the device's field elements, so nothing of Flower's rounding decides the guarantee); at its
  "collect masked vectors" stage it calls the handler below, which trains
  (``client_round``: DP-SGD etc., every DP event recorded in the device's
  ledger), scales the vector into SecAgg+'s range with the round's codec,
  checks its own range (a saturated vector fails here, nothing sent), and answers
  in the legacy ``fitres`` layout
  with a CONSTANT weight (never ``num_examples``). The mod masks and
  quantizes it; only masked integers leave the device.

What leaves a device beyond the masked vector: the plan's status/reason, its
ledger's public-key fingerprint (pinned by the server), its ledger head after the
round (signed by the server into its record of the round) and the metric keys in
:data:`REPLY_METRIC_KEYS` (privacy spend, a decline reason). A round whose server
key fingerprint differs from the one the device pinned is declined; the device
signs the SHA-256 of the model and round config it received into its ledger.
Any other metric the round logic returns is dropped here, so a new
metric cannot leak data sizes or losses by accident.

A bad shard, a missing ledger folder or a decline discovered at training time
raise: the device answers with an error, drops out of the SecAgg+ round
(its masks are reconstructed by its neighbours) and the round goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client.device import DeviceRuntime, default_runtime
from client.mods import is_secagg_message, secagg_only_mod
from fed_nessa.config import FederationConfig, Phase, ReplyStatus, from_run_config, policy_from_node_config
from fed_nessa.errors import FedNessaError
from fed_nessa.federated.codec import CONSTANT_WEIGHT, SecAggCodec
from fed_nessa.federated.device import RoundRequest
from fed_nessa.federated.protocol import (
    DEVICE_ID_REPLY_KEY,
    ENROLL_MODEL_KEY,
    FLEET_SIZE_KEY,
    KEY_FINGERPRINT_REPLY_KEY,
    LEDGER_HEAD_REPLY_KEY,
    LEDGER_SEQ_REPLY_KEY,
    PHASE_KEY,
    PLAN_RECORD,
    PROMISED_ARRIVALS_KEY,
    REPLY_METRIC_KEYS,
    ROUND_KEY,
    RUNTIME_MODEL_KEY,
    SERVER_KEY_FINGERPRINT_KEY,
    STATUS_KEY,
    locate,
    request_centre,
    request_clip,
)
from fed_nessa.privacy.ledger import config_sha256

log = logging.getLogger(__name__)


class RoundDeclined(FedNessaError, RuntimeError):
    """The device declined at training time (e.g. the budget changed since the plan)."""


def _config(context: Context) -> FederationConfig:
    return from_run_config(dict(context.run_config))


def _request(config: Mapping[str, Any]) -> RoundRequest:
    """The round's request from a plan or fit config (a missing key is a protocol error).

    It carries the server's key fingerprint (the device pins it) and the SHA-256 of the whole
    config as received (signed into the round's reserve entry with the model's hash), and the
    federation's model ids (the device declines a round for models its shard was not embedded with).
    """
    def text(key: str) -> str | None:
        value = config.get(key)
        return None if value is None else str(value)

    centre = request_centre(config)

    return RoundRequest(Phase(str(config[PHASE_KEY])), int(cast(int, config[ROUND_KEY])),
                        int(cast(int, config[PROMISED_ARRIVALS_KEY])), int(cast(int, config[FLEET_SIZE_KEY])),
                        server_key_fingerprint=text(SERVER_KEY_FINGERPRINT_KEY),
                        config_sha256=config_sha256(dict(config)),
                        enroll_model=text(ENROLL_MODEL_KEY),
                        runtime_model=text(RUNTIME_MODEL_KEY),
                        centre=None if centre is None else tuple(centre.tolist())).at_clip(request_clip(dict(config)))


def _safe_metrics(metrics: Mapping[str, Any]) -> dict[str, bool | bytes | float | int | str]:
    """Keep only the contract's metric keys with scalar values (see module doc)."""
    out: dict[str, bool | bytes | float | int | str] = {}
    for key, value in metrics.items():
        if key not in REPLY_METRIC_KEYS:
            log.debug("dropping metric %r from the reply: not in the reply contract", key)
            continue
        if isinstance(value, bool | np.bool_):
            out[key] = int(value)
        elif isinstance(value, int | np.integer):
            out[key] = int(value)
        elif isinstance(value, float | np.floating):
            out[key] = float(value)
        elif isinstance(value, str):
            out[key] = value
    return out


def _ledger_head(ledger: Any) -> dict[str, int | str]:
    """The ledger's head after the round (the server signs it: a later cut of the ledger is caught)."""
    head = getattr(ledger, "head", None)
    if not callable(head):
        return {}
    seq, digest = head()
    return {LEDGER_SEQ_REPLY_KEY: int(seq), LEDGER_HEAD_REPLY_KEY: str(digest)}


def _payload(cfg: FederationConfig, vector: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """What the device hands SecAgg+: its field elements, already as Flower's exact quantizer reads them
    (``skellam``: a value outside the server's field fails in the mod, nothing sent), or its vector
    scaled into the codec's range (the continuous Gaussian)."""
    if cfg.integer_noise:
        return np.asarray(vector, np.float64)
    return SecAggCodec.from_config(config).encode(vector)[0]


def build_client_app(runtime: DeviceRuntime | None = None) -> ClientApp:
    """A ClientApp bound to ``runtime`` (default: the production round logic, loaded lazily)."""
    app = ClientApp(mods=[secagg_only_mod])
    cache: dict[str, DeviceRuntime] = {}

    def rt() -> DeviceRuntime:
        if "rt" not in cache:
            cache["rt"] = runtime or default_runtime()
        return cache["rt"]

    def open_device(context: Context, cfg: FederationConfig) -> tuple[Any, Any, Any, Any]:
        node_config = dict(context.node_config)
        paths = locate(node_config, cfg)
        policy = policy_from_node_config(node_config)  # the device's own; its ledger header wins
        shard = rt().load_shard(paths.shard)
        ledger = rt().open_ledger(paths.state_dir, paths.device_id, policy, paths.key_dir)
        return paths, shard, ledger, policy

    @app.query()
    def plan(msg: Message, context: Context) -> Message:
        cfg = _config(context)
        req = _request(msg.content.config_records[PLAN_RECORD])
        paths, shard, ledger, policy = open_device(context, cfg)
        outcome = rt().plan_round(req, shard, cfg, ledger, policy)
        # The device id is a stable pseudonym (the shard's name) for the federation ledger.
        reply = {STATUS_KEY: str(outcome.status), DEVICE_ID_REPLY_KEY: paths.device_id,
                 **_safe_metrics(outcome.metrics)}
        fingerprint = getattr(ledger, "key_fingerprint", None)
        if isinstance(fingerprint, str):  # the server pins it at first sight
            reply[KEY_FINGERPRINT_REPLY_KEY] = fingerprint
        return Message(RecordDict({PLAN_RECORD: ConfigRecord(reply)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if not is_secagg_message(msg):
            raise RuntimeError("refusing to send an update outside a SecAgg+ round (no secaggplus record)")
        cfg = _config(context)
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        global_vector = parameters_to_ndarrays(fitins.parameters)[0].astype(np.float32, copy=False)
        _paths, shard, ledger, policy = open_device(context, cfg)
        outcome = rt().client_round(_request(fitins.config), shard, global_vector, cfg, ledger, policy)
        if outcome.status != ReplyStatus.OK or outcome.vector is None:
            raise RoundDeclined(f"declined at training: {outcome.metrics.get('reason', outcome.status)}")
        payload = _payload(cfg, outcome.vector, dict(fitins.config))
        fitres = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters([payload]),
            num_examples=CONSTANT_WEIGHT,
            metrics=_safe_metrics({**outcome.metrics, **_ledger_head(ledger)}),
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    return app


app = build_client_app()
