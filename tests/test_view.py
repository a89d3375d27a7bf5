"""``fed-nessa view``: what the page reads and shows, escaping, and that nothing outside the run folder is served."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from fed_nessa.privacy.store import STORE_NAME, LedgerStore
from fed_nessa.view import run_state
from fed_nessa.view.app import create_app, inside
from fed_nessa.view.run_state import DeviceLedgers, federation_rounds, read_run, spend_summary, store_connection

#: A device id and a note a hostile device or ledger might hold.
HOSTILE_ID = '<img src=x onerror="document.title=\'pwned\'">'
HOSTILE_NOTE = "<script>document.title='pwned'</script>"
REPO = Path(__file__).resolve().parents[1]


def _hostile_ledger() -> list[str]:
    """A device ledger's lines (unsigned) whose device id and note hold markup."""
    event = {"round": 1, "mechanism": "gaussian-sum", "steps": 1, "sample_rate": 1.0, "noise_multiplier": 1.0,
             "clip_norm": 1.0, "delta": 1e-5, "mode": "distributed", "note": HOSTILE_NOTE}
    lines = [{"kind": "header", "payload": {"device_id": HOSTILE_ID, "budget": {"epsilon": 8.0, "delta": 1e-5}}},
             {"kind": "reserve", "payload": {"event": event, "new_field": [1, 2]}}]
    return [json.dumps(x) for x in lines]


def hostile_run(run: Path) -> Path:
    """A run folder (as an engine writes it, unsigned) whose device id and notes hold markup."""
    (run / "devices" / HOSTILE_ID).mkdir(parents=True)
    (run / "devices" / HOSTILE_ID / "privacy-ledger.jsonl").write_text("\n".join(_hostile_ledger()) + "\n")
    rounds = [{"round": 1, "phase": "suffstats", "status": "refused", "note": HOSTILE_NOTE, "eer": 0.2,
               "participants": 1, "declined": 1, "failed": 0, "epsilon_max": 4.7, "seconds": 0.5}]
    (run / "summary.json").write_text(json.dumps({"config": {"num-server-rounds": 3}, "rounds": rounds,
                                                  "final": None, "engine": {"name": "fleet", "devices": 2}}))
    fed = {"kind": "round", "payload": {"round": 1, "joined": [HOSTILE_ID], "declined": ["d2"], "failed": [],
                                        "extra": {"guaranteed_arrivals": 2, "decline_reasons": {HOSTILE_NOTE: 1}}}}
    (run / "federation-ledger.jsonl").write_text(json.dumps({"kind": "header", "payload": {}}) + "\n"
                                                 + json.dumps(fed) + "\n" + '{"kind": "round", "payl')  # torn line
    return run


def test_the_page_shows_markup_from_ledgers_as_text(tmp_path: Path) -> None:
    client = TestClient(create_app(hostile_run(tmp_path / "run")))
    for url in ("/", "/fragment"):
        page = client.get(url).text
        assert HOSTILE_ID not in page and HOSTILE_NOTE not in page
        assert "&lt;img src=x onerror=&quot;document.title=&#x27;pwned&#x27;&quot;&gt;" in page
        assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    assert "script-src 'nonce-" in client.get("/").headers["content-security-policy"]


def test_the_state_is_read_defensively(tmp_path: Path) -> None:
    """A torn ledger line, unknown fields, a live run without ``final``: read, not an error."""
    run = hostile_run(tmp_path / "run")
    state = read_run(run, DeviceLedgers())
    assert not state.finished and len(state.rounds) == 1
    assert state.ledger_rounds[1]["guaranteed_arrivals"] == 2 and state.declines[HOSTILE_NOTE] == 1
    assert [d.device for d in state.devices] == [HOSTILE_ID] and state.devices[0].budget == 8.0
    assert 0 < state.devices[0].epsilon < 8
    (run / "summary.json").write_text('{"rounds": [')  # half-written (a writer that is not atomic)
    state = read_run(run, DeviceLedgers())
    assert state.rounds == [] and any("summary.json" in n for n in state.notes)
    assert read_run(tmp_path / "absent", DeviceLedgers()).rounds == []
    assert federation_rounds(tmp_path / "absent.jsonl") == ({}, {})
    span = {"kind": "span", "payload": {"first_round": 2, "last_round": 4, "joined": ["a", "b"], "declined": [],
                                        "failed": [], "extra": {"guaranteed_arrivals": 2}}}
    (run / "federation-ledger.jsonl").write_text(json.dumps(span) + "\n")
    rounds, _ = federation_rounds(run / "federation-ledger.jsonl")
    assert sorted(rounds) == [2, 3, 4] and rounds[3]["guaranteed_arrivals"] == 2 and rounds[3]["joined"] == 2


