"""A ledger store: every simulated device's signed hash chain in one SQLite file (the fleet engine's option).

Why: at 10^6 devices the file-per-device layout costs 10^6 folders, 2 x 10^6 key files and one
fsynced line per device per reserve, so the file system, not the signatures, is the bottleneck.
The store keeps the *same* chains (same entry bytes, same Ed25519 signatures, same audit
semantics) as rows ``(device num, seq, entry JSON)`` in one SQLite file in WAL mode, and makes
fsync a cost per *batch*: inside :meth:`LedgerStore.batch` the appends of every device are one
transaction, committed (fsynced, ``synchronous=FULL``) when the batch closes, which the engine does
before any mechanism of the batch runs (reserve-before-run holds per batch, not per line). SQLite
rather than blocks of JSONL files because its transactions make a crash all-or-nothing (no torn
lines to repair, no per-block index to keep consistent with the data) and the standard library
ships it. A crash mid-batch rolls the whole batch back: no reservation of it was durable, and no
mechanism of it ran.

Keys: a per-run 32-byte seed in the run's key store (outside the run folder, like every private
key) derives each device's Ed25519 key (HMAC-SHA256(seed, device id)), instead of 10^6 key files.
The store records each device's public key (the audit pins it, as it pins ``device-key.pub.pem``).
Whoever holds the seed can sign as every device, exactly as whoever holds the file layout's key
store can today (it holds every simulated device's key); a real device keeps its own key and the
file layout. The file-per-device layout stays the default (the Flower engine, real devices).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fed_nessa.config import LedgerLayout
from fed_nessa.privacy import signing
from fed_nessa.privacy.chain import LedgerError, LineSink

#: The store's file in a run folder; its presence is how the audit discovers the layout.
STORE_NAME = "ledger-store.sqlite"
#: The per-run seed in the key store that derives every device's key.
SEED_NAME = "device-keys.seed"
#: The two layouts a run's device ledgers can have (named in the run summary's ``privacy.ledger_layout``).
FILES, SQLITE = LedgerLayout.FILES.value, LedgerLayout.SQLITE.value
LAYOUTS = (FILES, SQLITE)
_KEY_CONTEXT = b"fed-nessa device key v1:"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (num INTEGER PRIMARY KEY, device_id TEXT NOT NULL UNIQUE,
                                    public_key_pem TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (num INTEGER NOT NULL, seq INTEGER NOT NULL, entry TEXT NOT NULL,
                                    UNIQUE (num, seq));
"""


def derive_device_key(seed: bytes, device_id: str) -> Ed25519PrivateKey:
    """Device ``device_id``'s Ed25519 key: HMAC-SHA256(seed, context + id) as the private scalar seed."""
    raw = hmac.new(seed, _KEY_CONTEXT + device_id.encode("utf-8"), hashlib.sha256).digest()
    return Ed25519PrivateKey.from_private_bytes(raw)


def _load_or_create_seed(key_folder: Path, create: bool) -> bytes:
    path = key_folder / SEED_NAME
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != 32:
            raise LedgerError(f"{path}: a device-key seed is 32 bytes, found {len(seed)}")
        return seed
    if not create:
        raise LedgerError(f"{path}: the device-key seed is missing, so the ledger store's chains cannot be "
                          "extended (restore it; never re-key an existing ledger)")
    key_folder.mkdir(parents=True, exist_ok=True)
    seed = os.urandom(32)
    signing.atomic_write(path, seed, 0o600)
    return seed


def connect(path: Path, read_only: bool = False, immutable: bool = False) -> sqlite3.Connection:
    """A connection to the store at ``path`` (read-only for the audit: it never writes evidence).

    ``immutable``: read-only for a store no writer holds open (no ``-wal`` file), without the
    ``-wal``/``-shm`` files a read-only WAL reader would otherwise leave beside it.
    """
    if immutable:
        return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    if read_only:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn = sqlite3.connect(path, isolation_level=None)  # explicit BEGIN/COMMIT: batches are ours
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a commit is fsynced: a committed reserve survives a crash
    conn.executescript(_SCHEMA)
    return conn


