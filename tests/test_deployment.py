"""Deployment: TLS/auth material from ``cryptography``, and a real SuperLink + 4 SuperNodes on loopback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from test_simulation import make_folder

from fed_nessa.config import DevicePolicy, policy_from_node_config
from fed_nessa.data.shards import shard_paths
from fed_nessa.deployment import LocalDeployment, generate_supernode_keys, generate_tls, node_config_arg

#: Each SuperNode's own policy (--node-config): g = 3 <= the g = 4 a 4-device round promises.
POLICY = DevicePolicy(epsilon_budget=30.0, guaranteed_arrivals=3)

REPO = Path(__file__).resolve().parents[1]


def test_tls_chain_verifies_and_names_the_hosts(tmp_path: Path) -> None:
    tls = generate_tls(tmp_path, hosts=("127.0.0.1", "localhost"))
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    key = load_pem_private_key(tls.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert oct(tls.server_key.stat().st_mode & 0o777) == "0o600"


def test_supernode_keys_are_openssh_p384_pairs(tmp_path: Path) -> None:
    keys = generate_supernode_keys(tmp_path, 3)
    assert len({k.public.read_bytes() for k in keys}) == 3
    for k in keys:
        priv = load_ssh_private_key(k.private.read_bytes(), None)
        pub = load_ssh_public_key(k.public.read_bytes())
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
        assert priv.public_key().public_numbers() == pub.public_numbers()
    with pytest.raises(ValueError, match="count must be >= 1"):
        generate_supernode_keys(tmp_path, 0)


def test_node_config_points_at_shard_and_state(tmp_path: Path) -> None:
    assert node_config_arg(Path("/a b/s.shard"), Path("/st")) == 'shard-path="/a b/s.shard" state-dir="/st"'
    with pytest.raises(ValueError, match="double quotes"):
        node_config_arg(Path('/x"y'), Path("/st"))
    # The device's policy travels in its own node config, in Flower's key=value syntax.
    arg = node_config_arg(Path("/s.shard"), Path("/st"), POLICY)
    assert "epsilon-budget=30.0" in arg and "guaranteed-arrivals=3" in arg and "allow-non-dp=false" in arg
    import tomllib  # Flower parses --node-config as TOML: a bare string (privacy-unit=example) fails its SuperNode

    parsed = tomllib.loads("\n".join(arg.split(" ")[2:]))
    assert parsed["privacy-unit"] == "example" and "privacy-unit=\"example\"" in arg
    assert policy_from_node_config(parsed) == POLICY


def test_stop_kills_every_started_process_even_on_failure(tmp_path: Path) -> None:
    dep = LocalDeployment(tmp_path, REPO)
    dep.bin = Path(shutil.which("sleep")).parent
    with pytest.raises(RuntimeError, match="boom"):
        with dep:
            dep._spawn("a", ["sleep", "300"])
            dep._spawn("b", ["sleep", "300"])
            raise RuntimeError("boom")
    assert all(p.poll() is not None for p in dep.processes)
    for p in dep.processes:
        with pytest.raises(ProcessLookupError):
            os.killpg(p.pid, 0)


@pytest.mark.slow
def test_real_superlink_and_four_supernodes_run_two_secagg_rounds(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", devices=4)
    run_dir = tmp_path / "run"
    dep = LocalDeployment(tmp_path / "deploy", REPO)
    with dep:
        dep.start_superlink()
        keys = generate_supernode_keys(tmp_path / "keys", 4)
        for key in keys:
            dep.register(key)
        for i, (key, shard) in enumerate(zip(keys, shard_paths(data), strict=True)):
            dep.start_supernode(i, key, shard, tmp_path / f"device-{i}", policy=POLICY)
        done = dep.run(f"data-source='{data}' run-dir='{run_dir}' num-devices=4 clients-per-round=4 "
                       "secagg-num-shares=3 secagg-reconstruction-threshold=2 min-arrivals=3 num-server-rounds=2 "
                       "hidden=16 depth=1 epsilon-budget=30 round-timeout=120.0 aligner='nessa'", timeout_s=600)
    assert all(p.poll() is not None for p in dep.processes)
    assert done.returncode == 0, (dep.logs / "flwr-run.log").read_text()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(r["status"], r["participants"]) for r in summary["rounds"]] == [("applied", 4), ("applied", 4)]
    # Each device kept its ledger in its own state folder (node config), not in the run folder.
    for i in range(4):
        assert (tmp_path / f"device-{i}" / "privacy-ledger.jsonl").is_file()
        from fed_nessa.privacy.ledger import DeviceLedger

        ledger = DeviceLedger.open(tmp_path / f"device-{i}", shard_paths(data)[i].name.split(".")[0])
        assert ledger.policy == POLICY  # the node config's policy, fixed in the header
