"""What ``fed-nessa view`` shows, read from one run folder while a run may still be writing it.

Every reader is defensive: the engines rewrite ``summary.json`` atomically each round (the fleet
engine every few rounds), ledgers grow line by line, and other tools add fields; a file that is
absent, half-written or of an unknown shape gives an empty part and a note, never an error page.
Nothing here verifies a signature (that is ``fed-nessa audit``'s job): the page says so.

Device ledgers come from ``devices/*/privacy-ledger.jsonl`` or, for a fleet run with
``ledger-layout = sqlite``, from the run's ledger store, opened read-only (a WAL reader: a live run
keeps writing while the view reads its last committed state). A store of more than
:data:`STORE_SAMPLE` devices is *sampled*, not read whole: the view reads that many devices evenly
spread over the store's device numbers (two indexed queries), counts all of them in SQL, and the
page says which figures come from the sample, so a 10^6-device store costs what a 2,000-device one does.
"""

from __future__ import annotations

import json
import math
import sqlite3
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_nessa.evaluation.run_folder import SUMMARY_FILE
from fed_nessa.federated.protocol import DEVICES_DIR
from fed_nessa.privacy.accounting import EpsilonMemo, UnitNotCoveredError
from fed_nessa.privacy.events import EXAMPLE, DPEvent
from fed_nessa.privacy.ledger import (
    COMPLETE,
    DEVICE_LEDGER_NAME,
    FEDERATION_LEDGER_NAME,
    RESERVE,
    ROUND,
    SPAN,
)
from fed_nessa.privacy.store import STORE_NAME, connect

AUDIT_FILE = Path("audit") / "audit.json"
#: The longest span the view spreads over its rounds (the run config's num-server-rounds limit).
MAX_SPAN_ROUNDS = 100_000
#: The most devices of a ledger store the view reads (evenly spread over device numbers); all of a smaller one.
STORE_SAMPLE = 2_000
#: SQLite's write-ahead log beside a store a writer holds open.
WAL_SUFFIX = "-wal"


@dataclass
class DeviceSpend:
    """One device's spending as its ledger states it (not verified)."""

    device: str
    epsilon: float
    budget: float | None
    reserved: int
    completed: int


@dataclass
class RunState:
    """Everything the page shows, as plain values (strings still unescaped)."""

    summary: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    ledger_rounds: dict[int, dict[str, Any]] = field(default_factory=dict)
    declines: Counter[str] = field(default_factory=Counter)
    devices: list[DeviceSpend] = field(default_factory=list)
    #: How many devices the run has; more than ``len(devices)`` when a ledger store was sampled.
    devices_total: int = 0
    audit: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """A run is finished once its summary's ``final`` block has figures (running: absent, null or empty)."""
        return bool(obj(self.summary.get("final")))


def _json_file(path: Path, notes: list[str]) -> dict[str, Any]:
    """A JSON object file, or ``{}`` with a note when it is absent or not (yet) readable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"{path.name}: not readable yet ({type(exc).__name__})")
        return {}
    return data if isinstance(data, dict) else {}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON-object lines of a ledger; a torn last line (a write in progress) is skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return _json_lines(text.splitlines())


def _json_lines(lines: list[str]) -> list[dict[str, Any]]:
    """The lines that are JSON objects (a store's rows, a file's lines); others are skipped."""
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else ``{}`` (fields may be absent or of another shape)."""
    return value if isinstance(value, dict) else {}


def _payload(entry: dict[str, Any]) -> dict[str, Any]:
    return obj(entry.get("payload"))


