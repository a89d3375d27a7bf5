"""The one place the library reaches the Flower apps and the study configs.

The layer rules (pyproject.toml) forbid the library to *import* ``server/``, ``client/`` or
``simulations/``: the apps depend on the library, never the reverse. A simulation still has to
run them, so, like ``flwr run``, this module loads the apps *by name* from ``pyproject.toml``'s
``[tool.flwr.app.components]`` and finds a run config by name in ``simulations/configs/``.
Loading by name is invisible to import-linter, so ``tests/test_sim_launcher.py`` keeps this
module the only one in ``fed_nessa`` that loads modules by name (``fed_nessa.cli`` loading its own
subcommands excepted) or names those folders.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Where ``--config NAME`` looks for ``NAME.toml``.
CONFIG_DIR = REPO_ROOT / "simulations" / "configs"
#: The ServerApp module's entry that runs a whole federation over a Grid (the runner calls it).
SERVER_ENTRY = "run_federation"


def config_path(path: str | Path) -> Path:
    """The config file ``path`` names: a file, or a bare name looked up in ``simulations/configs/``."""
    if not str(path).strip():
        raise FileNotFoundError(f"--config {str(path)!r}: empty (leave --config out for the default config)")
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / f"{path}.toml").exists():
        p = CONFIG_DIR / f"{path}.toml"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: config file not found (or a name from {CONFIG_DIR.name}/)")
    return p


def app_components() -> dict[str, str]:
    """The ServerApp/ClientApp references of ``pyproject.toml`` (the one place they are named)."""
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(data["tool"]["flwr"]["app"]["components"])


def load_component(ref: str) -> Any:
    """``module:attribute`` as in ``[tool.flwr.app.components]``."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Apps:
    """What an in-process simulation runs: the ClientApp and the ServerApp module's federation loop."""

    client_app: Any
    run_federation: Callable[..., dict[str, Any]]


def load_apps(client_app: Any = None) -> Apps:
    """The apps ``pyproject.toml`` names; ``client_app`` replaces the ClientApp (tests)."""
    components = app_components()
    server_module = importlib.import_module(components["serverapp"].partition(":")[0])
    return Apps(client_app or load_component(components["clientapp"]), getattr(server_module, SERVER_ENTRY))
