"""Run a simulated federation in this process and write its run folder.

``fed-nessa simulate [--config FILE] [--set key=value ...] [--device-set key=value ...]``
runs the real ServerApp loop and the real ClientApp (SecAgg+, DP, ledgers) over
:class:`fed_nessa.sim.grid.InProcessGrid`: hundreds of virtual devices, one after another,
no Ray. ``flwr run .`` runs the same apps on Flower's own simulation engine instead (see
docs/federation.md).

A config file is a TOML table of run-config keys (kebab-case, as in
``[tool.flwr.app.config]``) plus an optional ``[device]`` table: the privacy policy of
every virtual device (:class:`fed_nessa.config.DevicePolicy`). The two never mix: the
server's run-config reaches the devices only as a request, and each device's policy goes
into its own node config, as ``--node-config`` does on a real SuperNode. ``--set``
overrides win over the file, the file over the defaults; without ``--config`` the main
job's file ``simulations/configs/main.toml`` is used. Everything is validated before the
first round.

``--canaries M`` plants M canary pairs into the devices before round 1 (a hook on the
federation the runner builds; the engines are unchanged) for a privacy auditor's
``fed-nessa audit-empirical --run``; the secret goes beside the run folder
(:mod:`fed_nessa.canary.federated`).

The library never imports ``server/`` or ``client/``: like ``flwr run``, the runner runs
the apps named in ``pyproject.toml``'s ``[tool.flwr.app.components]``, loaded by
:mod:`fed_nessa.sim.launcher` (the one place the library reaches the apps and the configs).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
from flwr.app import Context, RecordDict
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID

from fed_nessa.arguments import seed_arg
from fed_nessa.config import (
    FEDERATION_NAMES,
    ConfigError,
    DevicePolicy,
    FederationConfig,
    LedgerLayout,
    Phase,
    RoundStatus,
    from_run_config,
    policy_from_node_config,
)
from fed_nessa.data.population import Population
from fed_nessa.evaluation.run_folder import epsilon_phrase
from fed_nessa.federated.mechanism import mechanism_for
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.protocol import DEVICES_DIR, device_id_of, shard_folder
from fed_nessa.privacy.ledger import check_key_store, device_id_problem
from fed_nessa.sim.launcher import config_path, load_apps
from fed_nessa.sim.replace import Replacement, plan_replacement

DEFAULT_CONFIG = "main"
#: The fleet engine's config without ``--config``: nothing sized for 1000 devices (the rest is derived).
DEFAULT_FLEET_CONFIG = "fleet"
#: Options only the block engine reads (``--devices-per-block``, ``--backend``, ``--ray-address``, ``--cache``).
BLOCK_FLAGS = ("devices_per_block", "backend", "ray_address", "cache")
DEVICE_TABLE = "device"
#: A hook that changes a federation's devices before round 1 (the federated canary audit's planting).
Planter = Callable[[Population], Population]


def parse_value(text: str) -> bool | int | float | str:
    """A ``--set`` value: TOML scalar syntax (``3``, ``0.5``, ``true``, ``"x"``), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML file of run-config keys; a bare name is looked up in ``simulations/configs/``."""
    p = config_path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not valid TOML ({exc})") from None
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
    if not isinstance(table, dict):
        raise ValueError(f"{p}: [tool.flwr.app.config] must be a table of run-config keys")
    return dict(table)


def _in_config(exc: ValueError, config_file: str | None, flag: str, overrides: Sequence[str]) -> ValueError:
    """``exc`` with the config file (and whether overrides took part) in front: the line names the file."""
    where = str(config_path(DEFAULT_CONFIG if config_file is None else config_file))
    where += f" + {flag}" if overrides else ""
    named = ConfigError(exc.problems) if isinstance(exc, ConfigError) else ValueError(str(exc))
    named.args = (f"{where}: {exc}",)
    return named


def split_device_table(table: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run-config keys, the ``[device]`` policy table) of a config file."""
    run = {k: v for k, v in table.items() if k != DEVICE_TABLE}
    device = table.get(DEVICE_TABLE, {})
    if not isinstance(device, dict):
        raise ValueError(f"[{DEVICE_TABLE}] must be a table of device-policy keys, got {device!r}")
    return run, dict(device)


