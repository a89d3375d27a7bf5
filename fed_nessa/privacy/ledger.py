"""Per-device privacy ledger and the server's federation ledger.

A device's ledger is the record of every DP mechanism it ran: an append-only,
hash-chained JSONL file signed with the device's own Ed25519 key, so an auditor
can check it without trusting the device software that wrote it *or* the server
that collected it.

Spending is two-phase so a crash can never lose a spend: ``reserve(event)`` is
appended and fsynced *before* the mechanism runs; ``complete(seq, ...)`` after.
Accounting counts every reserved event, whether completed, failed or left
dangling by a crash: conservative, and never double-counted because a restart
continues the same chain instead of starting a new one.

At fleet scale (10,000 devices x 1,000 rounds) one signed, fsynced line per
device per round is too many, so a device may reserve a *span* of rounds in one
event (``DPEvent.last_round``) and the server records a block of rounds in one
``span`` entry (:meth:`FederationLedger.record_span`) instead of one ``round``
entry per round.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fed_nessa import __version__
from fed_nessa.config import DevicePolicy
from fed_nessa.outputs import check_output
from fed_nessa.privacy import signing
from fed_nessa.privacy.accounting import ACCOUNTANTS, RDP, compute_epsilon
from fed_nessa.privacy.budget import BudgetDecision, BudgetExceededError, check_budget, validate_budget
from fed_nessa.privacy.chain import LedgerError, SignedChain, entry_hash
from fed_nessa.privacy.events import EXAMPLE, UNITS, DPEvent
from fed_nessa.privacy.store import FILES, LAYOUTS, LedgerStore

DEVICE_LEDGER_NAME = "privacy-ledger.jsonl"
DEVICE_KEY_NAME = "device-key.pem"
DEVICE_PUB_NAME = "device-key.pub.pem"
FEDERATION_LEDGER_NAME = "federation-ledger.jsonl"
SERVER_KEY_NAME = "server-key.pem"
SERVER_PUB_NAME = "server-key.pub.pem"

RESERVE = "reserve"
COMPLETE = "complete"
ROUND = "round"
SPAN = "span"
#: The federation ledger's signed end-of-run record: its absence means the run did not finish or was cut.
END = "end"
#: Key of a round/span entry's ``extra``: each participating device's ledger head ``{id: [seq, sha256]}``.
LEDGER_HEADS = "ledger_heads"
#: Key of a round/span entry's ``extra``: the public DP parameters of the round (:func:`public_parameters`).
PUBLIC_PARAMETERS = "public_parameters"
STATUSES = ("done", "failed")

#: Environment variable naming the key store of a simulated run (default: ``<run-dir>.keys/`` beside it).
KEY_STORE_ENV = "FED_NESSA_KEY_STORE"
#: Inside a key store: the server's key folder, and one folder per device (``devices/<id>/``).
SERVER_KEYS = "server"
DEVICE_KEYS = "devices"
#: The scheme of :func:`received_chain` (recorded with every chain, so the audit knows how to recompute it).
CHAIN_SCHEME = "sha256-chain-v1"
#: Where runs before the key store kept the server's private key (inside the run folder).
LEGACY_KEYS_DIR = "keys"
_CHAIN_GENESIS = hashlib.sha256(b"fed-nessa received-model chain v1").hexdigest()

#: A device id is a folder name in the run folder and in the key store: letters, digits, ``.``, ``_`` and
#: ``-``, starting with a letter or digit (so never ``.``, ``..`` or hidden), 1 to 128 characters.
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

__all__ = ["DeviceLedger", "FederationLedger", "LedgerError", "BudgetDecision", "BudgetExceededError",
           "dropped_by_round", "final_heads", "heads_digest", "key_store", "check_key_store", "device_id_problem",
           "model_sha256", "config_sha256", "received_chain", "open_device_ledgers", "ledger_batch"]



# ----------------------------------------------------------------------------- device ids
def device_id_problem(device_id: object) -> str | None:
    """Why ``device_id`` is not a safe, single path component (None when it is).

    The id names the device's ledger folder (``<run>/devices/<id>``) and its private-key
    folder (``<store>/devices/<id>``); ``..`` or ``a/b`` would put them elsewhere.
    """
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.fullmatch(device_id):
        return (f"device id {device_id!r} is not a safe folder name (1-128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit)")
    return None


# ----------------------------------------------------------------------------- key store
def default_key_store(run_dir: Path | str) -> Path:
    """``<run-dir>.keys/`` beside the run folder: the store a run uses without ``$FED_NESSA_KEY_STORE``."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{run_dir.name}.keys"


