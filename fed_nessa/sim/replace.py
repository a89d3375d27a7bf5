"""``--replace``: remove an earlier run only when it provably is one, and nothing else.

A run folder is this tool's own when its federation ledger verifies (signed, hash-chained,
against the public key beside it) and every file and folder in it is one a run (or
``fed-nessa audit`` on it) writes. Its key store ``<run-dir>.keys/`` is removed with it when it
has exactly a key store's layout and its server key is the one that signed the ledger. Anything
else (a user's file, a folder named ``checkpoints/`` that holds notes, a key store with files it
never wrote) refuses the whole replacement, with one line naming it, before anything is removed.
A store named by ``$FED_NESSA_KEY_STORE`` is the user's and is never removed.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fed_nessa.data.population import EVAL_FILE, VALIDATION_FILE
from fed_nessa.data.shards import SHARD_SUFFIX
from fed_nessa.evaluation.run_folder import EER_PLOT, EPSILON_PLOT, REPORT_FILE, SUMMARY_FILE
from fed_nessa.federated.protocol import DEVICES_DIR, SHARDS_DIR
from fed_nessa.model.artifacts import CARD_FILE, ONNX_FILE, WEIGHTS_FILE
from fed_nessa.privacy import signing
from fed_nessa.privacy.chain import read_chain
from fed_nessa.privacy.ledger import (
    DEVICE_ID_PATTERN,
    DEVICE_KEY_NAME,
    DEVICE_KEYS,
    DEVICE_LEDGER_NAME,
    DEVICE_PUB_NAME,
    FEDERATION_LEDGER_NAME,
    KEY_STORE_ENV,
    SERVER_KEY_NAME,
    SERVER_KEYS,
    SERVER_PUB_NAME,
    default_key_store,
    device_id_problem,
)
from fed_nessa.privacy.store import SEED_NAME, STORE_NAME

#: The server's checkpoint folder (named in ``server/checkpoint.py``, which the library never imports).
CHECKPOINT_DIR = "checkpoints"
#: What ``fed-nessa audit RUN`` writes into the run folder by default.
AUDIT_DIR = "audit"
_AUDIT_FILES = frozenset({"audit.json", REPORT_FILE, "epsilon-distribution.png", "epsilon-per-round.png"})
_TORN = re.compile(r"\.torn-\d+$")  # a ledger's torn tail set aside on reopen
_CHECKPOINT = re.compile(r"round-\d{5}\.pt")
_SHARD = re.compile(DEVICE_ID_PATTERN.pattern + re.escape(SHARD_SUFFIX))  # a synthetic run's device shards
_SHARD_FILES = frozenset({EVAL_FILE, VALIDATION_FILE, "manifest.json"})


class ReplaceError(ValueError):
    """``--replace`` cannot prove the folder is a run of its own: nothing was removed."""


@dataclass(frozen=True)
class Replacement:
    """What ``--replace`` removes once every input is checked: the run folder and (maybe) its key store."""

    run_dir: Path
    key_store: Path | None

    def apply(self) -> None:
        shutil.rmtree(self.run_dir)
        if self.key_store is not None:
            shutil.rmtree(self.key_store)


def _ledger_file(name: str, base: str) -> bool:
    """``name`` is the ledger file ``base`` or a torn tail of it that a reopen set aside."""
    return name == base or (name.startswith(base) and bool(_TORN.fullmatch(name[len(base):])))


def _only(folder: Path, allowed: frozenset[str] | None = None, pattern: re.Pattern[str] | None = None,
          ledger: str | None = None) -> str | None:
    """The first entry of ``folder`` that is not one of its expected plain files (None: all expected)."""
    for entry in sorted(folder.iterdir()):
        ok = entry.is_file() and not entry.is_symlink() and (
            (allowed is not None and entry.name in allowed)
            or (pattern is not None and bool(pattern.fullmatch(entry.name)))
            or (ledger is not None and _ledger_file(entry.name, ledger)))
        if not ok:
            return str(entry)
    return None


def _per_device_stray(folder: Path, allowed: frozenset[str], ledger: str | None = None) -> str | None:
    """The first entry of a ``devices/`` folder that is not a safe ``<id>/`` folder of the expected files."""
    for dev in sorted(folder.iterdir()):
        if not dev.is_dir() or dev.is_symlink() or device_id_problem(dev.name):
            return str(dev)
        stray = _only(dev, allowed, ledger=ledger)
        if stray:
            return stray
    return None


#: Each subfolder a run writes, and how to tell that what is in it is the run's.
_SUBFOLDERS = {
    DEVICES_DIR: lambda f: _per_device_stray(f, frozenset({DEVICE_PUB_NAME}), ledger=DEVICE_LEDGER_NAME),
    CHECKPOINT_DIR: lambda f: _only(f, pattern=_CHECKPOINT),
    "aligner": lambda f: _only(f, frozenset({CARD_FILE, WEIGHTS_FILE, ONNX_FILE})),
    SHARDS_DIR: lambda f: _only(f, _SHARD_FILES, pattern=_SHARD),
    AUDIT_DIR: lambda f: _only(f, _AUDIT_FILES),
}
_RUN_FILES = frozenset({SUMMARY_FILE, REPORT_FILE, SERVER_PUB_NAME, EER_PLOT, EPSILON_PLOT,
                        *(STORE_NAME + suffix for suffix in ("", "-wal", "-shm"))})  # the fleet's ledger store


def _run_stray(run_dir: Path) -> str | None:
    """The first entry of ``run_dir`` that no run writes (None: every entry is a run's)."""
    for entry in sorted(run_dir.iterdir()):
        if entry.name in _SUBFOLDERS and entry.is_dir() and not entry.is_symlink():
            stray = _SUBFOLDERS[entry.name](entry)
        elif entry.is_file() and not entry.is_symlink() and (
                entry.name in _RUN_FILES or _ledger_file(entry.name, FEDERATION_LEDGER_NAME)):
            stray = None
        else:
            stray = str(entry)
        if stray:
            return stray
    return None


def _verified_ledger(run_dir: Path) -> str | None:
    """Why the run folder's federation ledger does not prove it is a run (None: it verifies)."""
    ledger, pub = run_dir / FEDERATION_LEDGER_NAME, run_dir / SERVER_PUB_NAME
    if not ledger.is_file() or not pub.is_file():
        return f"no signed federation ledger ({FEDERATION_LEDGER_NAME} and {SERVER_PUB_NAME})"
    try:
        read = read_chain(ledger, signing.load_public_key(pub))
    except (OSError, ValueError) as exc:
        return f"its federation ledger cannot be read ({exc})"
    if not read.ok:
        return f"its federation ledger does not verify ({read.faults[0].message()})"
    if read.entries[0].get("payload", {}).get("role") != "server":
        return "its federation ledger is not a server's"
    return None


def _store_stray(store: Path) -> str | None:
    """The first entry of a key store that its layout (``server/``, ``devices/<id>/``) does not hold."""
    for entry in sorted(store.iterdir()):
        if entry.name == SERVER_KEYS and entry.is_dir() and not entry.is_symlink():
            stray = _only(entry, frozenset({SERVER_KEY_NAME, SERVER_PUB_NAME}))
        elif entry.name == DEVICE_KEYS and entry.is_dir() and not entry.is_symlink():
            seed = entry / SEED_NAME  # the ledger store's device-key seed (ledger-layout = sqlite)
            if seed.is_file() and not seed.is_symlink():
                stray = _only(entry, frozenset({SEED_NAME}))
            else:
                stray = _per_device_stray(entry, frozenset({DEVICE_KEY_NAME}))
        else:
            stray = str(entry)
        if stray:
            return stray
    return None


def _own_store(run_dir: Path) -> Path | None:
    """The run's default key store if there is one; raises if it holds anything a store does not."""
    if os.environ.get(KEY_STORE_ENV, "").strip():
        return None  # a store the user named is the user's
    store = default_key_store(run_dir)
    if not store.exists():
        return None
    stray = _store_stray(store) if store.is_dir() and not store.is_symlink() else str(store)
    if stray:
        raise ReplaceError(f"--replace: key store {store} holds {stray}, which a run does not write; nothing "
                           "removed (remove it yourself, or choose another --run-dir)")
    mine, theirs = store / SERVER_KEYS / SERVER_PUB_NAME, run_dir / SERVER_PUB_NAME
    if mine.is_file() and mine.read_bytes() != theirs.read_bytes():
        raise ReplaceError(f"--replace: key store {store} holds another server key than the one that signed "
                           f"{run_dir / FEDERATION_LEDGER_NAME}; nothing removed")
    return store


def plan_replacement(run_dir: Path) -> Replacement:
    """What ``--replace`` will remove for the earlier run in ``run_dir``; raises :class:`ReplaceError`
    (removing nothing) unless it is provably a run of this tool's and its store its own."""
    why = _verified_ledger(run_dir)
    if why:
        raise ReplaceError(f"--replace: run-dir {run_dir}: {why}, so it is not provably a run of fed-nessa; "
                           "nothing removed")
    stray = _run_stray(run_dir)
    if stray:
        raise ReplaceError(f"--replace: run-dir {run_dir} holds {stray}, which a run does not write; nothing "
                           "removed (move it out, or choose another --run-dir)")
    return Replacement(run_dir, _own_store(run_dir))
