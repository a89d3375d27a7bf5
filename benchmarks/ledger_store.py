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
import multiprocessing
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fed_nessa.config import DevicePolicy
from fed_nessa.privacy import signing
from fed_nessa.privacy.audit.verify import audit
from fed_nessa.privacy.events import DP_SGD, OS_CSPRNG, DPEvent
from fed_nessa.privacy.ledger import (
    CHAIN_SCHEME,
    DEVICE_KEYS,
    FEDERATION_LEDGER_NAME,
    KEY_STORE_ENV,
    LEDGER_HEADS,
    PUBLIC_PARAMETERS,
    FederationLedger,
    key_store,
    ledger_batch,
    open_device_ledgers,
    received_chain,
    server_key_folder,
)
from fed_nessa.privacy.store import (
    FILES,
    LAYOUTS,
    SQLITE,
    LedgerStore,
    derive_device_key,
    merge_parts,
)

DELTA, BUDGET = 1e-5, 8.0
SAMPLE_RATE, SIGMA, CLIP = 0.02, 1.5, 1.0


def _event(rounds: int) -> DPEvent:
    return DPEvent(round=1, last_round=rounds, mechanism=DP_SGD, steps=rounds, sample_rate=SAMPLE_RATE,
                   noise_multiplier=SIGMA, clip_norm=CLIP, delta=DELTA, mode="local", note="synthetic span",
                   noise_source=OS_CSPRNG)


def _write_devices(run_dir: Path, ids: list[str], layout: str, fed_fp: str, chain: dict[str, Any],
                   block: int = 10_000) -> dict[str, tuple[list[Any], str]]:
    """Write ``ids``' ledgers block by block (memory bounded by one block); returns each device's
    ``(head, key fingerprint)`` for the server's span entry."""
    policy = DevicePolicy(epsilon_budget=BUDGET, delta=DELTA)
    event, eps, out = _event(chain["rounds"][0][1]), None, {}
    for a in range(0, len(ids), block):
        ledgers, store = open_device_ledgers(run_dir, ids[a:a + block], policy, layout)
        with ledger_batch(store):  # one durable transaction before any mechanism would run
            seqs = [led.reserve(event, {"server_key_fingerprint": fed_fp}) for led in ledgers]
        with ledger_batch(store):
            for led, seq in zip(ledgers, seqs, strict=True):
                eps = eps if eps is not None else float(led.epsilon(DELTA))  # one history: composed once
                led.complete(seq, eps, received=chain)
        out.update({led.device_id: (list(led.head()), led.key_fingerprint) for led in ledgers})
        if store is not None:
            store.close()
    return out


def _write_part(job: tuple[Path, list[str], str, dict[str, Any]]) -> dict[str, tuple[list[Any], str]]:
    part, ids, fed_fp, chain = job
    return _write_devices(part, ids, SQLITE, fed_fp, chain)


