"""Run a simulated federation in this process and write its run folder.

``python -m simulations.run [--config FILE] [--set key=value ...]`` and
``fed-nessa simulate`` (same options) run the real ServerApp loop and the
real ClientApp (SecAgg+, DP, ledgers) over :class:`simulations.grid.InProcessGrid`:
hundreds of virtual devices, one after another, no Ray. ``flwr run .`` runs
the same apps on Flower's own simulation engine instead (see
docs/federation.md).

A config file is a TOML table of run-config keys (kebab-case, as in
``[tool.flwr.app.config]``); ``--set`` overrides win over the file, the file
over the defaults. Everything is validated before the first round.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from fed_nessa.config import FederationConfig, from_run_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def parse_value(text: str) -> bool | int | float | str:
    """A ``--set`` value: TOML scalar syntax (``3``, ``0.5``, ``true``, ``"x"``), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML file of run-config keys; a bare name is looked up in ``simulations/configs/``."""
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / f"{path}.toml").exists():
        p = CONFIG_DIR / f"{path}.toml"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: config file not found (or a name from {CONFIG_DIR.name}/)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{p}: not valid TOML ({exc})") from None
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
    return dict(table)


def build_config(config_file: str | None, overrides: Sequence[str]) -> FederationConfig:
    """Defaults <- config file <- ``key=value`` overrides, validated; ``run-dir`` made absolute."""
    merged: dict[str, Any] = read_config_file(config_file) if config_file else {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        merged[key.strip()] = parse_value(value.strip())
    cfg = from_run_config(merged, base_dir=Path.cwd())
    changes: dict[str, Any] = {"run_dir": str(Path(cfg.run_dir).resolve())}
    if cfg.data_source not in ("synthetic", "real-dev"):
        changes["data_source"] = str(Path(cfg.data_source).resolve())
    return cfg.replace(**changes)


class ProgressView:
    """Round-by-round progress on the terminal (tqdm bar + one rich line per round)."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.quiet, self.bar = total, quiet, None

    def __call__(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if event["event"] == "start":
            self.bar = tqdm(total=self.total, initial=event["first_round"] - 1, unit="round", desc="federation",
                            file=sys.stderr, dynamic_ncols=True)
        elif event["event"] == "round" and self.bar is not None:
            eer = event.get("eer")
            self.bar.set_postfix(phase=event["phase"], status=event["status"], joined=event["participants"],
                                 eer=f"{100 * eer:.2f}%" if eer is not None else "n/a",
                                 eps_max=f"{event['epsilon_max']:.2f}", s=f"{event['seconds']:.1f}")
            self.bar.update(1)
        elif event["event"] == "done":
            if self.bar is not None:
                self.bar.close()
            from rich.console import Console

            Console(stderr=True).print(f"[bold green]run folder:[/] {event['run_dir']}")


def simulate(cfg: FederationConfig, *, quiet: bool = False, verbose: bool = False, drop: Any = None) -> dict[str, Any]:
    """Build the devices, run every round over the in-process Grid, return the summary."""
    from client.app import app as client_app
    from server.data import load_federation_data
    from server.federation import run_federation
    from simulations.grid import InProcessGrid

    # Flower logs every SecAgg+ stage of every device at DEBUG/INFO: at hundreds of devices that is
    # both noise and measurable time. Warnings (e.g. drop-outs) still show.
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    t0 = time.perf_counter()
    data = load_federation_data(cfg)
    run_config = cfg.to_run_config()
    grid = InProcessGrid(client_app, len(data.shards), run_config, drop=drop)
    context = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=run_config)
    summary = run_federation(grid, context, cfg=cfg, data=data,
                             progress=ProgressView(cfg.num_server_rounds, quiet=quiet))
    summary.setdefault("timing", {})["total_seconds"] = time.perf_counter() - t0
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file (or name in simulations/configs/) of run-config keys")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one run-config key (repeatable), e.g. --set num-devices=300")
    parser.add_argument("--run-dir", help="run folder (same as --set run-dir=...)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--verbose", action="store_true", help="show Flower's INFO log (SecAgg+ stages)")


def run_from_args(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f'run-dir="{args.run_dir}"')
    if args.resume:
        overrides.append("resume=true")
    import torch

    torch.set_num_threads(1)  # one process per core is faster here than intra-op threads
    cfg = build_config(args.config, overrides)
    summary = simulate(cfg, quiet=args.quiet, verbose=args.verbose)
    final = summary["final"]
    print(f"final EER {100 * final['eer']:.2f}%  gap closure {final['gap_closure']}  "
          f"epsilon max {summary['privacy']['epsilon_max']:.3f}  -> {cfg.run_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.run", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"simulate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