def federation_rounds(path: Path) -> tuple[dict[int, dict[str, Any]], Counter[str]]:
    """Per round: joined/declined/failed counts and the ledger's extras; and declines by reason."""
    rounds: dict[int, dict[str, Any]] = {}
    reasons: Counter[str] = Counter()
    for entry in _jsonl(path):
        kind, p = entry.get("kind"), _payload(entry)
        if kind not in (ROUND, SPAN):
            continue
        extra = obj(p.get("extra"))
        first = p.get("round", p.get("first_round"))
        if not isinstance(first, int):
            continue
        counts = {k: len(p[k]) if isinstance(p.get(k), list) else 0 for k in ("joined", "declined", "failed")}
        given = p.get("last_round", first)
        last = given if isinstance(given, int) and first <= given <= first + MAX_SPAN_ROUNDS else first
        info: dict[str, Any] = {**counts, "last_round": last}
        info.update({k: extra[k] for k in ("guaranteed_arrivals", "status", "note", "phase") if k in extra})
        for r in range(first, last + 1):
            rounds[r] = info  # a span entry speaks for every round it covers (a hostile one for one round)
        why = extra.get("decline_reasons")
        if isinstance(why, dict):
            for reason, n in why.items():
                if isinstance(n, int):
                    reasons[str(reason)] += n
        elif counts["declined"]:
            reasons["declined (no reason recorded in the federation ledger)"] += counts["declined"]
    return rounds, reasons


@dataclass
class DeviceRead:
    """The device ledgers read now: every device's spending, or a sample's, and how many devices there are."""

    devices: list[DeviceSpend]
    total: int


