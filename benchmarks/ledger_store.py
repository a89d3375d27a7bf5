"""A synthetic fleet's ledgers in either layout (files or the SQLite ledger store), then its audit, timed.

Each device: a header, one DP-SGD span reservation over ``--rounds`` rounds (pinning the server key)
and its completion (epsilon after, the chain of models received); the federation ledger: one span
entry listing every device with its ledger head, key fingerprint, the per-round model hashes and
the public parameters, then the signed end record, and a ``summary.json`` naming the layout.
Every device runs the same schedule, so the audit composes one history (memo) and the time is
chain reading, hashing and signature checks. Reports seconds for keys + signing (write) and for
``audit`` (with ``--workers`` processes), and peak RSS.

    python benchmarks/ledger_store.py --devices 10000 --layout sqlite --workers 2 --out r.json
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from fed_nessa.config import DevicePolicy
from fed_nessa.privacy.audit.verify import audit
from fed_nessa.privacy.events import DP_SGD, OS_CSPRNG, DPEvent
from fed_nessa.privacy.ledger import (
    CHAIN_SCHEME,
    FEDERATION_LEDGER_NAME,
    LEDGER_HEADS,
    PUBLIC_PARAMETERS,
    FederationLedger,
    ledger_batch,
    open_device_ledgers,
    received_chain,
    server_key_folder,
)
from fed_nessa.privacy.store import FILES, LAYOUTS, SQLITE

DELTA, BUDGET = 1e-5, 8.0
SAMPLE_RATE, SIGMA, CLIP = 0.02, 1.5, 1.0


def _event(rounds: int) -> DPEvent:
    return DPEvent(round=1, last_round=rounds, mechanism=DP_SGD, steps=rounds, sample_rate=SAMPLE_RATE,
                   noise_multiplier=SIGMA, clip_norm=CLIP, delta=DELTA, mode="local", note="synthetic span",
                   noise_source=OS_CSPRNG)


def build_run(run_dir: Path, n_devices: int, layout: str = FILES, rounds: int = 10) -> dict[str, float]:
    """Write the synthetic run; returns seconds for the device ledgers and for the federation ledger."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ids = [f"d{j:07d}" for j in range(n_devices)]
    policy = DevicePolicy(epsilon_budget=BUDGET, delta=DELTA)
    fed = FederationLedger.open(run_dir / FEDERATION_LEDGER_NAME, server_key_folder(run_dir))
    sent = {r: (f"{r:064x}", f"{r + 1000:064x}") for r in range(1, rounds + 1)}
    chain = {"scheme": CHAIN_SCHEME, "rounds": [[1, rounds]],
             "chain": received_chain((r, *sent[r]) for r in range(1, rounds + 1))}
    started = time.perf_counter()
    ledgers, store = open_device_ledgers(run_dir, ids, policy, layout)
    event, eps = _event(rounds), None
    with ledger_batch(store):  # one durable transaction before any mechanism would run
        seqs = [led.reserve(event, {"server_key_fingerprint": fed.key_fingerprint}) for led in ledgers]
    with ledger_batch(store):
        for led, seq in zip(ledgers, seqs, strict=True):
            eps = eps if eps is not None else float(led.epsilon(DELTA))  # one history: composed once
            led.complete(seq, eps, received=chain)
    devices_s = time.perf_counter() - started
    started = time.perf_counter()
    params = {"sample_rate": SAMPLE_RATE, "noise_multiplier": SIGMA, "clip_norm": CLIP, "unit": "example",
              "mechanism": DP_SGD, "mode": "local"}
    fed.record_span(1, rounds, ids, [], [], {
        "models": {str(r): list(sent[r]) for r in sent}, "model_chain_scheme": CHAIN_SCHEME,
        "model_chain": chain["chain"], "device_key_fingerprints": {led.device_id: led.key_fingerprint
                                                                   for led in ledgers},
        LEDGER_HEADS: {led.device_id: list(led.head()) for led in ledgers}, PUBLIC_PARAMETERS: params})
    fed.record_end()
    summary: dict[str, Any] = {"privacy": {"ledger_layout": layout, "num_device_ledgers": n_devices}}
    if layout == FILES:
        summary["privacy"]["device_ledger_pattern"] = "devices/{device_id}/privacy-ledger.jsonl"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if store is not None:
        store.close()
    return {"devices_s": round(devices_s, 2), "federation_s": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--layout", choices=LAYOUTS, default=SQLITE)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the run (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp())
    run = base / f"run-{args.layout}-{args.devices}"
    times = build_run(run, args.devices, args.layout, args.rounds)
    started = time.perf_counter()
    result = audit(run, write=False, workers=args.workers)
    audit_s = time.perf_counter() - started
    result.performance.get("ledger_store", {}).pop("path", None)  # a path of this machine
    fails = [f.check for f in result.findings if f.severity == "fail"]
    row = {"devices": args.devices, "layout": args.layout, "rounds": args.rounds, "workers": args.workers,
           **times, "audit_s": round(audit_s, 2), "verdict": "FAIL" if fails else "PASS", "fails": sorted(set(fails)),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "workers_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
           "performance": result.performance}
    print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
