"""Issue 12, part 5: SuperNodes the SuperLink must refuse, on loopback, every process stopped by id.

A real SuperLink (TLS, ``--enable-supernode-auth``) with one registered, authenticated SuperNode as
the positive control (it shows up ``online`` in ``flwr supernode list``). What Flower 1.42 does
with the others (observed, and asserted here):

* a SuperNode whose public key was never registered: the SuperLink answers 412 ("No SuperNode
  found with the given public key"), the node exits non-zero (Flower exit code 305, "[code: 2004]
  Failed to activate SuperNode") within seconds and never appears in the node list;
* a SuperNode started without ``--auth-supernode-private-key``: exits non-zero with "[code: 2001]
  SuperNode authentication is enabled. All SuperNodes must be registered via the CLI";
* a plaintext SuperNode (``--insecure``) against the TLS SuperLink: without an auth key its
  connection attempts fail (it retries forever by default; with ``--max-retries 2`` it exits
  non-zero, exit code 305); with its auth key Flower refuses to start it at all (exit code 303:
  "SuperNode authentication requires a secure TLS connection"). Neither is ever listed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_simulation import make_folder

from fed_nessa.data.shards import shard_paths
from fed_nessa.deployment import LocalDeployment, NodeKey, generate_supernode_keys

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: A refused SuperNode must have exited within this many seconds (observed: under 10).
REFUSAL_S = 40.0


@contextmanager
def _federation(tmp_path: Path, nodes: int) -> Iterator[tuple[LocalDeployment, list[NodeKey], list[Path]]]:
    """A TLS + auth SuperLink with SuperNode 0 registered and started; every process stopped after."""
    data = make_folder(tmp_path / "data", devices=nodes)
    dep = LocalDeployment(tmp_path / "deploy", REPO)
    try:
        dep.start_superlink()
        keys = generate_supernode_keys(tmp_path / "keys", nodes)
        dep.register(keys[0])
        dep.start_supernode(0, keys[0], shard_paths(data)[0], tmp_path / "device-0")
        yield dep, keys, shard_paths(data)
    finally:
        dep.stop()
        for proc in dep.processes:  # stopped by id: each process and its whole group are gone
            assert proc.poll() is not None
            assert _group_gone(proc.pid), f"process group {proc.pid} ({proc.args[0]}) still exists"


def _group_gone(pgid: int, timeout_s: float = 10.0) -> bool:
    """The group's members were SIGKILLed; the children the apps spawned are reaped by init shortly after."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _refused(dep: LocalDeployment, proc: subprocess.Popen, name: str, says: str) -> None:
    """The SuperNode exits non-zero within REFUSAL_S and its log says why."""
    try:
        code = proc.wait(timeout=REFUSAL_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} still running after {REFUSAL_S:.0f}s: {(dep.logs / f'{name}.log').read_text()[-2000:]}")
    log = (dep.logs / f"{name}.log").read_text()
    assert code != 0, log[-2000:]
    assert says in log, log[-2000:]


def _listed(dep: LocalDeployment, statuses: list[str]) -> list[dict[str, str]]:
    """The SuperLink's node list, once its statuses are ``statuses`` (waits up to 30 s for the control
    node to come online); the one online node is the registered, authenticated control."""
    deadline = time.monotonic() + 30
    nodes = dep.list_nodes()
    while sorted(str(n.get("status")) for n in nodes) != statuses and time.monotonic() < deadline:
        time.sleep(1)
        nodes = dep.list_nodes()
    assert sorted(str(n.get("status")) for n in nodes) == statuses, nodes
    [online] = [n for n in nodes if n.get("status") == "online"]
    assert f"SuperNode ID: {online['node-id']}" in (dep.logs / "supernode-0.log").read_text()
    return nodes


def test_an_unregistered_supernode_is_refused(tmp_path: Path) -> None:
    with _federation(tmp_path, 2) as (dep, keys, shards):
        proc = dep.start_supernode(1, keys[1], shards[1], tmp_path / "device-1")  # key never registered
        _refused(dep, proc, "supernode-1", "Failed to activate SuperNode")
        assert "No SuperNode found with the given public key" in (dep.logs / "superlink.log").read_text()
        _listed(dep, ["online"])  # the unregistered node never appears


def test_a_supernode_without_its_auth_key_is_refused(tmp_path: Path) -> None:
    with _federation(tmp_path, 2) as (dep, keys, shards):
        dep.register(keys[1])  # registered, but the node does not prove it holds the key
        proc = dep.start_supernode(1, None, shards[1], tmp_path / "device-1")
        _refused(dep, proc, "supernode-1", "SuperNode authentication is enabled. All SuperNodes must be "
                                           "registered via the CLI")
        _listed(dep, ["online", "registered"])  # key 1's node entry never comes online


def test_a_plaintext_supernode_is_refused(tmp_path: Path) -> None:
    with _federation(tmp_path, 3) as (dep, keys, shards):
        plain = dep.start_supernode(1, None, shards[1], tmp_path / "device-1", insecure=True, max_retries=2)
        _refused(dep, plain, "supernode-1", "Failed to initialize the connection to the SuperLink")
        dep.register(keys[2])
        plain_auth = dep.start_supernode(2, keys[2], shards[2], tmp_path / "device-2", insecure=True)
        _refused(dep, plain_auth, "supernode-2", "SuperNode authentication requires a secure TLS connection")
        _listed(dep, ["online", "registered"])  # the plaintext nodes never appear or come online