def build_run(run_dir: Path, n_devices: int, layout: str = FILES, rounds: int = 10,
              build_workers: int = 1) -> dict[str, float]:
    """Write the synthetic run; returns seconds for the device ledgers and for the federation ledger.

    ``build_workers`` > 1 (store only; to build 10^6 devices in minutes): each worker writes a
    contiguous range of devices into its own store, with the run's seed, and the parts are merged.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    ids = [f"d{j:07d}" for j in range(n_devices)]
    fed = FederationLedger.open(run_dir / FEDERATION_LEDGER_NAME, server_key_folder(run_dir))
    sent = {r: (f"{r:064x}", f"{r + 1000:064x}") for r in range(1, rounds + 1)}
    chain = {"scheme": CHAIN_SCHEME, "rounds": [[1, rounds]],
             "chain": received_chain((r, *sent[r]) for r in range(1, rounds + 1))}
    started = time.perf_counter()
    if build_workers > 1 and layout == SQLITE:
        LedgerStore.open(run_dir, key_store(run_dir) / DEVICE_KEYS).close()  # the run's seed, first
        os.environ[KEY_STORE_ENV] = str(key_store(run_dir))  # every part signs with it
        size = -(-n_devices // build_workers)
        parts = [run_dir.parent / f"{run_dir.name}.part{k}" for k in range(build_workers)]
        jobs = [(parts[k], ids[k * size:(k + 1) * size], fed.key_fingerprint, chain) for k in range(build_workers)]
        with ProcessPoolExecutor(build_workers, mp_context=multiprocessing.get_context("fork")) as pool:
            heads = {d: v for part in pool.map(_write_part, jobs) for d, v in part.items()}
        del os.environ[KEY_STORE_ENV]
        merge_parts(run_dir, parts)
    else:
        heads = _write_devices(run_dir, ids, layout, fed.key_fingerprint, chain)
    devices_s = time.perf_counter() - started
    started = time.perf_counter()
    params = {"sample_rate": SAMPLE_RATE, "noise_multiplier": SIGMA, "clip_norm": CLIP, "unit": "example",
              "mechanism": DP_SGD, "mode": "local"}
    fed.record_span(1, rounds, ids, [], [], {
        "models": {str(r): list(sent[r]) for r in sent}, "model_chain_scheme": CHAIN_SCHEME,
        "model_chain": chain["chain"], "device_key_fingerprints": {d: fp for d, (_h, fp) in heads.items()},
        LEDGER_HEADS: {d: head for d, (head, _fp) in heads.items()}, PUBLIC_PARAMETERS: params})
    fed.record_end()
    summary: dict[str, Any] = {"privacy": {"ledger_layout": layout, "num_device_ledgers": n_devices}}
    if layout == FILES:
        summary["privacy"]["device_ledger_pattern"] = "devices/{device_id}/privacy-ledger.jsonl"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return {"devices_s": round(devices_s, 2), "federation_s": round(time.perf_counter() - started, 2)}


def time_keys(n: int = 2000) -> dict[str, float]:
    """Microseconds per device: a fresh Ed25519 key (+ its PEM files' bytes), a derived one, one signature
    of a typical entry, one verification."""
    seed, msg = os.urandom(32), b"x" * 700
    t0 = time.perf_counter()
    for _ in range(n):
        key = Ed25519PrivateKey.generate()
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        signing.public_key_pem(key.public_key())
    t1 = time.perf_counter()
    keys = [derive_device_key(seed, f"d{j:07d}") for j in range(n)]
    t2 = time.perf_counter()
    sigs = [key.sign(msg) for key in keys]
    t3 = time.perf_counter()
    for key, sig in zip(keys, sigs, strict=True):
        key.public_key().verify(sig, msg)
    t4 = time.perf_counter()
    return {"generate_pem_us": round((t1 - t0) / n * 1e6, 1), "derive_us": round((t2 - t1) / n * 1e6, 1),
            "sign_us": round((t3 - t2) / n * 1e6, 1), "verify_us": round((t4 - t3) / n * 1e6, 1)}


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the audit's workers): the machine is shared,
    so wall time alone overstates what 2 dedicated cores would take."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--layout", choices=LAYOUTS, default=SQLITE)
    parser.add_argument("--workers", type=int, default=2, help="audit processes")
    parser.add_argument("--build-workers", type=int, default=1, help="processes writing the store (parts merged)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the run (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp())
    run = base / f"run-{args.layout}-{args.devices}"
    keys = time_keys()
    times = build_run(run, args.devices, args.layout, args.rounds, args.build_workers)
    started, cpu = time.perf_counter(), _cpu_s()
    result = audit(run, write=False, workers=args.workers)
    audit_s, audit_cpu_s = time.perf_counter() - started, _cpu_s() - cpu
    result.performance.get("ledger_store", {}).pop("path", None)  # a path of this machine
    fails = [f.check for f in result.findings if f.severity == "fail"]
    row = {"devices": args.devices, "layout": args.layout, "rounds": args.rounds, "workers": args.workers,
           "build_workers": args.build_workers, **times, "keys_us_per_device": keys, "audit_s": round(audit_s, 2),
           "audit_cpu_s": round(audit_cpu_s, 1),
           "verdict": "FAIL" if fails else "PASS", "fails": sorted(set(fails)),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "workers_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
           "performance": result.performance}
    print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
