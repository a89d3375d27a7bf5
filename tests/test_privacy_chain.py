"""The signed hash chain: every fault is found and located by seq."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fed_nessa.privacy import signing
from fed_nessa.privacy.chain import SignedChain, entry_hash, read_chain, signed_bytes


def _chain(tmp_path: Path, n: int = 4) -> tuple[Path, SignedChain]:
    key = signing.load_or_create_private_key(tmp_path / "k.pem", tmp_path / "k.pub", create=True)
    path = tmp_path / "log.jsonl"
    chain = SignedChain.open(path, key, {"role": "test"})
    for i in range(n):
        chain.append("note", {"i": i})
    return path, chain


def _rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def _kinds(path: Path, trusted=None) -> set[tuple[int | None, str]]:
    return {(f.seq, f.kind) for f in read_chain(path, trusted).faults}


def test_intact_chain_verifies(tmp_path: Path) -> None:
    path, chain = _chain(tmp_path)
    read = read_chain(path)
    assert read.ok and len(read.entries) == 5
    assert read.entries[2]["prev_hash"] == entry_hash(read.entries[1])


def test_edit_is_a_signature_fault_at_that_seq(tmp_path: Path) -> None:
    path, _ = _chain(tmp_path)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"i":1', '"i":7')
    _rewrite(path, lines)
    assert _kinds(path) == {(2, "signature"), (3, "prev_hash")}


def test_delete_and_reorder_are_seq_and_hash_faults(tmp_path: Path) -> None:
    path, _ = _chain(tmp_path)
    lines = path.read_text().splitlines()
    _rewrite(path, lines[:2] + lines[3:])
    assert (3, "seq") in _kinds(path) and (3, "prev_hash") in _kinds(path)
    _rewrite(path, [lines[0], lines[1], lines[3], lines[2], lines[4]])
    assert {(3, "seq"), (2, "seq")} <= _kinds(path)


def test_forged_entry_signed_with_another_key(tmp_path: Path) -> None:
    path, chain = _chain(tmp_path)
    other = signing.load_or_create_private_key(tmp_path / "o.pem", tmp_path / "o.pub", create=True)
    forged = {"schema_version": 1, "seq": 5, "kind": "note", "time": "t",
              "prev_hash": entry_hash(chain.entries[-1]), "payload": {"i": 99}}
    forged["signature"] = signing.sign(other, signed_bytes(forged))
    with open(path, "a") as fh:
        fh.write(json.dumps(forged) + "\n")
    assert _kinds(path) == {(5, "signature")}


def test_wholesale_rekeyed_log_fails_against_the_trusted_key(tmp_path: Path) -> None:
    path, chain = _chain(tmp_path, 1)
    trusted = signing.load_public_key(tmp_path / "k.pub")
    other = signing.load_or_create_private_key(tmp_path / "o.pem", tmp_path / "o.pub", create=True)
    path.unlink()
    forged = SignedChain.open(path, other, {"role": "test"})
    forged.append("note", {"i": 0})
    assert read_chain(path).ok  # self-consistent on its own...
    kinds = _kinds(path, trusted)
    assert (0, "key_mismatch") in kinds and (1, "signature") in kinds  # ...but not under the real key


@pytest.mark.parametrize("garbage,kind", [("not json", "parse"), ('{"seq": 1}', "schema"), ("[1]", "parse")])
def test_garbage_lines_are_reported(tmp_path: Path, garbage: str, kind: str) -> None:
    path, _ = _chain(tmp_path, 1)
    with open(path, "a") as fh:
        fh.write(garbage + "\n")
    assert kind in {k for _, k in _kinds(path)}


def test_empty_file_has_no_header(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("")
    assert _kinds(tmp_path / "e.jsonl") == {(None, "header")}