def key_store(run_dir: Path | str) -> Path:
    """Where a simulated run keeps its PRIVATE signing keys: never inside the run folder.

    ``$FED_NESSA_KEY_STORE`` if set (one store per run: it holds ``server/`` and
    ``devices/<id>/``), else :func:`default_key_store`. The public keys stay beside the
    ledgers, so a run folder carries what an auditor needs and nothing that could re-sign
    it; a store named inside the run folder is refused (``ValueError``), as it would put
    the keys back beside the ledgers they sign.
    """
    env = os.environ.get(KEY_STORE_ENV, "").strip()
    if not env:
        return default_key_store(run_dir)
    store, run = Path(env).resolve(), Path(run_dir).resolve()
    if store == run or run in store.parents:
        raise ValueError(f"{KEY_STORE_ENV}={env}: inside the run folder {run_dir}; the private keys must live "
                         "outside it, or anyone holding the run folder could re-sign its ledgers")
    return Path(env)


def check_key_store(run_dir: Path | str) -> Path:
    """The run's key store, checked before anything is written: outside the run folder and a writable folder."""
    where = f"key store ({KEY_STORE_ENV})" if os.environ.get(KEY_STORE_ENV, "").strip() else "key store"
    return check_output(key_store(run_dir), where, "folder")


def device_key_folder(run_dir: Path | str, device_id: str) -> Path:
    """A simulated device's private-key folder in its run's :func:`key_store`."""
    return key_store(run_dir) / DEVICE_KEYS / device_id


def server_key_folder(run_dir: Path | str) -> Path:
    """The server's private-key folder in its run's :func:`key_store`."""
    return key_store(run_dir) / SERVER_KEYS


# ----------------------------------------------------------------------------- what a device received
def model_sha256(vector: Any) -> str:
    """SHA-256 of a global model vector as sent on the wire: flat little-endian float32 bytes."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(vector, dtype="<f4").reshape(-1)).tobytes()).hexdigest()


def config_sha256(config: Mapping[str, Any]) -> str:
    """SHA-256 of a round config (flat ConfigRecord values) in canonical JSON; bytes as hex."""
    plain = {str(k): (v.hex() if isinstance(v, bytes | bytearray) else v) for k, v in config.items()}
    return signing.sha256_hex(signing.canonical_json(plain))


def received_chain(links: Iterable[tuple[int, str, str]]) -> str:
    """Hash chain over ``(round, model_sha256, config_sha256)`` in round order (scheme ``sha256-chain-v1``).

    ``h_0 = sha256("fed-nessa received-model chain v1")``,
    ``h_k = sha256(h_{k-1} ":" round ":" model ":" config)`` (hex strings, decimal round).
    One 64-hex value proves which model and config a device received in every round of a
    span; the auditor recomputes it from the server's per-round hashes.
    """
    h = _CHAIN_GENESIS
    for r, model, config in links:
        h = hashlib.sha256(f"{h}:{int(r)}:{model}:{config}".encode("ascii")).hexdigest()
    return h


def _device_key_path(folder: Path, device_id: str, key_folder: Path | None) -> Path:
    """The private key's folder: ``key_folder``; else beside the ledger if a key is there (a legacy or
    deployed layout); else the simulation's key store when ``folder`` is ``<run>/devices/<id>``."""
    if key_folder is not None:
        return Path(key_folder)
    if (folder / DEVICE_KEY_NAME).exists():
        return folder
    if folder.parent.name == DEVICE_KEYS:
        store = device_key_folder(folder.parent.parent, device_id)
        if (store / DEVICE_KEY_NAME).exists():
            return store
    return folder


