"""``flwr run .`` on Flower's own simulation engine (Ray), offline, leaving no SuperLink behind.

``flwr run . local`` starts a *detached* local ``flower-superlink
--simulation`` that keeps running after the run. This wrapper:

* points ``FLWR_HOME`` at a folder we own (default ``<repo>/.flwr-home``) and
  sets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (otherwise Flower
  resolves the app's dependencies with uv, which pulls a CUDA torch build);
* puts this interpreter's ``bin/`` first on ``PATH`` so ``flower-superlink``
  is the one of this environment;
* runs ``flwr run <repo> local --stream`` with ``num-supernodes`` and one CPU
  per client (passing only ``num-supernodes`` silently resets the client
  resources, see field notes);
* always stops the SuperLink it started and that process's children, found
  by the database path under *our* ``FLWR_HOME`` in their command line (never
  by a process name: other people's SuperLinks on the machine are left alone).

Usage: ``python -m simulations.flwr_run --num-supernodes 8 --run-config "num-server-rounds=2 ..."``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for an offline ``flwr`` call with its state under ``flwr_home``."""
    env = os.environ.copy()
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def our_superlinks(flwr_home: Path) -> list[int]:
    """PIDs of ``flower-superlink`` processes using the database under ``flwr_home``."""
    marker = str(Path(flwr_home).resolve() / "local-superlink")
    return [pid for pid in _all_pids() if "flower-superlink" in (c := _cmdline(pid)) and marker in c]


def descendants(root: int) -> list[int]:
    """Every live process whose parent chain reaches ``root`` (children first in the list's tail)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        children.setdefault(_ppid(pid), []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_superlinks(flwr_home: Path, grace_s: float = 10.0) -> list[int]:
    """Stop our SuperLink(s) and everything they started; returns the PIDs signalled."""
    roots = our_superlinks(flwr_home)
    pids = [p for r in roots for p in [r, *descendants(r)]]
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _ppid(p) != -1 for p in pids):
        time.sleep(0.2)
    _signal_all([p for p in pids if Path(f"/proc/{p}").exists()], signal.SIGKILL)
    return pids


def flwr_run(run_config: str, num_supernodes: int, flwr_home: Path | None = None, timeout_s: float = 1800,
             log_path: Path | None = None) -> int:
    """Run the app with ``flwr run`` on the simulation engine; always stop our SuperLink afterwards."""
    home = Path(flwr_home or REPO / ".flwr-home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(REPO), "local", "--stream",
           "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1"]
    if run_config:
        cmd += ["--run-config", run_config]
    out = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed in finally
    try:
        return subprocess.run(cmd, env=flwr_env(home), cwd=REPO, timeout=timeout_s, stdout=out,
                              stderr=subprocess.STDOUT if out else None, check=False).returncode
    finally:
        stop_superlinks(home)
        if out:
            out.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.flwr_run", description=__doc__.split("\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--run-config", default="", help="flwr --run-config overrides, e.g. 'num-server-rounds=2'")
    parser.add_argument("--flwr-home", type=Path, default=None)
    args = parser.parse_args(argv)
    return flwr_run(args.run_config, args.num_supernodes, args.flwr_home)


if __name__ == "__main__":
    sys.exit(main())
