"""Run the block engine on a lazy synthetic fleet: ``python -m fed_nessa.sim.blocks --devices N ...``.

The driver of :mod:`fed_nessa.sim.blocks.driver` until the engines share one interface (then it
becomes ``fed-nessa simulate --engine blocks``). Run-config keys as ``--set key=value`` (values
parsed as JSON where they parse, else kept as strings); the device policy is the device-level
default with ``delta`` and ``allow-reproducible-noise`` following the run and ``--guaranteed-arrivals``.

    python -m fed_nessa.sim.blocks --devices 100000 --devices-per-block 50000 --backend ray \\
        --set run-dir=runs/blocks-1e5 --set num-server-rounds=11
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fed_nessa.config import ConfigError, DevicePolicy, from_run_config
from fed_nessa.data.synthetic import population_config
from fed_nessa.sim.blocks.backends import AUTO, BACKENDS
from fed_nessa.sim.blocks.driver import BlockEngine
from fed_nessa.sim.blocks.worker import BlockError


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs as run-config entries (a value is JSON when it parses, else a string)."""
    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"--set {item!r}: expected key=value"])
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fed_nessa.sim.blocks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--devices-per-block", type=int, default=50_000)
    parser.add_argument("--backend", choices=BACKENDS, default=AUTO)
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster (default: local Ray or none)")
    parser.add_argument("--cache", action="store_true", help="workers hold their blocks' pairs between rounds")
    parser.add_argument("--guaranteed-arrivals", type=int, default=DevicePolicy().guaranteed_arrivals,
                        help="every simulated device's policy g (the noise share it sizes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run-config key")
    args = parser.parse_args(argv)
    try:
        run = {"num-devices": args.devices, "privacy-unit": "device", "ledger-layout": "sqlite",
               "clients-per-round": 0, "delta": 0.1 / max(args.devices, 1), **_overrides(args.set)}
        cfg = from_run_config(run)
        policy = DevicePolicy(privacy_unit="device", delta=cfg.delta, guaranteed_arrivals=args.guaranteed_arrivals,
                              allow_reproducible_noise=cfg.reproducible_noise)
        population = population_config(args.devices, cfg.seed)
        summary = BlockEngine(cfg, policy, population, devices_per_block=args.devices_per_block,
                              backend=args.backend, ray_address=args.ray_address, cache=args.cache).run()
    except (ConfigError, BlockError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    privacy = summary["privacy"]
    print(f"{cfg.run_dir}: {len(summary['rounds'])} round(s), {args.devices} devices, epsilon max "
          f"{privacy['epsilon_max']:.3f} (median {privacy['epsilon_median']:.3f}); audit it with "
          f"`fed-nessa audit {cfg.run_dir}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