class LedgerStore:
    """The run's ledger store: registers devices, derives their keys, appends their entries.

    One writer process per store (the engine's driver); appends outside :meth:`batch` commit
    one by one, inside it once at the end.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, seed: bytes):
        self.path = path
        self._conn = conn
        self._seed = seed
        self._depth = 0

    @classmethod
    def open(cls, run_dir: Path | str, key_folder: Path | str) -> LedgerStore:
        """Open or create ``<run_dir>/ledger-store.sqlite``; the seed lives in ``key_folder`` (the key store)."""
        path = Path(run_dir) / STORE_NAME
        new = not path.exists()
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        seed = _load_or_create_seed(Path(key_folder), create=new)
        return cls(path, connect(path), seed)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Every append inside is one transaction, durable (fsynced) when the block exits without error."""
        if self._depth == 0:
            self._conn.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._conn.execute("ROLLBACK")
            raise
        self._depth -= 1
        if self._depth == 0:
            self._conn.execute("COMMIT")

    def device_key(self, device_id: str) -> Ed25519PrivateKey:
        return derive_device_key(self._seed, device_id)

    def register(self, device_id: str, key: Ed25519PrivateKey) -> int:
        """The device's number in the store, registering it (with its public key) on first use."""
        row = self._conn.execute("SELECT num, public_key_pem FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        pem = signing.public_key_pem(key.public_key())
        if row is None:
            cur = self._conn.execute("INSERT INTO devices (device_id, public_key_pem) VALUES (?, ?)", (device_id, pem))
            return int(cur.lastrowid or 0)
        if row[1] != pem:
            raise LedgerError(f"{self.path}: device {device_id}'s recorded public key is not the one its seed "
                              "derives: the store was re-keyed or its seed replaced")
        return int(row[0])

    def lines(self, num: int) -> bytes:
        """Device ``num``'s entries as stored, one per line, in the order they were appended."""
        rows = self._conn.execute("SELECT entry FROM entries WHERE num = ? ORDER BY rowid", (num,)).fetchall()
        return b"".join(r[0].encode("utf-8") + b"\n" for r in rows)

    def sink(self, num: int) -> LineSink:
        """The :class:`~fed_nessa.privacy.chain.LineSink` of device ``num``: one row per entry."""
        def append(seq: int, line: bytes) -> None:
            try:
                self._conn.execute("INSERT INTO entries (num, seq, entry) VALUES (?, ?, ?)",
                                   (num, seq, line.rstrip(b"\n").decode("ascii")))
            except sqlite3.IntegrityError:
                raise LedgerError(f"{self.path}: device #{num} already holds seq {seq}: another writer? "
                                  "Re-open the store to verify before appending") from None
        return append

    def label(self, device_id: str) -> Path:
        """How findings and errors name a device's chain in the store: ``<store>#<device id>``."""
        return Path(f"{self.path}#{device_id}")


def store_label(path: Path, device_id: str) -> Path:
    return Path(f"{path}#{device_id}")


def count_devices(path: Path) -> int:
    with _closing(connect(path, read_only=True)) as conn:
        return int(conn.execute("SELECT count(*) FROM devices").fetchone()[0])


def max_num(path: Path) -> int:
    with _closing(connect(path, read_only=True)) as conn:
        return int(conn.execute("SELECT coalesce(max(num), 0) FROM devices").fetchone()[0])


def read_block(path: Path, first: int, last: int) -> list[tuple[str, str, bytes]]:
    """Devices ``first..last`` (by number): ``(device id, public key PEM, entry lines)`` each, in one query
    per table rather than one file open per device."""
    with _closing(connect(path, read_only=True)) as conn:
        devices = conn.execute("SELECT num, device_id, public_key_pem FROM devices WHERE num BETWEEN ? AND ? "
                               "ORDER BY num", (first, last)).fetchall()
        lines: dict[int, list[bytes]] = {num: [] for num, _d, _p in devices}
        for num, entry in conn.execute("SELECT num, entry FROM entries WHERE num BETWEEN ? AND ? "
                                       "ORDER BY num, rowid", (first, last)):
            lines.setdefault(num, []).append(entry.encode("utf-8") + b"\n")
    return [(device_id, pem, b"".join(lines[num])) for num, device_id, pem in devices]


def merge_parts(run_dir: Path, parts: list[Path]) -> None:
    """Append each part's store (a folder holding :data:`STORE_NAME`, the run's seed) to the run's, device
    numbers shifted, in the order given; each part is removed once merged.

    Writers that must not wait on one another (block workers, build processes) keep a store each; the
    merged store is the one a single writer would have left, so the audit reads one store.
    """
    conn = connect(Path(run_dir) / STORE_NAME)
    try:
        for part in parts:
            conn.execute("ATTACH DATABASE ? AS part", (str(Path(part) / STORE_NAME),))
            offset = conn.execute("SELECT coalesce(max(num), 0) FROM devices").fetchone()[0]
            conn.execute("BEGIN")
            conn.execute("INSERT INTO devices (num, device_id, public_key_pem) SELECT num + ?, device_id, "
                         "public_key_pem FROM part.devices ORDER BY num", (offset,))
            conn.execute("INSERT INTO entries (num, seq, entry) SELECT num + ?, seq, entry FROM part.entries "
                         "ORDER BY rowid", (offset,))
            conn.execute("COMMIT")
            conn.execute("DETACH DATABASE part")
            shutil.rmtree(part)
    finally:
        conn.close()


@contextmanager
def _closing(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    try:
        yield conn
    finally:
        conn.close()
