"""``fed-nessa view``: what the page reads and shows, escaping, and that nothing outside the run folder is served."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from fed_nessa.view.app import create_app, inside
from fed_nessa.view.run_state import DeviceLedgers, federation_rounds, read_run

#: A device id and a note a hostile device or ledger might hold.
HOSTILE_ID = '<img src=x onerror="document.title=\'pwned\'">'
HOSTILE_NOTE = "<script>document.title='pwned'</script>"
REPO = Path(__file__).resolve().parents[1]


def hostile_run(run: Path) -> Path:
    """A run folder (as an engine writes it, unsigned) whose device id and notes hold markup."""
    (run / "devices" / HOSTILE_ID).mkdir(parents=True)
    event = {"round": 1, "mechanism": "gaussian-sum", "steps": 1, "sample_rate": 1.0, "noise_multiplier": 1.0,
             "clip_norm": 1.0, "delta": 1e-5, "mode": "distributed", "note": HOSTILE_NOTE}
    lines = [{"kind": "header", "payload": {"device_id": HOSTILE_ID, "budget": {"epsilon": 8.0, "delta": 1e-5}}},
             {"kind": "reserve", "payload": {"event": event, "new_field": [1, 2]}}]
    (run / "devices" / HOSTILE_ID / "privacy-ledger.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
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