def test_nothing_outside_the_run_folder_is_served(tmp_path: Path) -> None:
    run = hostile_run(tmp_path / "run")
    (tmp_path / "secret.json").write_text("{}")
    (run / "link.json").symlink_to(tmp_path / "secret.json")
    (run / "key.pem.bak").write_text("x")
    assert inside(run, "summary.json") == (run / "summary.json").resolve()
    for bad in ("../secret.json", "/etc/passwd", "link.json", "key.pem.bak", "devices", "", "."):
        assert inside(run, bad) is None, bad
    client = TestClient(create_app(run))
    assert client.get("/file/summary.json").status_code == 200
    assert client.get("/file/%2e%2e/secret.json").status_code == 404
    assert client.get("/chart/../../secret.svg").status_code == 404
    assert client.post("/").status_code == 405  # read-only


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """``fed-nessa view`` on a hostile run folder, in its own process; (host, port)."""
    run = hostile_run(tmp_path / "run")
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "fed_nessa.cli", "view", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "http://127.0.0.1:" in line, line  # the default binds this machine only
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _raw_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side normalisation of ``..``)."""
    for _ in range(100):
        try:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except ConnectionRefusedError:
            time.sleep(0.1)
    raise AssertionError("the viewer did not answer")


@pytest.mark.slow
def test_path_traversal_is_refused_over_http(served: tuple[str, int]) -> None:
    host, port = served
    assert _raw_get(host, port, "/file/summary.json")[0] == 200
    for path in ("/file/../secret.json", "/file/%2e%2e/secret.json", "/file/..%2fsecret.json",
                 "/file/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/../secret.json", "/file//etc/passwd"):
        status, body = _raw_get(host, port, path)
        assert status in (400, 404) and b"secret" not in body, (path, status)


@pytest.mark.parametrize(("args", "fault"), [(["--port", "70000"], "--port 70000: allowed range [0, 65535]"),
                                             ([], "not a folder")])
def test_view_refuses_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                            fault: str) -> None:
    from fed_nessa.cli import main

    target = tmp_path / "run"
    if not args:
        target.write_text("not a run folder")
    else:
        target.mkdir()
    assert main(["view", str(target), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fault in err[0] and err[0].startswith("fed-nessa view: error:")


@pytest.fixture(scope="module")
def fleet_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same small fleet run (the smoke config, 2 rounds), its device ledgers as files and in the store."""
    from fed_nessa.sim.fleet import run_fleet
    from fed_nessa.sim.runner import build_config, build_policy, fleet_overrides

    runs = {}
    for layout in ("files", "sqlite"):
        run = tmp_path_factory.mktemp("fleet") / layout
        overrides, device = fleet_overrides("smoke", ["num-server-rounds=2", f'run-dir="{run}"',
                                                      f'ledger-layout="{layout}"'], [])
        run_fleet(build_config("smoke", overrides), build_policy("smoke", device))
        runs[layout] = run
    return runs