def _overrides(items: Sequence[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def _tables(config_file: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config file's run-config keys and its ``[device]`` table."""
    table = read_config_file(DEFAULT_CONFIG if config_file is None else config_file)
    try:
        return split_device_table(table)
    except ValueError as exc:
        raise _in_config(exc, config_file, "", ()) from None


def build_policy(config_file: str | None, overrides: Sequence[str] = ()) -> DevicePolicy:
    """Every virtual device's policy: defaults <- the file's ``[device]`` table <- ``--device-set``."""
    _, device = _tables(config_file)
    device.update(_overrides(overrides, "--device-set"))
    unknown = sorted(set(device) - {k for k in DevicePolicy().to_node_config()})
    try:
        if unknown:
            raise ValueError(f"[{DEVICE_TABLE}]: unknown device-policy key(s) {', '.join(unknown)} (allowed: "
                             f"{', '.join(sorted(DevicePolicy().to_node_config()))})")
        return policy_from_node_config(device)
    except ValueError as exc:
        raise _in_config(exc, config_file, "--device-set", overrides) from None


def build_config(config_file: str | None, overrides: Sequence[str], *,
                 run_dir: str | Path | None = None) -> FederationConfig:
    """Defaults <- config file <- ``key=value`` overrides <- ``run_dir``, validated; ``run-dir`` made absolute.

    ``run_dir`` (``--run-dir``) is a path taken literally: through TOML's string syntax a
    backslash would be an escape (``runs\\new`` a newline) and a quote would end the string.
    """
    merged, _ = _tables(config_file)
    merged.update(_overrides(overrides, "--set"))
    if run_dir is not None:
        merged["run-dir"] = str(run_dir)
    try:
        cfg = from_run_config(merged, base_dir=Path.cwd())
    except ValueError as exc:
        raise _in_config(exc, config_file, "--set", overrides) from None
    changes: dict[str, Any] = {"run_dir": str(Path(cfg.run_dir).resolve())}
    if cfg.data_source not in FEDERATION_NAMES:
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


def device_node_config(policy: DevicePolicy) -> Callable[[int, int], dict[str, Any]]:
    """Each virtual device's node config: its partition and its own policy (never the run-config)."""
    own = policy.to_node_config()
    return lambda pid, n: {PARTITION_ID_KEY: pid, NUM_PARTITIONS_KEY: n, **own}


def _planted(data: Population, plant: Planter | None, cfg: FederationConfig) -> Population:
    """The federation after the ``plant`` hook (an audit's canaries), if any, before round 1."""
    if plant is None:
        return data
    if cfg.resume:
        raise ValueError("--resume: a run with planted canaries cannot be resumed (its devices would get them twice)")
    return plant(data)


def simulate(cfg: FederationConfig, *, policy: DevicePolicy | None = None, quiet: bool = False,
             verbose: bool = False, drop: Any = None, client_app: Any = None,
             plant: Planter | None = None) -> dict[str, Any]:
    """Build the devices, run every round over the in-process Grid, return the summary.

    The ServerApp's ``run_federation`` and the ClientApp come from the components named in
    ``pyproject.toml`` (``client_app`` may replace the latter, for tests). ``plant`` may change
    the devices once they exist and before round 1 (the federated canary audit,
    :mod:`fed_nessa.canary.federated`); the engine runs them as any other devices.
    """
    from fed_nessa.data.registry import load_federation_data
    from fed_nessa.sim.grid import InProcessGrid

    apps = load_apps(client_app)
    # Flower logs every SecAgg+ stage of every device at DEBUG/INFO: at hundreds of devices that is
    # both noise and measurable time. Warnings (e.g. drop-outs) still show.
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    t0 = time.perf_counter()
    data = _planted(load_federation_data(cfg, shard_folder(cfg)), plant, cfg)
    run_config = cfg.to_run_config()
    grid = InProcessGrid(apps.client_app, len(data.shards), run_config, drop=drop,
                         node_config=device_node_config(policy or DevicePolicy()))
    context = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=run_config)
    summary = apps.run_federation(grid, context, cfg=cfg, data=data,
                                  progress=ProgressView(cfg.num_server_rounds, quiet=quiet))
    summary.setdefault("timing", {})["total_seconds"] = time.perf_counter() - t0
    return summary


def simulate_fleet(cfg: FederationConfig, policy: DevicePolicy, *, device: str = "cpu", quiet: bool = False,
                   plant: Planter | None = None) -> dict[str, Any]:
    """The fleet engine's run; with ``plant``, its in-memory devices pass through the hook first.

    Without a hook this is :func:`fed_nessa.sim.fleet.run_fleet` itself; with one it builds the
    same data the same way, plants, and hands the devices to the same engine.
    """
    from fed_nessa.data.registry import load_federation_data
    from fed_nessa.sim.fleet import FleetEngine, run_fleet

    progress = ProgressView(cfg.num_server_rounds, quiet=quiet)
    if plant is None:
        return run_fleet(cfg, policy, device=device, progress=progress)
    t0 = time.perf_counter()
    data = _planted(load_federation_data(cfg, None), plant, cfg)
    summary = FleetEngine(cfg, policy, data, device=device, progress=progress).run()
    summary.setdefault("timing", {})["total_seconds"] = time.perf_counter() - t0
    return summary


@dataclass(frozen=True)
class RunRequest:
    """What ``fed-nessa simulate`` asks of an engine besides the config and the devices' policy."""

    device: str = "cpu"
    quiet: bool = False
    verbose: bool = False
    plant: Planter | None = None
    blocks: Any = None  # fed_nessa.sim.blocks.engine.BlockOptions (imported with the block engine)


@dataclass(frozen=True)
class EngineEntry:
    """One engine of ``--engine``: what it says in ``--help``, what it refuses, how it runs."""

    help: str
    #: Why this engine cannot run the config and request (one sentence), or None; checked before anything is written.
    refusal: Callable[[FederationConfig, DevicePolicy, RunRequest], str | None]
    run: Callable[[FederationConfig, DevicePolicy, RunRequest], dict[str, Any]]


def _flower_refusal(cfg: FederationConfig, policy: DevicePolicy, req: RunRequest) -> str | None:
    if cfg.ledger_layout != LedgerLayout.FILES:
        return (f"ledger-layout = {cfg.ledger_layout!r}: on the Flower engine every device keeps its own ledger file "
                "(as a real device does); the ledger store is the fleet and block engines'")
    return None


def _fleet_refusal(cfg: FederationConfig, policy: DevicePolicy, req: RunRequest) -> str | None:
    if cfg.resume:
        return "--resume: fleet-engine runs are simulations without checkpoints; start a new run folder"
    if cfg.data_source not in FEDERATION_NAMES:
        return (f"data-source {cfg.data_source}: the fleet engine builds its devices in memory from "
                f"{' or '.join(FEDERATION_NAMES)}; run a folder of shards with --engine flower")
    return None


def _blocks_refusal(cfg: FederationConfig, policy: DevicePolicy, req: RunRequest) -> str | None:
    from fed_nessa.sim.blocks.engine import refusal

    if req.plant is not None:
        return "--canaries: the block engine's devices are generated lazily, nothing can be planted; use --engine fleet"
    if req.device != "cpu":
        return (f"--device {req.device}: the block engine runs its workers' maths where they live (a Ray actor takes "
                "one GPU each where the cluster has one per block); leave --device at cpu")
    return refusal(cfg, policy)


def _run_flower(cfg: FederationConfig, policy: DevicePolicy, req: RunRequest) -> dict[str, Any]:
    return simulate(cfg, policy=policy, quiet=req.quiet, verbose=req.verbose, plant=req.plant)


def _run_fleet(cfg: FederationConfig, policy: DevicePolicy, req: RunRequest) -> dict[str, Any]:
    return simulate_fleet(cfg, policy, device=req.device, quiet=req.quiet, plant=req.plant)


def _run_blocks(cfg: FederationConfig, policy: DevicePolicy, req: RunRequest) -> dict[str, Any]:
    from fed_nessa.sim.blocks.engine import BlockOptions, run_blocks

    return run_blocks(cfg, policy, req.blocks or BlockOptions(),
                      progress=ProgressView(cfg.num_server_rounds, quiet=req.quiet))


#: The engines, named once: ``--engine``, :func:`run_engine` and the docs read this table.
ENGINES: dict[str, EngineEntry] = {
    "flower": EngineEntry("the real ServerApp/ClientApp with SecAgg+ (the main job)", _flower_refusal, _run_flower),
    "fleet": EngineEntry("the same round maths vectorised over 10^4-10^6 devices held in memory", _fleet_refusal,
                         _run_fleet),
    "blocks": EngineEntry("lazy devices in blocks, each block a worker in-process or a Ray actor with its own "
                          "ledger store (--devices-per-block, --backend, --ray-address)", _blocks_refusal,
                          _run_blocks),
}
DEFAULT_ENGINE = "flower"
#: Engines over a fleet: their settings derived from the fleet size (fed_nessa.sim.fleet_settings).
FLEET_ENGINES = ("fleet", "blocks")
#: The block engine keeps every device's ledger in the ledger store: set for it unless given.
BLOCKS_LEDGER_LAYOUT = f"ledger-layout={LedgerLayout.SQLITE}"


def replace_run_dir(cfg: FederationConfig) -> None:
    """``--replace`` alone: check, then remove an earlier run in ``cfg.run_dir`` and its key store.

    Only a run it can prove is its own is removed (:mod:`fed_nessa.sim.replace`); a mistyped
    ``--run-dir`` naming some other folder is refused and left as it was. :func:`run_engine`
    plans the same replacement first and removes only after every other input is checked.
    """
    planned = _planned_replacement(cfg)
    if planned is not None:
        planned.apply()


def _planned_replacement(cfg: FederationConfig) -> Replacement | None:
    """What ``--replace`` will remove (None: no earlier run there); raises if it is not provably a run."""
    run_dir = Path(cfg.run_dir)
    if cfg.resume or not run_dir.is_dir() or not _earlier_run(run_dir):
        return None
    return plan_replacement(run_dir)


def _earlier_run(run_dir: Path) -> list[str]:
    """What an earlier run left in ``run_dir`` (empty: none)."""
    from fed_nessa.privacy.ledger import FEDERATION_LEDGER_NAME

    return [name for name in ("summary.json", FEDERATION_LEDGER_NAME, DEVICES_DIR, "checkpoints")
            if (run_dir / name).exists()]


def check_run_dir(cfg: FederationConfig, *, replacing: bool = False) -> Path:
    """The run folder can be written and holds no earlier run (unless resumed or being replaced).

    A second run into a used folder would append to its ledgers (each device's earlier spending
    counts against its budget, the audit sees two runs' rounds interleaved) and overwrite its
    summary: refused, with the folder named.
    """
    from fed_nessa.outputs import check_output

    run_dir = check_output(cfg.run_dir, "run-dir", "folder")
    used = _earlier_run(run_dir)
    if used and not cfg.resume and not replacing:
        raise ValueError(f"run-dir {run_dir}: holds an earlier run ({', '.join(used)}); its ledgers would carry "
                         "that run's spending into this one: choose a new --run-dir, remove it or pass --replace "
                         "(flower engine: --resume continues it)")
    return run_dir


def check_shard_folder(folder: Path, cfg: FederationConfig) -> None:
    """Every shard of a prepared ``data-source`` folder, and its evaluation set, read before the run starts.

    One unreadable, truncated, empty, all-zero or non-finite shard, one of other dimensions, or
    one whose name gives no safe device id (:func:`fed_nessa.privacy.ledger.device_id_problem`,
    unique even where file names ignore case) is an operator's input fault: one line naming
    the file, instead of a device failing every round (or the server's pooled baselines
    failing) after the run folder exists. ``num-devices`` must be the folder's
    shard count: it sizes the cohort and the SecAgg+ range checks, which a different count would
    make wrong.
    """
    from fed_nessa.data.population import EVAL_FILE, VALIDATION_FILE, load_eval_file
    from fed_nessa.data.shards import ShardError, load_shard, shard_paths

    paths = shard_paths(folder)
    if not paths:
        raise ShardError(folder, "no *.shard.safetensors files")
    seen: dict[str, Path] = {}
    for path in paths:
        dev = device_id_of(path)
        problem = device_id_problem(dev)
        if problem:
            raise ShardError(path, f"{problem}: rename the shard")
        if dev.lower() in seen:
            raise ShardError(path, f"device id {dev!r} is also the id of {seen[dev.lower()].name} (ids must differ "
                                   "in more than letter case): rename one shard")
        seen[dev.lower()] = path
    first = load_shard(paths[0])
    for path in paths[1:]:
        load_shard(path, expect_dx=first.d_x, expect_dy=first.d_y)
    load_eval_file(folder / EVAL_FILE)
    if (folder / VALIDATION_FILE).exists():
        load_eval_file(folder / VALIDATION_FILE)
    if cfg.num_devices != len(paths):
        raise ValueError(f"num-devices = {cfg.num_devices}: the data-source folder {folder} holds {len(paths)} "
                         f"shard(s), one per device; set num-devices = {len(paths)} (it sizes the cohort and the "
                         "SecAgg+ range checks)")


def _check_torch_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {device!r}: not a torch device ({str(exc).splitlines()[0][:120]})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this machine has no CUDA device (torch {torch.__version__})")


def run_engine(cfg: FederationConfig, policy: DevicePolicy, *, engine: str = DEFAULT_ENGINE, device: str = "cpu",
               quiet: bool = False, verbose: bool = False, plant: Planter | None = None,
               replace: bool = False, blocks: Any = None) -> dict[str, Any]:
    """One run on one engine of :data:`ENGINES`: what ``fed-nessa simulate`` does after reading its arguments.

    Every input is checked before anything is written or removed: the engine (its refusal) and its
    torch device, a prepared data-source folder (:func:`check_shard_folder`), with ``replace`` that
    the earlier run is provably one (:func:`fed_nessa.sim.replace.plan_replacement`), the run folder
    (:func:`check_run_dir`) and the key store (:func:`fed_nessa.privacy.ledger.check_key_store`).
    ``blocks`` are the block engine's options (:class:`fed_nessa.sim.blocks.engine.BlockOptions`).
    """
    import torch

    torch.set_num_threads(1)  # one process per core is faster here than intra-op threads
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r}: allowed values {', '.join(ENGINES)}")
    if blocks is not None and engine != "blocks":
        raise ValueError(f"--devices-per-block, --backend, --ray-address and --cache are the block engine's options; "
                         f"--engine {engine} takes none of them")
    if replace and cfg.resume:
        raise ValueError("--replace and --resume contradict each other: --resume continues the run in the run "
                         "folder, --replace removes it")
    if cfg.clip_target_quantile > 0 and not (cfg.integer_noise and cfg.budget_split > 0):
        # the bit's count noise must leave the delta some budget (one clear error); a skellam budget-split plan
        # needs the shards' dimensions, so there noise_plan checks it when the engine builds the plan
        mechanism_for(cfg).vector_sigma(Phase.DPSGD, noise_plan(cfg, cfg.num_devices))
    request = RunRequest(device, quiet, verbose, plant, blocks)
    why = ENGINES[engine].refusal(cfg, policy, request)
    if why:
        raise ValueError(why)
    if engine == "fleet":
        _check_torch_device(device)
    if cfg.data_source not in FEDERATION_NAMES:
        check_shard_folder(Path(cfg.data_source), cfg)
    planned = _planned_replacement(cfg) if replace else None
    check_run_dir(cfg, replacing=planned is not None)
    check_key_store(cfg.run_dir)
    if planned is not None:  # every input checked: only now is the earlier run removed
        planned.apply()
    return ENGINES[engine].run(cfg, policy, request)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file (or name in simulations/configs/) of run-config keys and a "
                                         f"[device] policy table (default: {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one run-config key (repeatable), e.g. --set num-devices=300")
    parser.add_argument("--device-set", dest="device_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key of every virtual device's policy, e.g. --device-set epsilon-budget=4")
    parser.add_argument("--run-dir", help="run folder (same as --set run-dir=...)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--replace", action="store_true",
                        help="remove an earlier run from the run folder (and its key store) once every input is "
                             "checked; only a folder that provably holds a run (a verifying federation ledger, "
                             "nothing a run does not write) is removed, anything else is refused")
    parser.add_argument("--engine", choices=tuple(ENGINES), default=DEFAULT_ENGINE,
                        help="; ".join(f"{name}: {entry.help}" for name, entry in ENGINES.items())
                        + " (docs/federation.md)")
    parser.add_argument("--device", default="cpu", help="torch device of the fleet engine (cpu, cuda)")
    blocks = parser.add_argument_group("block engine (--engine blocks)")
    blocks.add_argument("--devices-per-block", type=int, default=None, metavar="B",
                        help="devices per block: one worker (one Ray actor) each (default 50,000)")
    blocks.add_argument("--backend", default=None, choices=("auto", "in-process", "ray"),
                        help="where the workers run (default auto: local Ray from 20,000 devices on a multi-core "
                             "machine, or when --ray-address is given; else in this process)")
    blocks.add_argument("--ray-address", default=None, help="join this Ray cluster (default: local Ray or none)")
    blocks.add_argument("--cache", action="store_true", default=None,
                        help="workers hold their blocks' pairs between rounds (when they fit in memory)")
    parser.add_argument("--canaries", type=int, default=0, metavar="M",
                        help="plant M canary pairs (each included with probability 1/2) into the devices before "
                             "round 1, for `fed-nessa audit-empirical --run`; their secret goes to "
                             "RUN_DIR.canaries.npz beside the run folder (docs/privacy.md)")
    parser.add_argument("--canary-seed", type=seed_arg, default=0, help="seed of the canaries and their coins")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--verbose", action="store_true", help="show Flower's INFO log (SecAgg+ stages)")