@dataclass(frozen=True)
class Budget:
    """A device's budget: fixed for the life of its ledger, recorded for the auditor."""

    epsilon: float
    delta: float
    accountant: str = RDP
    #: The privacy unit the budget is stated in (``example`` or ``device``; see accounting.for_unit).
    unit: str = EXAMPLE

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant}
        if self.unit != EXAMPLE:  # example budgets serialise exactly as before units existed
            out["unit"] = self.unit
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Budget | None:
        if not data:
            return None
        return cls(float(data["epsilon"]), float(data["delta"]), str(data.get("accountant", RDP)),
                   str(data.get("unit", EXAMPLE)))


class DeviceLedger:
    """One device's signed ledger of DP events (see the module docstring).

    Spans: an event with ``last_round`` reserves rounds ``round..last_round`` at
    once (one reserve line, fsynced before the first of them runs). The span is
    charged in full from the moment it is reserved, even if the device drops
    out of some of its rounds: the device cannot prove afterwards that a round
    it missed released nothing, so, as with a crash-dangling reservation, it
    counts it (conservative, never an under-count). ``complete`` closes the span
    once, after its last round ran (or failed). :meth:`rounds` and
    :meth:`participations` count every round a reserved event covers.
    """

    def __init__(self, folder: Path, device_id: str, chain: SignedChain):
        self.folder = folder
        self.device_id = device_id
        self._chain = chain
        self._budget = Budget.from_dict(chain.header.get("budget"))
        policy = chain.header.get("policy")
        self._policy = DevicePolicy.from_dict(policy) if policy else None

    @classmethod
    def open(cls, folder: Path, device_id: str, *, policy: DevicePolicy | None = None,
             epsilon_budget: float | None = None, delta: float | None = None,
             budget_accountant: str = RDP, key_folder: Path | None = None,
             store: LedgerStore | None = None) -> DeviceLedger:
        """Open (verify and continue) or create ``folder/privacy-ledger.jsonl``.

        ``policy`` (the device's own, from its node config) is written into the header of
        a new ledger; on every reopen the header's policy is restored and wins over the
        one passed in, so a raised budget in a later node config or run-config changes
        nothing. ``epsilon_budget``/``delta`` (no full policy: unit tests, tools) are
        written into a new header and must match an existing one.

        ``key_folder`` holds the private key ``device-key.pem`` (a simulation's key store,
        :func:`device_key_folder`); the public key is always written beside the ledger. A
        legacy key found beside the ledger is moved into ``key_folder``. Without
        ``key_folder`` the key is looked up beside the ledger, then in the simulation's key
        store for ``<run>/devices/<id>`` folders.

        ``store``: keep the chain in the run's :class:`~fed_nessa.privacy.store.LedgerStore` instead
        (the fleet engine's layout at 10^5-10^6 devices): the same entries and signatures, the key
        derived from the store's seed; ``folder`` and ``key_folder`` are then unused.
        """
        folder = Path(folder)
        problem = device_id_problem(device_id)
        if problem:
            raise ValueError(f"{folder}: {problem}")
        unit = EXAMPLE
        if policy is not None:
            epsilon_budget, delta, unit = policy.epsilon_budget, policy.delta, policy.privacy_unit
        budget = _budget_arg(epsilon_budget, delta, budget_accountant, unit)
        header = {"role": "device", "device_id": device_id, "software": f"fed-nessa {__version__}",
                  "budget": budget.to_dict() if budget else None,
                  "policy": policy.to_dict() if policy is not None else None}
        if store is not None:
            key = store.device_key(device_id)
            num = store.register(device_id, key)
            chain = SignedChain.open_lines(store.label(device_id), store.lines(num), key, header, store.sink(num))
            return cls._checked(cls(folder, device_id, chain), device_id, policy, budget)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / DEVICE_LEDGER_NAME
        new = not path.exists() or path.stat().st_size == 0
        key_dir = _device_key_path(folder, device_id, key_folder)
        if key_dir != folder and (folder / DEVICE_KEY_NAME).exists() and not (key_dir / DEVICE_KEY_NAME).exists():
            key_dir.mkdir(parents=True, exist_ok=True)  # a private key never stays in a run folder
            shutil.move(str(folder / DEVICE_KEY_NAME), str(key_dir / DEVICE_KEY_NAME))
        key_dir.mkdir(parents=True, exist_ok=True)
        key = signing.load_or_create_private_key(key_dir / DEVICE_KEY_NAME, folder / DEVICE_PUB_NAME,
                                                 create=new)
        return cls._checked(cls(folder, device_id, SignedChain.open(path, key, header)), device_id, policy, budget)

    @classmethod
    def _checked(cls, ledger: DeviceLedger, device_id: str, policy: DevicePolicy | None,
                 budget: Budget | None) -> DeviceLedger:
        """The reopened ledger, checked against the caller: its device, and a policy/budget it recorded."""
        path = ledger.path
        found = ledger._chain.header.get("device_id")
        if found != device_id:
            raise LedgerError(f"{path}: belongs to device {found!r}, not {device_id!r}")
        if policy is not None:
            if ledger._policy is None:
                raise LedgerError(f"{path}: the ledger's header holds no device policy (made without one); "
                                  "a device with a policy needs a ledger that recorded it at first open")
            return ledger  # the header's policy wins: restored, never replaced
        if budget and ledger._budget and budget != ledger._budget:
            raise ValueError(f"{path}: the ledger's budget is {ledger._budget.to_dict()}, asked "
                             f"{budget.to_dict()}: a device's budget is fixed for its ledger's life")
        ledger._budget = ledger._budget or budget
        return ledger

    @property
    def path(self) -> Path:
        return self._chain.path

    @property
    def key_fingerprint(self) -> str:
        return str(self._chain.header["key_fingerprint"])

    @property
    def budget(self) -> Budget | None:
        return self._budget

    @property
    def policy(self) -> DevicePolicy | None:
        """The device policy recorded in the header at first open (None for policy-less ledgers)."""
        return self._policy

    def participations(self) -> int:
        """Rounds this device's reservations cover (each counts, whatever its status or drop-outs)."""
        return len(self.rounds())

    @property
    def pinned_server_fingerprint(self) -> str | None:
        """The server key fingerprint this device pinned: the first one its reserve entries recorded."""
        for e in self._chain.entries:
            if e["kind"] == RESERVE:
                fp = (e["payload"].get("received") or {}).get("server_key_fingerprint")
                if fp:
                    return str(fp)
        return None

    def head(self) -> tuple[int, str]:
        """``(seq, SHA-256)`` of the ledger's last entry: the server signs it per round, so a ledger
        cut back to an earlier entry (still validly signed) no longer reaches the head it signed."""
        last = self._chain.entries[-1]
        return int(last["seq"]), entry_hash(last)

    def reserve(self, event: DPEvent, received: Mapping[str, Any] | None = None) -> int:
        """Durably record ``event`` before it runs; returns its seq for :meth:`complete`.

        Refuses (``BudgetExceededError``) an event that would cross the known budget.
        ``received``: what the server sent for this round, signed into the entry
        (``round``, ``model_sha256``, ``config_sha256``, ``server_key_fingerprint``; see
        docs/privacy.md); the first ``server_key_fingerprint`` recorded is the device's pin.
        """
        if not isinstance(event, DPEvent):
            raise TypeError(f"reserve() needs a DPEvent, got {type(event).__name__}")
        if self._budget is not None:
            decision = check_budget(self.events(), event, self._budget.epsilon, self._budget.delta,
                                    self._budget.accountant, self._budget.unit)
            if not decision.allowed:
                raise BudgetExceededError(f"{self.path}: device {self.device_id}: {decision.reason}")
        payload = {"event": event.to_dict(),
                   "budget": self._budget.to_dict() if self._budget else None}
        if received is not None:
            payload["received"] = _plain_json(dict(received))
        return int(self._chain.append(RESERVE, payload)["seq"])

    def complete(self, seq: int, epsilon_after: float, status: str = "done",
                 accountant: str = RDP, received: Mapping[str, Any] | None = None) -> None:
        """Close reservation ``seq``: the mechanism ran (``done``) or not (``failed``).

        ``epsilon_after`` is the device's epsilon over every event reserved so far
        (all reserve entries before this complete entry), at that event's delta,
        by ``accountant``, i.e. ``ledger.epsilon(delta, accountant)`` right now:
        the auditor recomputes it. ``received`` (spans): the :func:`received_chain` of the
        models and configs received in the span's rounds, ``{"scheme", "rounds": [[first,
        last], ...], "chain"}``: known only once the rounds ran, hence on the complete entry.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if not (isinstance(epsilon_after, (int, float)) and math.isfinite(epsilon_after)
                and epsilon_after >= 0):
            raise ValueError(f"epsilon_after must be a finite number >= 0, got {epsilon_after!r}")
        entries = self._chain.entries
        if not (isinstance(seq, int) and 0 < seq < len(entries) and entries[seq]["kind"] == RESERVE):
            raise ValueError(f"{self.path}: seq {seq!r} is not a reserve entry")
        if seq not in self.pending():
            raise ValueError(f"{self.path}: reservation seq {seq} is already completed")
        delta = float(entries[seq]["payload"]["event"]["delta"])
        payload: dict[str, Any] = {"reserve_seq": seq, "status": status, "epsilon_after": float(epsilon_after),
                                   "accountant": accountant, "delta": delta}
        if self.unit != EXAMPLE:
            payload["unit"] = self.unit
        if received is not None:
            payload["received"] = _plain_json(dict(received))
        self._chain.append(COMPLETE, payload)

    def entries(self) -> list[dict[str, Any]]:
        """The verified entries (copies are not made: treat as read-only)."""
        return self._chain.entries

    def events(self) -> list[DPEvent]:
        """Every reserved event in order: completed, failed or dangling."""
        return [DPEvent.from_dict(e["payload"]["event"]) for e in self._chain.entries
                if e["kind"] == RESERVE]

    def pending(self) -> list[int]:
        """Seqs of reservations not (yet) completed, e.g. left by a crash."""
        done = {e["payload"]["reserve_seq"] for e in self._chain.entries if e["kind"] == COMPLETE}
        return [e["seq"] for e in self._chain.entries if e["kind"] == RESERVE and e["seq"] not in done]

    def rounds(self) -> set[int]:
        """Every round covered by a reserved event: a span contributes all of its rounds."""
        return {r for ev in self.events() for r in ev.covered_rounds()}

    @property
    def unit(self) -> str:
        """The privacy unit this device budgets in (its budget's; ``example`` without one)."""
        return self._budget.unit if self._budget is not None else EXAMPLE

    def epsilon(self, delta: float, accountant: str = RDP, unit: str | None = None) -> float:
        """Epsilon of every reserved event, in ``unit`` (default: the unit the device budgets in)."""
        return compute_epsilon(self.events(), delta, accountant, unit or self.unit)

    def check_budget(self, planned: DPEvent, epsilon_budget: float, delta: float,
                     accountant: str = RDP) -> BudgetDecision:
        """Would ``planned`` keep this device within ``epsilon_budget`` at ``delta``?

        With a budget in the header, ``epsilon_budget``/``delta`` are a *request* that can only
        tighten it: a request for a larger budget or a larger delta is declined with the reason,
        and the header's budget is never changed. A ledger without one fixes it now (in memory:
        policy-less ledgers are for tools and tests).
        """
        asked = _budget_arg(epsilon_budget, delta, accountant)
        assert asked is not None
        own = self._budget
        if own is None:
            self._budget = own = asked
        eps_now = compute_epsilon(self.events(), own.delta, own.accountant, own.unit)
        if asked.epsilon > own.epsilon + 1e-12 or asked.delta > own.delta:
            return BudgetDecision(False, eps_now, eps_now,
                                  f"declined: the run asks for epsilon budget {asked.epsilon:g} at delta "
                                  f"{asked.delta:g}, beyond this device's policy (epsilon {own.epsilon:g}, delta "
                                  f"{own.delta:g}) fixed in its ledger header")
        return check_budget(self.events(), planned, min(asked.epsilon, own.epsilon), own.delta, own.accountant,
                            own.unit)


class FederationLedger:
    """The server's signed, hash-chained record of who joined, declined or failed each round."""

    def __init__(self, chain: SignedChain):
        self._chain = chain

    @classmethod
    def open(cls, path: Path, key_folder: Path) -> FederationLedger:
        """Open or create the ledger at ``path``, signed by ``key_folder/server-key.pem``.

        ``key_folder`` must not be inside the run folder (:func:`server_key_folder`); a key
        left by an older run in ``<run>/keys/`` is moved there.

        The public key is also written beside the ledger (``server-key.pub.pem``)
        so a run folder carries what an auditor needs.
        """
        path, key_folder = Path(path), Path(key_folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        key_folder.mkdir(parents=True, exist_ok=True)
        legacy = path.parent / LEGACY_KEYS_DIR / SERVER_KEY_NAME
        if legacy.exists() and not (key_folder / SERVER_KEY_NAME).exists() and legacy.parent != key_folder:
            shutil.move(str(legacy), str(key_folder / SERVER_KEY_NAME))  # out of the run folder
        new = not path.exists() or path.stat().st_size == 0
        key = signing.load_or_create_private_key(key_folder / SERVER_KEY_NAME,
                                                 key_folder / SERVER_PUB_NAME, create=new)
        beside = path.parent / SERVER_PUB_NAME
        if not beside.exists():
            signing.atomic_write(beside, signing.public_key_pem(key.public_key()).encode("ascii"), 0o644)
        chain = SignedChain.open(path, key, {"role": "server", "software": f"fed-nessa {__version__}"})
        return cls(chain)

    @property
    def path(self) -> Path:
        return self._chain.path

    @property
    def key_fingerprint(self) -> str:
        """The fingerprint of the server's signing key (what devices pin)."""
        return str(self._chain.header["key_fingerprint"])

    def pinned_devices(self) -> dict[str, str]:
        """Every device key fingerprint pinned so far (``extra.device_key_fingerprints``, first wins)."""
        pins: dict[str, str] = {}
        for e in self._chain.entries:
            if e["kind"] in (ROUND, SPAN):
                for dev, fp in ((e["payload"].get("extra") or {}).get("device_key_fingerprints") or {}).items():
                    pins.setdefault(str(dev), str(fp))
        return pins

    def record_round(self, round: int, joined: Iterable[str], declined: Iterable[str],
                     failed: Iterable[str], extra: dict[str, Any] | None = None) -> int:
        """Append one round's participation; a device may appear in one list only."""
        _check_round(round, "round")
        lists = _disjoint_lists(f"round {round}", joined, declined, failed)
        payload = {"round": round, **lists, "extra": _plain_json(extra)}
        return int(self._chain.append(ROUND, payload)["seq"])

    def record_span(self, first_round: int, last_round: int, joined: Iterable[str],
                    declined: Iterable[str], failed: Iterable[str],
                    extra: dict[str, Any] | None = None) -> int:
        """Append ONE ``span`` entry for rounds ``first_round..last_round``; returns its seq.

        Why: a fleet of 10,000 devices x 1,000 rounds must not write 1,000 entries
        each listing 10,000 ids. ``joined`` took part in *every* round of the span
        except the sparse per-round drop-outs ``extra["dropped"] = {round: [ids]}``
        (each id one of ``joined``, each round within the span); ``declined``
        declined the whole span, ``failed`` failed it. A device is in one list
        only. Drop-out rounds are stored with decimal-string keys (JSON objects
        have string keys), sorted, so the entry in memory is what a re-read gives.
        """
        _check_round(first_round, "first_round")
        _check_round(last_round, "last_round")
        if last_round < first_round:
            raise ValueError(f"last_round {last_round} is before first_round {first_round}")
        where = f"span {first_round}..{last_round}"
        lists = _disjoint_lists(where, joined, declined, failed)
        plain = _plain_json(extra)
        if "dropped" in plain:
            plain["dropped"] = _dropped_arg(dict((extra or {})["dropped"]), first_round, last_round,
                                            set(lists["joined"]), where)
        payload = {"first_round": first_round, "last_round": last_round, **lists, "extra": plain}
        return int(self._chain.append(SPAN, payload)["seq"])

    def record_end(self) -> int:
        """Append the signed end-of-run record: the last round recorded, how many rounds, and the digest of
        every device's last recorded ledger head. Dropping any round (or the record itself) leaves a ledger
        without this record as its last entry, which the audit fails."""
        payloads = [e["payload"] for e in self._chain.entries if e["kind"] in (ROUND, SPAN)]
        rounds: set[int] = set()
        for p in payloads:
            rounds.update(range(p["first_round"], p["last_round"] + 1) if "first_round" in p else [p["round"]])
        heads = final_heads(payloads)
        payload = {"last_round": max(rounds) if rounds else 0, "rounds": len(rounds), "devices": len(heads),
                   "heads_digest": heads_digest(heads)}
        return int(self._chain.append(END, payload)["seq"])

    def rounds(self) -> list[dict[str, Any]]:
        """Payloads of the per-round entries (``round``), in order; spans are in :meth:`spans`."""
        return [e["payload"] for e in self._chain.entries if e["kind"] == ROUND]

    def spans(self) -> list[dict[str, Any]]:
        """Payloads of the ``span`` entries, in order (see :meth:`record_span` and :func:`dropped_by_round`)."""
        return [e["payload"] for e in self._chain.entries if e["kind"] == SPAN]


def dropped_by_round(span: dict[str, Any]) -> dict[int, list[str]]:
    """A span payload's drop-outs as ``{round: [device ids]}`` with int rounds (empty when none).

    Shared by the server-side reader and the audit so both parse the on-disk
    (string-keyed) form the same way; raises ``ValueError`` on a malformed one.
    """
    raw = (span.get("extra") or {}).get("dropped") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"extra.dropped must be an object {{round: [device ids]}}, got {type(raw).__name__}")
    out: dict[int, list[str]] = {}
    for key, ids in raw.items():
        try:
            r = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"extra.dropped: round key {key!r} is not an integer") from None
        if not isinstance(ids, list) or not all(isinstance(d, str) and d for d in ids):
            raise ValueError(f"extra.dropped[{key!r}] must list device ids as non-empty strings")
        out[r] = out.get(r, []) + ids
    return out