def test_the_view_reads_the_ledger_store_as_it_reads_files(fleet_runs: dict[str, Path]) -> None:
    """A fleet run with ledger-layout = sqlite shows the same devices, epsilons and declines as with files."""
    assert (fleet_runs["sqlite"] / STORE_NAME).is_file() and not (fleet_runs["sqlite"] / "devices").exists()
    files, store = (read_run(fleet_runs[k], DeviceLedgers()) for k in ("files", "sqlite"))
    assert store.devices_total == files.devices_total == len(files.devices) > 0
    def spending(state: run_state.RunState) -> list[tuple[str, float, int, int]]:
        return sorted((d.device, d.epsilon, d.reserved, d.completed) for d in state.devices)
    assert spending(store) == spending(files) and store.declines == files.declines and not store.notes
    assert spend_summary(store.devices, store.devices_total) == spend_summary(files.devices, files.devices_total)
    assert max(d.epsilon for d in store.devices) > 0
    assert "spent epsilon over devices" in TestClient(create_app(fleet_runs["sqlite"])).get("/").text


def test_a_large_store_is_sampled_and_the_page_says_so(fleet_runs: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Above STORE_SAMPLE devices the view reads an even sample and counts all devices in SQL."""
    full = read_run(fleet_runs["sqlite"], DeviceLedgers())
    monkeypatch.setattr(run_state, "STORE_SAMPLE", 5)
    state = read_run(fleet_runs["sqlite"], DeviceLedgers())
    assert len(state.devices) == 5 and state.devices_total == full.devices_total
    by_id = {d.device: d for d in full.devices}
    assert all(by_id[d.device] == d for d in state.devices)  # the sample's figures are the devices' own
    ids = sorted(by_id)
    assert ids[0] in {d.device for d in state.devices} and ids[-1] in {d.device for d in state.devices}
    summary = spend_summary(state.devices, state.devices_total)
    assert summary["devices"] == full.devices_total and summary["devices read (an even sample)"] == 5
    page = TestClient(create_app(fleet_runs["sqlite"])).get("/").text
    assert f"an even sample of 5 of the {full.devices_total} devices in the ledger store" in page


def _hostile_store(run: Path, keys: Path) -> LedgerStore:
    store = LedgerStore.open(run, keys)
    num = store.register(HOSTILE_ID, store.device_key(HOSTILE_ID))
    append = store.sink(num)
    for seq, line in enumerate(_hostile_ledger()):
        append(seq, line.encode("ascii") + b"\n")
    return store


def test_a_device_id_holding_markup_in_the_store_is_shown_as_text(tmp_path: Path) -> None:
    _hostile_store(tmp_path / "run", tmp_path / "keys").close()
    state = read_run(tmp_path / "run", DeviceLedgers())
    assert [d.device for d in state.devices] == [HOSTILE_ID] and 0 < state.devices[0].epsilon < 8
    page = TestClient(create_app(tmp_path / "run")).get("/").text
    assert HOSTILE_ID not in page and HOSTILE_NOTE not in page
    assert "&lt;img src=x onerror=&quot;document.title=&#x27;pwned&#x27;&quot;&gt;" in page


def _folder(run: Path) -> dict[str, str]:
    """Each file's hash; of SQLite's -shm (the shared-memory index where every WAL reader marks what it
    reads, not evidence) only that it exists."""
    return {p.name: "" if p.name.endswith("-shm") else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in run.iterdir() if p.is_file()}


@pytest.mark.parametrize("live", [True, False])
def test_the_view_never_writes_the_store(tmp_path: Path, live: bool) -> None:
    """Opened read-only, live (a writer holds the store: a WAL reader) or finished (immutable: no -wal/-shm
    files left beside it); a write through the view's connection fails; the store, its WAL and the
    folder's file list are unchanged."""
    run = tmp_path / "run"
    writer = _hostile_store(run, tmp_path / "keys")
    if not live:
        writer.close()
    try:
        before = _folder(run)
        client = TestClient(create_app(run))
        assert client.get("/").status_code == 200 and client.get("/chart/epsilon.svg").status_code == 200
        conn = store_connection(run / STORE_NAME)
        try:
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                conn.execute("INSERT INTO devices (device_id, public_key_pem) VALUES ('x', 'y')")
        finally:
            conn.close()
        assert _folder(run) == before
    finally:
        writer.close()
