"""Where the block workers run: in this process (a list) or as Ray actors (one per block).

The driver keeps the round protocol and calls every worker with the same request
(:meth:`Backend.call`); a backend only decides where the workers live. Ray is the
scale-out: one actor per block owns its devices' data, keys and ledgers for the run, and
returns one partial sum per round. Local Ray pays actor start-up and pickling, so it is used
from :data:`RAY_MIN_DEVICES` devices (measured: BENCHMARKS.md "Block engine") or when
``ray_address`` names an existing cluster to join; below, workers run in-process.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Protocol

from fed_nessa.config import DevicePolicy, FederationConfig
from fed_nessa.sim.blocks.worker import BlockSpec, BlockWorker

#: Fleets from this many devices run on local Ray when more than one core is free (below: in-process).
RAY_MIN_DEVICES = 20_000
#: The backends by name (``--backend``).
IN_PROCESS, RAY, AUTO = "in-process", "ray", "auto"
BACKENDS = (AUTO, IN_PROCESS, RAY)


class Backend(Protocol):
    """Calls every block worker with one request and returns their replies in block order."""

    def call(self, method: str, request: Any) -> list[Any]: ...

    def close(self) -> list[str]: ...


class InProcessBackend:
    """The workers as a list in this process (one at a time: no parallelism, no start-up)."""

    name = IN_PROCESS

    def __init__(self, specs: Sequence[BlockSpec], cfg: FederationConfig, policy: DevicePolicy) -> None:
        self.workers = [BlockWorker(spec, cfg, policy) for spec in specs]

    def call(self, method: str, request: Any) -> list[Any]:
        return [getattr(w, method)(request) for w in self.workers]

    def close(self) -> list[str]:
        return [w.close() for w in self.workers]


class RayBackend:
    """One Ray actor per block (one CPU each, one GPU each where the cluster has them)."""

    name = RAY

    def __init__(self, specs: Sequence[BlockSpec], cfg: FederationConfig, policy: DevicePolicy, *,
                 address: str | None = None, num_cpus: int | None = None) -> None:
        import ray

        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus or len(specs), include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
        self._ray = ray
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= len(specs) else 0
        if gpus:
            specs = [dataclasses.replace(s, device="cuda") for s in specs]
        actor: Any = ray.remote(BlockWorker).options(num_cpus=1, num_gpus=gpus)  # Ray's handles are untyped
        self.actors: list[Any] = [actor.remote(spec, cfg, policy) for spec in specs]

    def call(self, method: str, request: Any) -> list[Any]:
        ref = self._ray.put(request)  # one copy in the object store, not one per actor
        return list(self._ray.get([getattr(a, method).remote(ref) for a in self.actors]))

    def close(self) -> list[str]:
        folders = list(self._ray.get([a.close.remote() for a in self.actors]))
        for a in self.actors:
            self._ray.kill(a)
        return folders


def choose_backend(name: str, devices: int, ray_address: str | None) -> str:
    """``auto``: Ray when joining a cluster, or from :data:`RAY_MIN_DEVICES` devices on a multi-core machine."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != AUTO:
        return name
    if ray_address:
        return RAY
    return RAY if devices >= RAY_MIN_DEVICES and (os.cpu_count() or 1) > 1 else IN_PROCESS


def make_backend(name: str, specs: Sequence[BlockSpec], cfg: FederationConfig, policy: DevicePolicy, *,
                 ray_address: str | None = None) -> Backend:
    """The backend ``name`` (after :func:`choose_backend`) running one worker per spec."""
    devices = sum(s.stop - s.first for s in specs)
    if choose_backend(name, devices, ray_address) == RAY:
        return RayBackend(specs, cfg, policy, address=ray_address)
    return InProcessBackend(specs, cfg, policy)
