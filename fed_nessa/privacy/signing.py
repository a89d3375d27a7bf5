"""Ed25519 keys and canonical JSON: what makes a ledger entry verifiable.

A signature or a hash is only checkable if every party serialises an entry to
the same bytes, hence one canonical form (sorted keys, no spaces, ASCII, no
NaN). Keys are created on first use and stored as PEM next to the ledger; the
private key file is owner-readable only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fed_nessa.errors import FedNessaError


class KeyFileError(FedNessaError, ValueError):
    """A key file that is missing, unreadable or not an Ed25519 key."""


def canonical_json(obj: Any) -> bytes:
    """The one byte form that hashes and signatures are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def public_key_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key: short enough to register or compare out of band."""
    return sha256_hex(bytes.fromhex(public_key_hex(key)))


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"not a raw Ed25519 public key in hex: {exc}") from exc


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: cannot read a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def load_or_create_private_key(path: Path, pub_path: Path, create: bool) -> Ed25519PrivateKey:
    """Load the PEM private key at ``path``, or create it (and ``pub_path``) if allowed.

    Creation writes to a temporary file and renames it, so a crash never leaves
    a half-written key that would orphan a ledger.
    """
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise KeyFileError(f"{path}: cannot read the Ed25519 private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: not an Ed25519 private key")
        if not pub_path.exists():
            atomic_write(pub_path, public_key_pem(key.public_key()).encode("ascii"), 0o644)
        return key
    if not create:
        raise KeyFileError(f"{path}: the signing key is missing, so the ledger beside it "
                        "cannot be extended (restore the key; never re-key an existing ledger)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(path, pem, 0o600)
    atomic_write(pub_path, public_key_pem(key.public_key()).encode("ascii"), 0o644)
    return key


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    return key.sign(data).hex()


def verify(key: Ed25519PublicKey, signature_hex: str, data: bytes) -> bool:
    try:
        key.verify(bytes.fromhex(signature_hex), data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def public_key_from_pem(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text (a ledger store's record of a device's key)."""
    try:
        key = serialization.load_pem_public_key(str(text).encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise KeyFileError(f"cannot read a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError("not an Ed25519 public key")
    return key
