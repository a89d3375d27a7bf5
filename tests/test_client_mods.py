"""The ClientApp's mod: SecAgg+ stages go through ``secaggplus_mod``; nothing else does, and no update
leaves a device outside a SecAgg+ round (the train handler refuses a train message without its record)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

import client.mods as mods
from client.app import build_client_app


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages take their sender from Flower's task identity, which a runtime sets (here: the test)."""
    for key, value in {"_task_id": 1, "_run_id": 1, "_node_id": SUPERLINK_NODE_ID}.items():
        monkeypatch.setattr(TaskIdentity, key, value, raising=False)


def _message(secagg: bool, kind: str = "train") -> Message:
    records: dict[str, Any] = {"config": ConfigRecord({"x": 1})}
    if secagg:
        records[RECORD_KEY_CONFIGS] = ConfigRecord({"stage": "setup"})
    return Message(RecordDict(records), 1001, kind)


def _context(mechanism: str = "gaussian") -> Context:
    """A node's context; its run config picks Flower's mod (``gaussian``) or the exact one (``skellam``)."""
    return Context(run_id=1, node_id=1001, node_config={}, state=RecordDict(),
                   run_config={"distributed-mechanism": mechanism})


def test_a_message_is_secagg_only_with_the_secaggplus_record() -> None:
    assert mods.is_secagg_message(_message(secagg=True))
    assert not mods.is_secagg_message(_message(secagg=False))
    assert not mods.is_secagg_message(_message(secagg=False, kind="query"))


@pytest.mark.parametrize("secagg", [True, False])
def test_only_secagg_messages_reach_secaggplus_mod(monkeypatch: pytest.MonkeyPatch, secagg: bool) -> None:
    seen: list[str] = []
    answer = _message(secagg=False)

    def fake_secaggplus(msg: Message, context: Context, call_next: Any) -> Message:
        seen.append("secaggplus_mod")
        return answer

    def call_next(msg: Message, context: Context) -> Message:
        seen.append("handler")
        return answer

    monkeypatch.setattr(mods, "secaggplus_mod", fake_secaggplus)
    assert mods.secagg_only_mod(_message(secagg), _context(), call_next) is answer
    assert seen == (["secaggplus_mod"] if secagg else ["handler"])


def test_the_default_mechanism_takes_the_exact_mod(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the default (skellam) a SecAgg+ message goes to the exact mod, never to Flower's quantizer."""
    seen: list[str] = []

    def record(name: str) -> Any:
        def mod(msg: Message, context: Context, call_next: Any) -> Message:
            seen.append(name)
            return msg
        return mod

    monkeypatch.setattr(mods, "secaggplus_mod", record("flower"))
    monkeypatch.setattr(mods, "exact_secaggplus_mod", record("exact"))
    empty = Context(run_id=1, node_id=1001, node_config={}, state=RecordDict(), run_config={})
    mods.secagg_only_mod(_message(True), empty, lambda m, c: m)
    mods.secagg_only_mod(_message(True), _context("gaussian"), lambda m, c: m)
    assert seen == ["exact", "flower"]


def test_a_train_message_outside_secagg_is_refused_before_any_device_code() -> None:
    class NoDevice:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"device code ran: {name}")

    app = build_client_app(NoDevice())  # type: ignore[arg-type]
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(3)]), {}), True)
    with pytest.raises(RuntimeError, match="refusing to send an update outside a SecAgg\\+ round"):
        app(Message(content, 1001, "train"), _context())
