"""An append-only, hash-chained, Ed25519-signed JSONL log (the ledger's spine).

Every entry is one line: ``schema_version``, ``seq``, ``kind``, ``time``,
``prev_hash`` (SHA-256 of the previous entry's canonical JSON, all zeros for the
header), ``payload`` and ``signature`` (Ed25519 over the canonical JSON without
the signature). Entry 0 is the header and carries the signer's public key.

Why each part: the signature catches an edited or forged entry, ``prev_hash``
catches a deleted, inserted or reordered one, ``seq`` names the entry in every
report. Dropping entries at the *end* cannot be seen from the log alone: that is
what the server's federation ledger cross-check is for.

Appends are a single ``write`` of a whole line followed by ``fsync``; a crash
mid-write leaves a final line without its newline (a *torn tail*), which is set
aside, never counted and never extended over.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fed_nessa.errors import FedNessaError
from fed_nessa.privacy import signing

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64
HEADER = "header"
_ENTRY_FIELDS = ("schema_version", "seq", "kind", "time", "prev_hash", "payload", "signature")


class LineSink(Protocol):
    """Durably stores entry ``seq`` (one canonical-JSON line) of a log kept outside a JSONL file."""

    def __call__(self, seq: int, line: bytes) -> None: ...


class LedgerError(FedNessaError, ValueError):
    """A ledger that cannot be trusted or extended; the message names file, entry and fault."""


@dataclass(frozen=True)
class ChainFault:
    """One verification failure, located by file, line and entry seq."""

    path: str
    line: int
    seq: int | None
    kind: str  # parse | schema | header | seq | prev_hash | signature | key_mismatch
    detail: str

    def message(self) -> str:
        where = f"entry seq {self.seq}" if self.seq is not None else "entry"
        return f"{self.path}: line {self.line}, {where}: {self.kind}: {self.detail}"


@dataclass
class ChainRead:
    """The entries of a log as read, with every fault found while verifying them."""

    path: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    faults: list[ChainFault] = field(default_factory=list)
    public_key: Ed25519PublicKey | None = None
    torn_tail: bytes = b""
    size: int = 0  # bytes of complete lines (where the next append goes)

    @property
    def ok(self) -> bool:
        return not self.faults


def entry_hash(entry: dict[str, Any]) -> str:
    return signing.sha256_hex(signing.canonical_json(entry))


def signed_bytes(entry: dict[str, Any]) -> bytes:
    return signing.canonical_json({k: v for k, v in entry.items() if k != "signature"})


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_chain(path: Path, trusted_key: Ed25519PublicKey | None = None) -> ChainRead:
    """Parse and verify every entry of the log at ``path``; never raises on bad content.

    ``trusted_key``: a public key obtained independently (the ``.pub.pem`` file,
    a registry); the header's key must equal it, or a wholesale re-signed ledger
    would verify against its own forged header.
    """
    return read_chain_bytes(path, path.read_bytes(), trusted_key)


def read_chain_bytes(path: Path, data: bytes, trusted_key: Ed25519PublicKey | None = None) -> ChainRead:
    """:func:`read_chain` over a log's bytes (one entry per line): a file, or a device's rows in a
    :mod:`~fed_nessa.privacy.store` joined by newlines, so both layouts are verified by one code path."""
    result = ChainRead(path=path)
    complete, _, tail = data.rpartition(b"\n")
    if data and not data.endswith(b"\n"):
        result.torn_tail = tail
    body = complete + b"\n" if complete else b""
    result.size = len(body)
    prev: dict[str, Any] | None = None
    for lineno, raw in enumerate(body.splitlines(), start=1):
        entry = _parse(path, lineno, raw, result.faults)
        if entry is None:
            prev = None  # the next entry's prev_hash cannot be checked against garbage
            result.entries.append({})
            continue
        _check_entry(path, lineno, entry, prev, result, trusted_key)
        result.entries.append(entry)
        prev = entry
    if not result.entries:
        result.faults.append(ChainFault(str(path), 1, None, "header", "empty ledger: no header entry"))
    return result


def _parse(path: Path, lineno: int, raw: bytes, faults: list[ChainFault]) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = exc.reason if isinstance(exc, UnicodeDecodeError) else exc.msg
        faults.append(ChainFault(str(path), lineno, None, "parse", f"not valid JSON ({why})"))
        return None
    if not isinstance(entry, dict):
        faults.append(ChainFault(str(path), lineno, None, "parse", "line is not a JSON object"))
        return None
    missing = [k for k in _ENTRY_FIELDS if k not in entry]
    seq = entry.get("seq") if isinstance(entry.get("seq"), int) else None
    if missing or set(entry) - set(_ENTRY_FIELDS):
        extra = sorted(set(entry) - set(_ENTRY_FIELDS))
        faults.append(ChainFault(str(path), lineno, seq, "schema",
                                 f"missing fields {missing}, unknown fields {extra}"))
        return None
    if entry["schema_version"] != SCHEMA_VERSION:
        faults.append(ChainFault(str(path), lineno, seq, "schema",
                                 f"schema_version {entry['schema_version']!r} is not {SCHEMA_VERSION}"))
        return None
    if seq is None or not isinstance(entry["payload"], dict) or not isinstance(entry["signature"], str):
        faults.append(ChainFault(str(path), lineno, seq, "schema",
                                 "seq must be an int, payload an object, signature a hex string"))
        return None
    return entry


def _check_entry(path: Path, lineno: int, entry: dict[str, Any], prev: dict[str, Any] | None,
                 result: ChainRead, trusted_key: Ed25519PublicKey | None) -> None:
    seq = entry["seq"]
    position = lineno - 1
    faults = result.faults
    if position == 0:
        _check_header(path, entry, result, trusted_key)
    elif entry["kind"] == HEADER:
        faults.append(ChainFault(str(path), lineno, seq, "header", "a second header entry"))
    last = prev["seq"] if prev else position - 1
    if seq > last + 1:
        missing = f"seq {last + 1}" if seq == last + 2 else f"seq {last + 1}..{seq - 1}"
        faults.append(ChainFault(str(path), lineno, seq, "seq",
                                 f"{missing} missing before it (deleted or moved)"))
    elif seq <= last:
        faults.append(ChainFault(str(path), lineno, seq, "seq",
                                 f"out of order: comes after seq {last} (reordered or duplicated)"))
    expected_prev = GENESIS_HASH if position == 0 else (entry_hash(prev) if prev else None)
    if expected_prev is not None and entry["prev_hash"] != expected_prev:
        faults.append(ChainFault(str(path), lineno, seq, "prev_hash",
                                 "does not match the hash of the entry before it "
                                 "(that entry was edited, or entries were deleted/reordered)"))
    if result.public_key is not None and not signing.verify(result.public_key, entry["signature"],
                                                           signed_bytes(entry)):
        faults.append(ChainFault(str(path), lineno, seq, "signature",
                                 "does not verify under the ledger's key "
                                 f"{signing.fingerprint(result.public_key)[:16]}: the entry was "
                                 "edited after signing, or forged with another key"))


def _check_header(path: Path, entry: dict[str, Any], result: ChainRead,
                  trusted_key: Ed25519PublicKey | None) -> None:
    seq = entry["seq"]
    if entry["kind"] != HEADER:
        result.faults.append(ChainFault(str(path), 1, seq, "header",
                                        f"first entry is {entry['kind']!r}, not the header"))
        result.public_key = trusted_key
        return
    try:
        result.public_key = signing.public_key_from_hex(str(entry["payload"].get("public_key_hex")))
    except signing.KeyFileError as exc:
        result.faults.append(ChainFault(str(path), 1, seq, "header", str(exc)))
        result.public_key = trusted_key
        return
    if trusted_key is not None and signing.public_key_hex(trusted_key) != signing.public_key_hex(result.public_key):
        result.faults.append(ChainFault(
            str(path), 1, seq, "key_mismatch",
            f"header key {signing.fingerprint(result.public_key)[:16]} is not the trusted key "
            f"{signing.fingerprint(trusted_key)[:16]}: the ledger was re-keyed or replaced"))
        result.public_key = trusted_key  # verify every entry against the key we trust


class SignedChain:
    """Appends signed, chained entries to a verified log; one writer process per file."""

    def __init__(self, path: Path, key: Ed25519PrivateKey, entries: list[dict[str, Any]], size: int,
                 sink: LineSink | None = None):
        self.path = path
        self._key = key
        self.entries = entries
        self._size = size
        self._sink = sink  # None: the JSONL file at ``path``; else another storage (a ledger store)

    @classmethod
    def open_lines(cls, label: Path, data: bytes, key: Ed25519PrivateKey, header_payload: dict[str, Any],
                   sink: LineSink) -> SignedChain:
        """Verify and continue a log held elsewhere (``data``: its lines as stored; ``sink`` appends one).

        The same refusal as :meth:`open`: a log with any fault is never extended.
        """
        if not data:
            chain = cls(label, key, [], 0, sink)
            chain.append(HEADER, _header(key, header_payload))
            return chain
        read = read_chain_bytes(label, data, trusted_key=key.public_key())
        if read.faults or read.torn_tail:
            raise LedgerError(f"refusing to extend a ledger that fails verification: "
                              f"{read.faults[0].message() if read.faults else 'a torn entry'}")
        return cls(label, key, read.entries, read.size, sink)

    @classmethod
    def open(cls, path: Path, key: Ed25519PrivateKey, header_payload: dict[str, Any]) -> SignedChain:
        """Verify and continue the log at ``path``, or create it with a header.

        A log with any fault raises :class:`LedgerError`: a tampered ledger is
        never silently extended. A torn tail (crash mid-append) is moved aside to
        ``<name>.torn-<n>`` for the record, then the log continues.
        """
        if not path.exists() or path.stat().st_size == 0:
            chain = cls(path, key, [], 0)
            chain.append(HEADER, _header(key, header_payload))
            signing.fsync_dir(path.parent)
            return chain
        read = read_chain(path, trusted_key=key.public_key())
        if read.faults:
            raise LedgerError(f"refusing to extend a ledger that fails verification: "
                              f"{read.faults[0].message()}"
                              + (f" (and {len(read.faults) - 1} more fault(s))" if len(read.faults) > 1 else ""))
        if read.torn_tail:
            _set_aside_torn_tail(path, read)
        return cls(path, key, read.entries, read.size)

    @property
    def header(self) -> dict[str, Any]:
        return self.entries[0]["payload"]

    def append(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Sign, chain and durably append one entry; returns it once it is on disk."""
        entry: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "seq": len(self.entries),
            "kind": kind,
            "time": utc_now(),
            "prev_hash": entry_hash(self.entries[-1]) if self.entries else GENESIS_HASH,
            "payload": payload,
        }
        entry["signature"] = signing.sign(self._key, signed_bytes(entry))
        line = signing.canonical_json(entry) + b"\n"
        if self._sink is not None:
            self._sink(entry["seq"], line)
        else:
            self._append_to_file(line)
        self._size += len(line)
        self.entries.append(entry)
        return entry

    def _append_to_file(self, line: bytes) -> None:
        """One ``write`` of a whole line, then ``fsync``: a crash leaves at most a torn tail."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size != self._size:
                raise LedgerError(f"{self.path}: changed on disk since it was opened "
                                  f"({size} bytes, expected {self._size}): another writer? "
                                  "Re-open it to verify before appending")
            written = os.write(fd, line)
            if written != len(line):
                raise LedgerError(f"{self.path}: short write ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)


def _header(key: Ed25519PrivateKey, payload: dict[str, Any]) -> dict[str, Any]:
    """The header payload: the caller's, plus the signer's public key (hex, PEM) and its fingerprint."""
    return {**payload, "public_key_hex": signing.public_key_hex(key.public_key()),
            "public_key_pem": signing.public_key_pem(key.public_key()),
            "key_fingerprint": signing.fingerprint(key.public_key())}


def _set_aside_torn_tail(path: Path, read: ChainRead) -> None:
    n = 0
    while (aside := path.with_name(f"{path.name}.torn-{n}")).exists():
        n += 1
    aside.write_bytes(read.torn_tail)
    with open(path, "r+b") as fh:
        fh.truncate(read.size)
        fh.flush()
        os.fsync(fh.fileno())