def _canary_planter(args: argparse.Namespace, cfg: FederationConfig) -> Planter | None:
    """``--canaries M``: the audit's planting hook (the secret is written beside the run folder)."""
    m = getattr(args, "canaries", 0)
    if not m:
        return None
    from fed_nessa.canary.federated import planter

    return planter(m, getattr(args, "canary_seed", 0), cfg.run_dir)


def fleet_overrides(config_file: str | None, overrides: list[str],
                    device_overrides: list[str]) -> tuple[list[str], list[str]]:
    """``overrides`` and ``device_overrides`` with the fleet settings the user left out derived in front.

    What the file and the flags set wins (:mod:`fed_nessa.sim.fleet_settings`); what was derived
    is printed, so a run never hides a choice.
    """
    from fed_nessa.sim.fleet_settings import as_overrides, derive

    run_table, device_table = _tables(config_file)
    run_table.update(_overrides(overrides, "--set"))
    device_table.update(_overrides(device_overrides, "--device-set"))
    try:
        settings = derive(run_table, device_table)
    except ValueError as exc:
        raise _in_config(exc, config_file, "--set", overrides) from None
    print(settings.describe(int(run_table.get("num-devices", FederationConfig().num_devices))), flush=True)
    return as_overrides(settings.run) + overrides, as_overrides(settings.device) + device_overrides


