"""Canonical JSON and Ed25519 keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fed_nessa.privacy import signing


def test_canonical_json_is_order_independent_and_rejects_nan() -> None:
    assert signing.canonical_json({"b": 1, "a": [1.5, "é"]}) == signing.canonical_json({"a": [1.5, "é"], "b": 1})
    assert signing.canonical_json({"a": 1}) == b'{"a":1}'
    with pytest.raises(ValueError):
        signing.canonical_json({"a": float("nan")})


def test_key_created_once_private_file_is_owner_only(tmp_path: Path) -> None:
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    with pytest.raises(signing.KeyFileError, match="missing"):
        signing.load_or_create_private_key(priv, pub, create=False)
    key = signing.load_or_create_private_key(priv, pub, create=True)
    assert os.stat(priv).st_mode & 0o077 == 0
    again = signing.load_or_create_private_key(priv, pub, create=False)
    assert signing.public_key_hex(again.public_key()) == signing.public_key_hex(key.public_key())
    assert signing.public_key_hex(signing.load_public_key(pub)) == signing.public_key_hex(key.public_key())


def test_signature_verifies_only_the_signed_bytes_under_the_signing_key(tmp_path: Path) -> None:
    a = signing.load_or_create_private_key(tmp_path / "a.pem", tmp_path / "a.pub", create=True)
    b = signing.load_or_create_private_key(tmp_path / "b.pem", tmp_path / "b.pub", create=True)
    sig = signing.sign(a, b"entry")
    assert signing.verify(a.public_key(), sig, b"entry")
    assert not signing.verify(a.public_key(), sig, b"entrY")
    assert not signing.verify(b.public_key(), sig, b"entry")
    assert not signing.verify(a.public_key(), "zz", b"entry")


def test_unreadable_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(signing.KeyFileError, match="k.pem"):
        signing.load_or_create_private_key(tmp_path / "k.pem", tmp_path / "k.pub", create=False)