def final_heads(payloads: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, str]]:
    """Each device's newest ledger head recorded in round/span payloads (``extra.ledger_heads``), by seq.

    Shared by the server (its end-of-run record) and the audit (which recomputes it); malformed
    heads are skipped here and reported by the audit.
    """
    out: dict[str, tuple[int, str]] = {}
    for payload in payloads:
        heads = (payload.get("extra") or {}).get(LEDGER_HEADS) or {}
        if not isinstance(heads, dict):
            continue
        for dev, head in heads.items():
            if (isinstance(head, list) and len(head) == 2 and isinstance(head[0], int) and isinstance(head[1], str)
                    and (dev not in out or head[0] >= out[dev][0])):
                out[str(dev)] = (head[0], head[1])
    return out


def heads_digest(heads: Mapping[str, tuple[int, str]]) -> str:
    """SHA-256 of ``{device: [seq, sha256]}`` in canonical JSON (sorted keys)."""
    return signing.sha256_hex(signing.canonical_json({d: [int(s), str(h)] for d, (s, h) in heads.items()}))


def _check_round(value: object, name: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _disjoint_lists(where: str, joined: Iterable[str], declined: Iterable[str],
                    failed: Iterable[str]) -> dict[str, list[str]]:
    lists = {"joined": _ids(joined, "joined"), "declined": _ids(declined, "declined"),
             "failed": _ids(failed, "failed")}
    seen: dict[str, str] = {}
    for name, ids in lists.items():
        for d in ids:
            if d in seen:
                raise ValueError(f"{where}: device {d!r} is both {seen[d]} and {name}")
            seen[d] = name
    return lists


def _plain_json(extra: dict[str, Any] | None) -> dict[str, Any]:
    """``extra`` as it will read back from the file (string keys, lists for tuples).

    The entry is signed over its canonical JSON; keeping in memory the very
    object a re-read yields means a fresh and a reopened ledger agree.
    """
    plain = json.loads(json.dumps(dict(extra or {}), allow_nan=False))
    assert isinstance(plain, dict)
    return plain


def _dropped_arg(dropped: dict[Any, Any], first: int, last: int, joined: set[str],
                 where: str) -> dict[str, list[str]]:
    out: dict[int, list[str]] = {}
    for key, ids in dropped.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ValueError(f"{where}: extra['dropped'] keys must be rounds, got {key!r}")
        try:
            r = int(key)
        except ValueError:
            raise ValueError(f"{where}: extra['dropped'] key {key!r} is not a round") from None
        if not first <= r <= last:
            raise ValueError(f"{where}: extra['dropped'] names round {r}, outside the span")
        if isinstance(ids, str):
            raise ValueError(f"{where}: extra['dropped'][{r}] must be a list of device ids, got a string")
        id_list = _ids(ids, f"extra['dropped'][{r}]")
        strangers = sorted(set(id_list) - joined)
        if strangers:
            raise ValueError(f"{where}: round {r} drops {strangers[:3]!r}, who did not join the span")
        out[r] = sorted(set(out.get(r, [])) | set(id_list))
    return {str(r): out[r] for r in sorted(out) if out[r]}


def _ids(values: Iterable[str], name: str) -> list[str]:
    ids = list(values)
    bad = [v for v in ids if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(f"{name} must list device ids as non-empty strings, got {bad[:3]!r}")
    return ids


def _budget_arg(epsilon_budget: float | None, delta: float | None, accountant: str,
                unit: str = EXAMPLE) -> Budget | None:
    if epsilon_budget is None and delta is None:
        return None
    if epsilon_budget is None or delta is None:
        raise ValueError("give both epsilon_budget and delta, or neither")
    validate_budget(epsilon_budget, delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    return Budget(float(epsilon_budget), float(delta), accountant, unit)


# ----------------------------------------------------------------------------- for the engines
def open_device_ledgers(run_dir: Path | str, device_ids: Iterable[str], policy: DevicePolicy,
                        layout: str = FILES) -> tuple[list[DeviceLedger], LedgerStore | None]:
    """Every device's ledger of a simulated run, in ``layout`` (``files``: ``<run>/devices/<id>/``, the
    default; ``sqlite``: the run's :class:`~fed_nessa.privacy.store.LedgerStore`, one transaction for all).

    Returns the ledgers and the store (None for files): wrap each pass of reserves (and of completes)
    in :func:`ledger_batch` so the store makes it durable with one fsync before the mechanisms run.
    """
    run_dir = Path(run_dir)
    if layout not in LAYOUTS:
        raise ValueError(f"ledger layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == FILES:
        return [DeviceLedger.open(run_dir / DEVICE_KEYS / dev, dev, policy=policy,
                                  key_folder=device_key_folder(run_dir, dev)) for dev in device_ids], None
    store = LedgerStore.open(run_dir, key_store(run_dir) / DEVICE_KEYS)
    with store.batch():
        ledgers = [DeviceLedger.open(run_dir / DEVICE_KEYS / dev, dev, policy=policy, store=store)
                   for dev in device_ids]
    return ledgers, store


def ledger_batch(store: LedgerStore | None) -> AbstractContextManager[None]:
    """One durable transaction for a pass of appends in a ledger store; nothing to batch for files
    (each line is fsynced as it is written)."""
    return store.batch() if store is not None else nullcontext()