def build_config_from_args(args: argparse.Namespace) -> tuple[FederationConfig, DevicePolicy]:
    """The run config and the devices' policy ``fed-nessa simulate`` arguments name (``--run-dir`` and
    ``--resume`` last; on the fleet engine, the settings left out derived from the fleet size)."""
    overrides = [*args.overrides, *(["resume=true"] if args.resume else [])]
    config_file, device_overrides = args.config, list(args.device_overrides)
    engine = getattr(args, "engine", None)
    if engine == "blocks":  # its only ledger layout: the store (a --set ledger-layout=files is refused by name)
        overrides = [BLOCKS_LEDGER_LAYOUT, *overrides]
    if engine in FLEET_ENGINES:
        config_file = config_file or DEFAULT_FLEET_CONFIG
        overrides, device_overrides = fleet_overrides(config_file, overrides, device_overrides)
    cfg = build_config(config_file, overrides, run_dir=args.run_dir)
    return cfg, build_policy(config_file, device_overrides)


def block_options(args: argparse.Namespace) -> Any:
    """The block engine's options from its flags (None when none was given: the engine's defaults)."""
    given: dict[str, Any] = {k: getattr(args, k) for k in BLOCK_FLAGS if getattr(args, k, None) is not None}
    if not given:
        return None
    from fed_nessa.sim.blocks.engine import BlockOptions

    if given.get("devices_per_block", 1) < 1:
        raise ValueError(f"--devices-per-block {given['devices_per_block']}: must be at least 1")
    return BlockOptions(**given)


