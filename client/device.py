"""Which device-side operations the ClientApp runs (injectable, so tests can spy on the wire).

The operations themselves live in :mod:`fed_nessa.federated.device` (the privacy boundary)
and :class:`fed_nessa.privacy.ledger.DeviceLedger`; where a device's files are is the wire
contract's rule (:func:`fed_nessa.federated.protocol.locate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fed_nessa.config import DevicePolicy
from fed_nessa.data.shards import Shard, load_shard


@dataclass(frozen=True)
class DeviceRuntime:
    """The device-side operations the ClientApp delegates to."""

    plan_round: Callable[..., Any]
    client_round: Callable[..., Any]
    #: (ledger folder, device id, policy, private-key folder or None for beside the ledger)
    open_ledger: Callable[[Path, str, DevicePolicy, Path | None], Any]
    load_shard: Callable[[Path], Shard] = load_shard


def default_runtime() -> DeviceRuntime:
    """The production runtime: the device's round maths and its persistent, policy-holding ledger."""
    from fed_nessa.federated import device
    from fed_nessa.privacy.ledger import DeviceLedger

    def open_ledger(folder: Path, device_id: str, policy: DevicePolicy, key_dir: Path | None = None) -> DeviceLedger:
        folder.mkdir(parents=True, exist_ok=True)
        return DeviceLedger.open(folder, device_id, policy=policy, key_folder=key_dir)

    return DeviceRuntime(plan_round=device.plan_round, client_round=device.client_round, open_ledger=open_ledger)
