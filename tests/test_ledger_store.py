"""The SQLite ledger store: same chains, same audit, as the file-per-device layout (issue 21)."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from fed_nessa.config import DevicePolicy
from fed_nessa.privacy.audit.verify import audit
from fed_nessa.privacy.chain import LedgerError, read_chain_bytes
from fed_nessa.privacy.events import DP_SGD, OS_CSPRNG, DPEvent
from fed_nessa.privacy.ledger import DEVICE_KEYS, DeviceLedger, key_store, open_device_ledgers
from fed_nessa.privacy.store import FILES, SEED_NAME, SQLITE, STORE_NAME, LedgerStore

# The builder is a benchmark script (benchmarks/ is not a package): loaded by its path.
_spec = importlib.util.spec_from_file_location("bench_ledger_store", Path(__file__).parents[1] / "benchmarks"
                                               / "ledger_store.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
DELTA, build_run = bench.DELTA, bench.build_run
DEVICES = 6
VICTIM = "d0000001"
Lines = list[bytes]


def _event(r: int) -> DPEvent:
    return DPEvent(round=r, mechanism=DP_SGD, steps=1, sample_rate=0.1, noise_multiplier=1.2, clip_norm=1.0,
                   delta=DELTA, mode="local", noise_source=OS_CSPRNG)


def _store(tmp_path: Path) -> LedgerStore:
    run = tmp_path / "run"
    return LedgerStore.open(run, key_store(run) / DEVICE_KEYS)


def test_a_store_backed_ledger_round_trips_and_its_chain_verifies(tmp_path: Path) -> None:
    store = _store(tmp_path)
    led = DeviceLedger.open(tmp_path, "dev-1", policy=DevicePolicy(), store=store)
    with store.batch():
        seq = led.reserve(_event(1))
    led.complete(seq, led.epsilon(DELTA))
    store.close()
    again_store = _store(tmp_path)
    again = DeviceLedger.open(tmp_path, "dev-1", policy=DevicePolicy(), store=again_store)
    assert again.entries() == led.entries() and again.head() == led.head()
    assert again.events() == [_event(1)] and again.pending() == []
    assert again.epsilon(DELTA) == pytest.approx(led.epsilon(DELTA))
    assert again.key_fingerprint == led.key_fingerprint  # the same key, derived again from the seed
    read = read_chain_bytes(again.path, again_store.lines(1), again_store.device_key("dev-1").public_key())
    assert read.ok and len(read.entries) == 3


def test_the_seed_stays_outside_the_run_folder_and_a_lost_seed_refuses_to_extend(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ledgers, store = open_device_ledgers(run, ["a", "b"], DevicePolicy(), SQLITE)
    assert store is not None and ledgers[0].key_fingerprint != ledgers[1].key_fingerprint
    store.close()
    seed = key_store(run) / DEVICE_KEYS / SEED_NAME
    assert seed.is_file() and run not in seed.parents and not list(run.rglob(SEED_NAME))
    seed.unlink()
    with pytest.raises(LedgerError, match="seed is missing"):
        open_device_ledgers(run, ["a"], DevicePolicy(), SQLITE)


# ----------------------------------------------------------------------------- the audit, both layouts
def _files_io(run: Path) -> tuple[Callable[[], Lines], Callable[[Lines], None]]:
    path = run / "devices" / VICTIM / "privacy-ledger.jsonl"
    return (lambda: path.read_bytes().splitlines(keepends=True)), (lambda lines: path.write_bytes(b"".join(lines)))


def _store_io(run: Path) -> tuple[Callable[[], Lines], Callable[[Lines], None]]:
    def get() -> Lines:
        with sqlite3.connect(run / STORE_NAME) as conn:
            num = conn.execute("SELECT num FROM devices WHERE device_id = ?", (VICTIM,)).fetchone()[0]
            return [e.encode() + b"\n" for (e,) in conn.execute(
                "SELECT entry FROM entries WHERE num = ? ORDER BY rowid", (num,))]

    def put(lines: Lines) -> None:  # the rows rewritten in the given order (rowid order is append order)
        with sqlite3.connect(run / STORE_NAME) as conn:
            num = conn.execute("SELECT num FROM devices WHERE device_id = ?", (VICTIM,)).fetchone()[0]
            conn.execute("DELETE FROM entries WHERE num = ?", (num,))
            conn.executemany("INSERT INTO entries (num, seq, entry) VALUES (?, ?, ?)",
                             [(num, 100 + i, line.rstrip(b"\n").decode()) for i, line in enumerate(lines)])
    return get, put


def _cut(lines: Lines) -> Lines:
    return lines[:-1]


def _edit(lines: Lines) -> Lines:
    return lines[:-1] + [lines[-1].replace(b'"epsilon_after":', b'"epsilon_after":0.0001,"x":')]


def _reorder(lines: Lines) -> Lines:
    return [lines[0], lines[2], lines[1]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout in (FILES, SQLITE):
        build_run(base / layout, DEVICES, layout, rounds=3)
        out[layout] = base / layout
    return out


def _fails(result) -> set[tuple[str, str | None, int | None]]:
    return {(f.check, f.device, f.seq) for f in result.findings if f.severity == "fail"}


def test_a_store_and_the_file_layout_of_the_same_events_give_the_same_verdict_and_epsilons(
        runs: dict[str, Path]) -> None:
    files, store = (audit(runs[layout], write=False, workers=1) for layout in (FILES, SQLITE))
    assert files.passed and store.passed
    assert {d.device_id: d.epsilon for d in files.devices} == {d.device_id: d.epsilon for d in store.devices}
    assert len(store.devices) == DEVICES and store.performance["ledger_store"]["devices"] == DEVICES
    assert store.devices[0].events is store.devices[1].events  # one copy per distinct history (memory at 10^6)


@pytest.mark.parametrize("tamper", [_cut, _edit, _reorder])
def test_a_cut_edited_or_reordered_entry_fails_the_audit_with_the_same_findings(
        runs: dict[str, Path], tmp_path: Path, tamper: Callable[[Lines], Lines]) -> None:
    found = {}
    for layout, io in ((FILES, _files_io), (SQLITE, _store_io)):
        run = tmp_path / layout
        subprocess.run(["cp", "-r", str(runs[layout]), str(run)], check=True)
        get, put = io(run)
        put(tamper(get()))
        found[layout] = _fails(audit(run, write=False, workers=2))
    assert found[FILES] and found[FILES] == found[SQLITE]


def test_the_summarys_count_of_ledgers_is_checked_against_the_store(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(runs[SQLITE]), str(run)], check=True)
    summary = json.loads((run / "summary.json").read_text())
    summary["privacy"]["num_device_ledgers"] = DEVICES + 1
    (run / "summary.json").write_text(json.dumps(summary))
    assert ("evidence.missing_file", None, None) in _fails(audit(run, write=False, workers=1))


# ----------------------------------------------------------------------------- crashes
def test_a_batch_torn_by_a_crash_leaves_no_reservation_and_the_ledger_continues(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ledgers, store = open_device_ledgers(run, ["a", "b"], DevicePolicy(), SQLITE)
    assert store is not None
    store.close()
    crash = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from fed_nessa.config import DevicePolicy
        from fed_nessa.privacy.ledger import open_device_ledgers
        from fed_nessa.privacy.events import DPEvent
        ledgers, store = open_device_ledgers(Path({str(run)!r}), ["a", "b"], DevicePolicy(), "sqlite")
        ev = DPEvent.from_dict({_event(1).to_dict()!r})
        with store.batch():
            ledgers[0].reserve(ev)
            os._exit(3)  # killed mid-batch: before the commit
        """)
    assert subprocess.run([sys.executable, "-c", crash], check=False).returncode == 3
    again, store = open_device_ledgers(run, ["a", "b"], DevicePolicy(), SQLITE)
    assert store is not None and [len(led.entries()) for led in again] == [1, 1]
    with store.batch():
        seq = again[0].reserve(_event(1))
    assert seq == 1


def test_a_truncated_entry_in_the_store_is_a_parse_fault_and_is_never_extended(runs: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(runs[SQLITE]), str(run)], check=True)
    subprocess.run(["cp", "-r", str(key_store(runs[SQLITE])), str(key_store(run))], check=True)
    get, put = _store_io(run)
    lines = get()
    put(lines[:-1] + [lines[-1][: len(lines[-1]) // 2]])
    assert ("chain.parse", VICTIM, None) in _fails(audit(run, write=False, workers=1))
    with pytest.raises(LedgerError, match="fails verification"):
        open_device_ledgers(run, [VICTIM], DevicePolicy(), SQLITE)


def test_the_run_summary_names_the_layout_and_where_the_ledgers_are() -> None:
    from fed_nessa.config import FederationConfig
    from fed_nessa.evaluation.run_folder import privacy_block

    store = privacy_block(FederationConfig(), {"a": 1.0}, 1, ledger_layout=SQLITE)
    assert store["ledger_layout"] == SQLITE and store["ledger_store"] == STORE_NAME
    assert "device_ledger_pattern" not in store
    files = privacy_block(FederationConfig(), {"a": 1.0}, 1)
    assert files["ledger_layout"] == FILES and "device_ledger_pattern" in files