def store_connection(path: Path) -> sqlite3.Connection:
    """A read-only connection to a ledger store (the view never writes evidence, even by accident): a WAL
    reader while a run holds the store open (its ``-wal`` file exists), else immutable (no files created)."""
    live = path.with_name(path.name + WAL_SUFFIX).exists()
    return connect(path, read_only=True, immutable=not live)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class DeviceLedgers:
    """Each device ledger's spending, re-read only when its file (or the ledger store) changed."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[tuple[int, int], DeviceSpend | None]] = {}
        self._store: tuple[tuple[tuple[int, int], ...], DeviceRead] | None = None
        self._memo = EpsilonMemo()

    def read(self, run_dir: Path, notes: list[str] | None = None) -> DeviceRead:
        """From the ledger store when the run has one, else from the per-device files."""
        store = run_dir / STORE_NAME
        if store.is_file():
            return self._read_store(store, [] if notes is None else notes)
        devices = self._read_files(run_dir)
        return DeviceRead(devices, len(devices))

    def _read_files(self, run_dir: Path) -> list[DeviceSpend]:
        folder = run_dir / DEVICES_DIR
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob(f"*/{DEVICE_LEDGER_NAME}")):
            try:
                stamp = _stamp(path)
            except OSError:
                continue
            cached = self._cache.get(path)
            if cached is None or cached[0] != stamp:
                cached = self._cache[path] = (stamp, self._spend(_jsonl(path), path.parent.name))
            if cached[1] is not None:
                out.append(cached[1])
        return out

    def _read_store(self, path: Path, notes: list[str]) -> DeviceRead:
        """The store's devices (a sample above :data:`STORE_SAMPLE`); re-read when the store or its WAL changed."""
        try:
            stamp = tuple(_stamp(p) for p in (path, path.with_name(path.name + WAL_SUFFIX)) if p.exists())
        except OSError:
            stamp = ()
        if self._store is not None and self._store[0] == stamp:
            return self._store[1]
        try:
            conn = store_connection(path)
            try:
                read = self._query_store(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:  # mid-creation by a live run, or not a store: the page says so
            notes.append(f"{STORE_NAME}: not readable yet ({exc})")
            return self._store[1] if self._store is not None else DeviceRead([], 0)
        self._store = (stamp, read)
        return read

    def _query_store(self, conn: sqlite3.Connection) -> DeviceRead:
        total, top = conn.execute("SELECT count(*), coalesce(max(num), 0) FROM devices").fetchone()
        if total <= STORE_SAMPLE:
            rows = conn.execute("SELECT num, device_id FROM devices ORDER BY num").fetchall()
        else:  # evenly spread device numbers (a store numbers its devices 1, 2, ... as they join)
            wanted = sorted({1 + (i * (top - 1)) // (STORE_SAMPLE - 1) for i in range(STORE_SAMPLE)})
            marks = ",".join("?" * len(wanted))
            rows = conn.execute(f"SELECT num, device_id FROM devices WHERE num IN ({marks}) ORDER BY num",
                                wanted).fetchall()
        lines: dict[int, list[str]] = {num: [] for num, _ in rows}
        nums = list(lines)
        for i in range(0, len(nums), 500):  # SQLite's bound-parameter limit
            chunk = nums[i:i + 500]
            query = f"SELECT num, entry FROM entries WHERE num IN ({','.join('?' * len(chunk))}) ORDER BY num, rowid"
            for num, entry in conn.execute(query, chunk):
                lines[num].append(entry)
        spends = (self._spend(_json_lines(lines[num]), str(device_id)) for num, device_id in rows)
        return DeviceRead([s for s in spends if s is not None], int(total))

    def _spend(self, entries: list[dict[str, Any]], fallback_id: str) -> DeviceSpend | None:
        if not entries or entries[0].get("kind") != "header":
            return None
        header = _payload(entries[0])
        budget = obj(header.get("budget"))
        events = []
        for e in entries:
            ev = _payload(e).get("event")
            if e.get("kind") == RESERVE and isinstance(ev, dict):
                try:
                    events.append(DPEvent.from_dict(ev))
                except (ValueError, TypeError):
                    continue
        delta = budget.get("delta")
        policy = obj(header.get("policy"))
        unit = str(budget.get("unit", policy.get("privacy_unit", EXAMPLE)))
        eps = self._epsilon(events, delta if isinstance(delta, float) and delta > 0 else 1e-5, unit)
        cap = budget.get("epsilon")
        return DeviceSpend(device=str(header.get("device_id", fallback_id)), epsilon=eps,
                           budget=float(cap) if isinstance(cap, int | float) else None, reserved=len(events),
                           completed=sum(1 for e in entries if e.get("kind") == COMPLETE))

    def _epsilon(self, events: list[DPEvent], delta: float, unit: str) -> float:
        try:
            return float(self._memo.epsilon(events, delta, unit=unit))
        except UnitNotCoveredError:
            return math.inf
        except (ValueError, ArithmeticError):
            return math.nan


def read_run(run_dir: Path, ledgers: DeviceLedgers) -> RunState:
    """The run folder's state now (see the module docstring)."""
    state = RunState()
    state.summary = _json_file(run_dir / SUMMARY_FILE, state.notes)
    rounds = state.summary.get("rounds")
    state.rounds = [r for r in rounds if isinstance(r, dict)] if isinstance(rounds, list) else []
    state.ledger_rounds, state.declines = federation_rounds(run_dir / FEDERATION_LEDGER_NAME)
    read = ledgers.read(run_dir, state.notes)
    state.devices, state.devices_total = read.devices, read.total
    audit = _json_file(run_dir / AUDIT_FILE, state.notes)
    state.audit = audit or None
    return state


def sample_note(state: RunState) -> str:
    """How the page says its device figures come from a sample of a ledger store ('' when every device was read)."""
    if state.devices_total <= len(state.devices):
        return ""
    return (f"an even sample of {len(state.devices)} of the {state.devices_total} devices in the ledger store "
            "(by device number)")


def spend_summary(devices: list[DeviceSpend], total: int | None = None) -> dict[str, float | int | None]:
    """Spent epsilon over devices (min, median, max) and the least budget left; ``total``: how many devices
    the run has when ``devices`` is a sample of them (then the figures are the sample's, and say so)."""
    spent = [d.epsilon for d in devices if math.isfinite(d.epsilon)]
    left = [d.budget - d.epsilon for d in devices if d.budget is not None and math.isfinite(d.epsilon)]
    sampled = total is not None and total > len(devices)
    counts: dict[str, float | int | None] = ({"devices": total, "devices read (an even sample)": len(devices)}
                                              if sampled else {"devices": len(devices)})
    return {**counts, "min": min(spent) if spent else None,
            "median": statistics.median(spent) if spent else None, "max": max(spent) if spent else None,
            "least_left": min(left) if left else None,
            "over_budget" + (" (in the sample)" if sampled else ""):
                sum(1 for d in devices if d.budget is not None and d.epsilon > d.budget + 1e-9)}