def run_from_args(args: argparse.Namespace) -> int:
    cfg, policy = build_config_from_args(args)
    plant = _canary_planter(args, cfg)
    summary = run_engine(cfg, policy, engine=args.engine, device=args.device, quiet=args.quiet, verbose=args.verbose,
                         plant=plant, replace=getattr(args, "replace", False), blocks=block_options(args))
    final = summary["final"]
    print(f"final EER {100 * final['eer']:.2f}%  gap closure {final['gap_closure']}  "
          f"epsilon {epsilon_phrase(summary['privacy'])}  shipped {final['gate']['shipped']}  -> {cfg.run_dir}")
    applied = [r for r in summary["rounds"] if r.get("status") == RoundStatus.APPLIED]
    if not applied:
        reasons = sorted({str(r.get("note", r.get("status"))) for r in summary["rounds"]})
        declined = decline_reasons(Path(cfg.run_dir))
        why = f"; devices declined: {'; '.join(declined)}" if declined else ""
        print(f"simulate: error: no round released an aggregate, nothing was trained ({'; '.join(reasons)}){why}",
              file=sys.stderr)
        return 1
    return 0


def decline_reasons(run_dir: Path) -> list[str]:
    """Every distinct reason devices gave for declining, as the run's federation ledger records them."""
    from fed_nessa.privacy.chain import read_chain
    from fed_nessa.privacy.ledger import FEDERATION_LEDGER_NAME

    path = run_dir / FEDERATION_LEDGER_NAME
    if not path.is_file():
        return []
    found: set[str] = set()
    for entry in read_chain(path).entries:
        extra = (entry.get("payload") or {}).get("extra") or {}
        found.update(str(reason) for reason in (extra.get("decline_reasons") or {}) if reason)
    return sorted(found)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fed_nessa.sim.runner", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"simulate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
