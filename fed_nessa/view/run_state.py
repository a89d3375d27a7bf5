"""What ``fed-nessa view`` shows, read from one run folder while a run may still be writing it.

Every reader is defensive: the engines rewrite ``summary.json`` atomically each round (the fleet
engine every few rounds), ledgers grow line by line, and other tools add fields; a file that is
absent, half-written or of an unknown shape gives an empty part and a note, never an error page.
Nothing here verifies a signature (that is ``fed-nessa audit``'s job): the page says so.
"""

from __future__ import annotations

import json
import math
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

AUDIT_FILE = Path("audit") / "audit.json"
#: The longest span the view spreads over its rounds (the run config's num-server-rounds limit).
MAX_SPAN_ROUNDS = 100_000


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
    out = []
    for line in text.splitlines():
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


class DeviceLedgers:
    """Each device ledger's spending, re-read only when the file changed (size, mtime)."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[tuple[int, int], DeviceSpend | None]] = {}
        self._memo = EpsilonMemo()

    def read(self, run_dir: Path) -> list[DeviceSpend]:
        folder = run_dir / DEVICES_DIR
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob(f"*/{DEVICE_LEDGER_NAME}")):
            try:
                st = path.stat()
            except OSError:
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            cached = self._cache.get(path)
            if cached is None or cached[0] != stamp:
                cached = self._cache[path] = (stamp, self._spend(path))
            if cached[1] is not None:
                out.append(cached[1])
        return out

    def _spend(self, path: Path) -> DeviceSpend | None:
        entries = _jsonl(path)
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
        return DeviceSpend(device=str(header.get("device_id", path.parent.name)), epsilon=eps,
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
    state.devices = ledgers.read(run_dir)
    audit = _json_file(run_dir / AUDIT_FILE, state.notes)
    state.audit = audit or None
    return state


def spend_summary(devices: list[DeviceSpend]) -> dict[str, float | int | None]:
    """Spent epsilon over devices (min, median, max) and the least budget left."""
    spent = [d.epsilon for d in devices if math.isfinite(d.epsilon)]
    left = [d.budget - d.epsilon for d in devices if d.budget is not None and math.isfinite(d.epsilon)]
    return {"devices": len(devices), "min": min(spent) if spent else None,
            "median": statistics.median(spent) if spent else None, "max": max(spent) if spent else None,
            "least_left": min(left) if left else None,
            "over_budget": sum(1 for d in devices if d.budget is not None and d.epsilon > d.budget + 1e-9)}
