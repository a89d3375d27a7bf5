"""The launcher: the one place the library loads the apps by name and finds a config by name.

import-linter sees only ``import`` statements, so loading a module by name would slip past the
rule "the library never imports the apps"; this test closes that gap by reading the source.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import fed_nessa
from fed_nessa.sim import launcher

LIBRARY = Path(fed_nessa.__file__).parent
LAUNCHER = Path(launcher.__file__).relative_to(LIBRARY).as_posix()
#: Calls that load a module by name.
LOADERS = {"import_module", "__import__", "spec_from_file_location", "load_module", "exec_module"}
#: Modules allowed a loader call besides the launcher, and why.
ALLOWED = {
    "cli.py": "loads its own subcommands, fed_nessa.commands.<name>",
    "data/extract/campp.py": "loads a downloaded speaker model's code file, never an app",
}
#: What only the launcher may spell in code (docstrings and help texts may mention them): the
#: study folder, and a module reference into an app or the studies ("server.app:app").
#: ("server" alone is a ledger role and "server.pem" a file: only a reference to a real module counts.)
STUDY_FOLDER = "simulations"
APP_REFERENCE = re.compile(r"((?:server|client|simulations)(?:\.\w+)*)(?::\w+)?")


def _names_an_app(text: str) -> bool:
    if text.strip("/") == STUDY_FOLDER:
        return True
    m = APP_REFERENCE.fullmatch(text)
    if m is None or text == m.group(1).partition(".")[0]:  # a bare "server" is a role, not a module
        return False
    path = launcher.REPO_ROOT / m.group(1).replace(".", "/")
    return path.with_suffix(".py").is_file() or path.is_dir()


def _sources() -> list[tuple[str, ast.Module]]:
    return [(p.relative_to(LIBRARY).as_posix(), ast.parse(p.read_text(encoding="utf-8")))
            for p in sorted(LIBRARY.rglob("*.py"))]


def _called(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def test_only_the_launcher_loads_modules_by_name() -> None:
    found = {rel for rel, tree in _sources() for node in ast.walk(tree)
             if isinstance(node, ast.Call) and _called(node) in LOADERS}
    assert LAUNCHER in found  # the test still sees the one it allows
    assert found - {LAUNCHER} <= set(ALLOWED), f"loads modules by name outside the launcher: {found - {LAUNCHER}}"


def test_only_the_launcher_names_the_app_and_study_folders() -> None:
    spelled = set()
    for rel, tree in _sources():
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and _names_an_app(node.value)):
                spelled.add(rel)
    assert spelled == {LAUNCHER}


def test_the_apps_come_from_pyproject_components() -> None:
    components = launcher.app_components()
    assert set(components) == {"serverapp", "clientapp"}
    apps = launcher.load_apps()
    assert apps.client_app is launcher.load_component(components["clientapp"])
    assert callable(apps.run_federation) and apps.run_federation.__name__ == launcher.SERVER_ENTRY
    sentinel = object()
    assert launcher.load_apps(sentinel).client_app is sentinel


def test_a_config_is_a_file_or_a_name_in_the_config_folder(tmp_path: Path) -> None:
    assert launcher.config_path("main") == launcher.CONFIG_DIR / "main.toml"
    own = tmp_path / "mine.toml"
    own.write_text("num-server-rounds = 1\n")
    assert launcher.config_path(own) == own
    with pytest.raises(FileNotFoundError, match="no-such-config: config file not found"):
        launcher.config_path("no-such-config")
