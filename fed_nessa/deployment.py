"""Deployment on a real fleet: TLS material, SuperNode auth keys, and launching/stopping the processes.

What a fleet operator needs, generated with ``cryptography`` (no openssl
binary, no network):

* a private CA and a server certificate for the SuperLink's host names/IPs
  (:func:`generate_tls`): SuperNodes verify the SuperLink with the CA;
* one EC P-384 key pair per SuperNode in OpenSSH format
  (:func:`generate_supernode_keys`): the SuperLink runs with
  ``--enable-supernode-auth`` and accepts only nodes whose public key was
  registered with ``flwr supernode register``.

:class:`LocalDeployment` starts a SuperLink (file database, TLS, SuperNode
auth) and SuperNodes (each with its own ``--node-config "shard-path=...
state-dir=..."``) on loopback, submits ``flwr run`` against them, and stops
every process it started (its own process groups, by id) even on failure.
The same commands, shown in docs/deployment.md, run on real machines.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fed_nessa.config import DevicePolicy

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"
CONNECTION = "fed-nessa"


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    private: Path  # OpenSSH private key (flower-supernode --auth-supernode-private-key)
    public: Path   # OpenSSH public key (flwr supernode register)


def _write(path: Path, data: bytes, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fed-nessa"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def generate_tls(out_dir: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 365) -> TLSFiles:
    """A private CA and a SuperLink certificate valid for ``hosts`` (IPs or DNS names)."""
    if not hosts:
        raise ValueError("at least one host name or IP is needed for the server certificate")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("fed-nessa CA")).issuer_name(_name("fed-nessa CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    return TLSFiles(
        ca_cert=_write(out_dir / CA_CERT, ca_cert.public_bytes(pem), 0o644),
        server_cert=_write(out_dir / SERVER_CERT, cert.public_bytes(pem), 0o644),
        server_key=_write(out_dir / SERVER_KEY, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                  serialization.NoEncryption()), 0o600),
    )


def generate_supernode_keys(out_dir: Path, count: int) -> list[NodeKey]:
    """``count`` EC P-384 key pairs in OpenSSH format (``node-<i>`` / ``node-<i>.pub``)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    keys = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                 serialization.NoEncryption())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        keys.append(NodeKey(_write(out_dir / f"node-{i}", priv, 0o600), _write(out_dir / f"node-{i}.pub", pub, 0o644)))
    return keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something listens on ``127.0.0.1:port`` (or raise, naming the port)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f}s")


def node_config_arg(shard_path: Path, state_dir: Path, policy: DevicePolicy | None = None) -> str:
    """The ``--node-config`` value: the SuperNode's own shard, ledger folder and (optionally) policy.

    The policy is the device's, never the server's run-config: it is written into the
    ledger header at the first round and restored from it afterwards.
    """
    for p in (shard_path, state_dir):
        if '"' in str(p):
            raise ValueError(f"{p}: a path for --node-config must not contain double quotes")
    out = f'shard-path="{shard_path}" state-dir="{state_dir}"'
    if policy is not None:
        out += "".join(f" {k}={_toml_scalar(v)}" for k, v in policy.to_node_config().items())
    return out


def _toml_scalar(value: object) -> str:
    """A node-config value as Flower parses it (TOML): strings quoted (``privacy-unit="example"``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        if '"' in value or "\\" in value:
            raise ValueError(f"node-config value {value!r} must not contain quotes or backslashes")
        return f'"{value}"'
    return str(value)


@dataclass
class LocalDeployment:
    """A SuperLink + SuperNodes on loopback with TLS and SuperNode auth; a context manager that always stops them."""

    root: Path
    app_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.bin = Path(sys.executable).parent
        self.flwr_home = self.root / "flwr-home"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.tls = generate_tls(self.root / "certs")
        # Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTPS address.
        self.port = free_port()

    def env(self) -> dict[str, str]:
        env = os.environ.copy()
        env.update({"FLWR_HOME": str(self.flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}"})
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - owned by the process's lifetime
        proc = subprocess.Popen([str(self.bin / args[0]), *args[1:]], env=self.env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        self.processes.append(proc)
        return proc

    def start_superlink(self) -> None:
        """SuperLink with a file database, TLS and SuperNode authentication."""
        proc = self._spawn("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile",
            str(self.tls.server_cert), "--ssl-keyfile", str(self.tls.server_key), "--enable-supernode-auth",
            "--database", str(self.root / "superlink.db"), "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation"])
        wait_for_port(self.port, 60, proc)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.tls.ca_cert}"\n')

    def register(self, key: NodeKey) -> None:
        out = subprocess.run([str(self.bin / "flwr"), "supernode", "register", str(key.public), CONNECTION],
                             env=self.env(), capture_output=True, text=True, timeout=120, cwd=self.root)
        if out.returncode != 0:
            raise RuntimeError(f"flwr supernode register {key.public} failed: {out.stdout}{out.stderr}")

    def start_supernode(self, index: int, key: NodeKey | None, shard_path: Path, state_dir: Path,
                        policy: DevicePolicy | None = None, *, insecure: bool = False,
                        max_retries: int | None = None) -> subprocess.Popen:
        """A SuperNode verifying the SuperLink with the CA and authenticating with ``key``.

        ``key=None`` (no auth key), ``insecure=True`` (plaintext, no CA) and ``max_retries`` (give up
        after that many failed connection attempts; Flower retries forever by default) exist to show
        that such nodes are refused (tests/test_deployment_refusals.py).
        """
        args = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}"]
        args += ["--insecure"] if insecure else ["--root-certificates", str(self.tls.ca_cert)]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key.private)]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        return self._spawn(f"supernode-{index}", [
            *args, "--node-config", node_config_arg(shard_path, state_dir, policy), "--port", str(free_port())])

    def list_nodes(self) -> list[dict[str, str]]:
        """The SuperNodes the SuperLink knows (``flwr supernode list --format json``): id, status, ..."""
        out = subprocess.run([str(self.bin / "flwr"), "supernode", "list", CONNECTION, "--format", "json"],
                             env=self.env(), capture_output=True, text=True, timeout=120, cwd=self.root)
        try:
            reply = json.loads(out.stdout)
        except json.JSONDecodeError:
            reply = None
        if out.returncode != 0 or not isinstance(reply, dict) or not reply.get("success"):
            raise RuntimeError(f"flwr supernode list failed: {out.stdout}{out.stderr}")
        return [dict(n) for n in reply.get("nodes", [])]

    def run(self, run_config: str, timeout_s: float = 900) -> subprocess.CompletedProcess:
        """``flwr run <app> <connection> --stream`` against this SuperLink."""
        cmd = [str(self.bin / "flwr"), "run", str(self.app_dir), CONNECTION, "--stream"]
        if run_config:
            cmd += ["--run-config", run_config]
        with open(self.logs / "flwr-run.log", "wb") as log:
            return subprocess.run(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  cwd=self.root, check=False)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every process group this deployment started (SuperNodes first, then the SuperLink)."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.processes:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: also the app processes it spawned
            except ProcessLookupError:
                pass
            proc.wait()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
