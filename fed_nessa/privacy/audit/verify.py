"""The privacy audit: verify ledgers and recompute every epsilon from the files alone.

Written for an auditor who trusts neither the devices' software nor the server:
it reads only ledgers (and the run's ``summary.json`` for the stated claim),
checks every chain and signature, replays every device's DP events through two
independent accountants (Opacus RDP and Google's dp_accounting PLD by default; a ledger with
the integer mechanism: RDP and the skellam accountant, each skellam event's bound checked
against the Rényi divergence summed numerically, :mod:`.integer`),
compares the result with what each device reported and with its budget, and
cross-checks the server's federation ledger. Every failed check is a
:class:`Finding` naming the device and entry; any ``fail`` finding fails the
verdict.

Tolerances (stated in the report):

- reported vs recomputed epsilon, same accountant: ``|diff| <= abs + rel * eps``
  with :data:`REPORT_TOLERANCE` (RDP is deterministic, so tight);
- the two accountants: PLD is numerically tight and RDP an upper bound, so
  ``pld <= rdp * 1.001 + 0.01`` must hold (else ``fail``); RDP's conversion
  slack is expected, and only ``rdp > 1.5 * pld + 1`` is flagged (``warn``).

Fleet scale (10,000 devices x 1,000 rounds): rounds are handled as intervals
(a device's span reservation and the server's ``span`` entry are one pair each,
never expanded into per-round sets), and accounting is memoised per distinct
history (:class:`EpsilonMemo`), so identical ledgers are composed once.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from fed_nessa.privacy import signing
from fed_nessa.privacy.accounting import GAUSSIAN, PLD, RDP, EpsilonMemo, UnitNotCoveredError, compute_epsilon
from fed_nessa.privacy.audit import anchors, integer
from fed_nessa.privacy.audit.findings import (
    BUDGET_SLACK,
    FAIL,
    RDP_SLACK,
    REPORT_TOLERANCE,
    TIGHT_OVER_RDP,
    WARN,
    AuditResult,
    DeviceAudit,
    Finding,
    Interval,
    count_rounds,
    format_rounds,
    merge_intervals,
    subtract_intervals,
)
from fed_nessa.privacy.audit.report import write_report
from fed_nessa.privacy.chain import HEADER, ChainRead, entry_hash, read_chain, read_chain_bytes
from fed_nessa.privacy.events import DEVICE, EXAMPLE, GAUSSIAN_SUM, DPEvent, EventError, one_per_round
from fed_nessa.privacy.ledger import (
    CHAIN_SCHEME,
    COMPLETE,
    DEVICE_LEDGER_NAME,
    DEVICE_PUB_NAME,
    FEDERATION_LEDGER_NAME,
    PUBLIC_PARAMETERS,
    RESERVE,
    ROUND,
    SERVER_PUB_NAME,
    SPAN,
    STATUSES,
    dropped_by_round,
    received_chain,
)
from fed_nessa.privacy.statement import privacy_statement
from fed_nessa.privacy.store import SQLITE, STORE_NAME, count_devices, max_num, read_block, store_label

# Re-exported: callers (and docs) have long imported these names from this module.
__all__ = ["BUDGET_SLACK", "FAIL", "RDP_SLACK", "REPORT_TOLERANCE", "TIGHT_OVER_RDP", "WARN", "AuditResult",
           "DeviceAudit", "Finding", "audit"]


def audit(path: Path | str, out_dir: Path | str | None = None, accountants: tuple[str, str] = (RDP, PLD),
          write: bool = True, workers: int | None = None) -> AuditResult:
    """Audit a run folder, a folder of collected device ledgers, or one ledger file.

    A run folder holding a ledger store (``ledger-store.sqlite``, the fleet engine's layout at scale)
    has its device chains read from the store, verified in parallel over blocks of devices by
    ``workers`` processes (default: every CPU); the checks and findings are those of the file layout.

    Writes ``audit.json``, ``report.md`` and two PNG plots into ``out_dir``
    (default ``<run dir>/audit``, or ``audit/`` beside a single ledger file).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such run folder or ledger file")
    if len(accountants) != 2 or accountants[0] == accountants[1]:
        raise ValueError(f"give two different accountants, got {accountants!r}")
    device_paths, fed_path, summary = _discover(root)
    run_folder = _is_run_folder(root)
    if not device_paths and fed_path is None and not run_folder and not (root / STORE_NAME).is_file():
        raise FileNotFoundError(f"{root}: no {DEVICE_LEDGER_NAME} or {FEDERATION_LEDGER_NAME} found")
    findings: list[Finding] = []
    not_checked: list[str] = []
    started = time.perf_counter()
    claim = _summary_privacy(summary, findings)
    anchors.check_summary_guarantee(claim, findings)
    if summary is not None:
        _check_referenced_files(root, summary, findings)
    memo = EpsilonMemo()
    devices = [_audit_device(p, accountants, findings, memo) for p in device_paths]
    store_path = root / STORE_NAME if root.is_dir() and (root / STORE_NAME).is_file() else None
    store_stats: dict[str, Any] = {}
    if store_path is not None:
        devices += _audit_store(store_path, accountants, findings, workers, store_stats)
    _check_unique_ids(devices, findings)
    federation = _audit_federation(fed_path, devices, findings, summary, not_checked) if fed_path else None
    if fed_path is None:
        not_checked += _without_federation_ledger(root, run_folder, findings)
    _check_claim(claim, devices, accountants, findings)
    statement = _statement(claim, devices)
    shown = integer.INTEGER_ACCOUNTANTS if integer.holds_integer(devices) else (accountants[0], accountants[1])
    result = AuditResult(str(root), devices, findings, federation, statement, shown, not_checked=not_checked)
    result.performance = {"accounting": memo.stats(), "check_seconds": round(time.perf_counter() - started, 3)}
    if store_stats:
        result.performance["ledger_store"] = store_stats
    if write:
        target = Path(out_dir) if out_dir else (root if root.is_dir() else root.parent) / "audit"
        write_report(result, target)
        result.out_dir = str(target)
    return result


# ----------------------------------------------------------------------------- discovery
def _discover(root: Path) -> tuple[list[Path], Path | None, dict[str, Any] | None]:
    if root.is_file():
        if root.name == FEDERATION_LEDGER_NAME:
            return [], root, None
        return [root], None, None
    devices = sorted(p for p in root.rglob(DEVICE_LEDGER_NAME) if p.is_file())
    fed: Path | None = root / FEDERATION_LEDGER_NAME
    if (root / FEDERATION_LEDGER_NAME).exists() and not (root / FEDERATION_LEDGER_NAME).is_file():
        raise ValueError(f"{root / FEDERATION_LEDGER_NAME}: not a file")
    if not (root / FEDERATION_LEDGER_NAME).exists():
        found = sorted(root.rglob(FEDERATION_LEDGER_NAME))
        fed = found[0] if found else None
    summary = None
    summary_path = root / "summary.json"
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{summary_path}: not valid JSON ({exc})") from exc
        if not isinstance(summary, dict):
            raise ValueError(f"{summary_path}: a run summary is a JSON object, got {type(summary).__name__}")
    return devices, fed, summary


# ----------------------------------------------------------------------------- a ledger store
#: Devices per unit of parallel work: big enough that a worker's query and memo amortise, small enough
#: that 2 workers balance at 10^4 devices.
STORE_BLOCK = 5_000


def _audit_store(path: Path, accountants: tuple[str, str], findings: list[Finding], workers: int | None,
                 stats: dict[str, Any]) -> list[DeviceAudit]:
    """Every device chain in the store, audited block by block in ``workers`` processes (one query per
    block, no per-device file opens; a memo of identical histories per worker)."""
    started = time.perf_counter()
    top = max_num(path)
    blocks = [(a, min(a + STORE_BLOCK - 1, top)) for a in range(1, top + 1, STORE_BLOCK)]
    n = max(1, min(workers or os.cpu_count() or 1, len(blocks)))
    jobs = [(path, a, b, accountants) for a, b in blocks]
    if n == 1:
        results = [_audit_block(job) for job in jobs]
    else:
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_audit_block, jobs))
    devices: list[DeviceAudit] = []
    for block_devices, block_findings in results:
        devices += block_devices
        findings += block_findings
    stats.update({"path": str(path), "devices": len(devices), "blocks": len(blocks), "workers": n,
                  "seconds": round(time.perf_counter() - started, 3)})
    return devices


def _audit_block(job: tuple[Path, int, int, tuple[str, str]]) -> tuple[list[DeviceAudit], list[Finding]]:
    """One block of a store's devices: (their audits, their findings); runs in a worker process."""
    path, first, last, accountants = job
    findings: list[Finding] = []
    memo = EpsilonMemo()
    devices: list[DeviceAudit] = []
    seen: dict[tuple[str, str], Any] = {}
    for device_id, pem, data in read_block(path, first, last):
        key_findings: list[Finding] = []
        try:
            key = signing.public_key_from_pem(pem)
        except signing.KeyFileError as exc:
            key_findings.append(Finding(FAIL, "key", f"{path}: device {device_id}: {exc}", device=device_id))
            key = None
        read = read_chain_bytes(store_label(path, device_id), data, key)
        devices.append(_shared(_audit_read(read, device_id, key_findings, accountants, findings, memo), seen))
    return devices, findings


#: DeviceAudit fields that devices on one schedule hold equal (read-only once the device is audited).
_SHAREABLE = ("events", "budget", "epsilon", "epsilon_by_unit", "curve_by_round", "reserve_spans", "covered",
              "chains", "server_pins", "pending")


def _shared(dev: DeviceAudit, seen: dict[tuple[str, str], Any]) -> DeviceAudit:
    """``dev`` with equal field values replaced by one shared object: a block's devices then pickle and
    sit in the parent's memory as one copy per distinct value (at 10^6 devices, GiBs)."""
    for name in _SHAREABLE:
        value = getattr(dev, name)
        setattr(dev, name, seen.setdefault((name, repr(value)), value))
    return dev


def _is_run_folder(root: Path) -> bool:
    """A run folder (as ``simulate`` writes it), not one ledger file or a folder of collected device ledgers."""
    return root.is_dir() and ((root / "summary.json").exists() or (root / FEDERATION_LEDGER_NAME).exists()
                              or (root / "devices").is_dir() or (root / STORE_NAME).is_file())


def _without_federation_ledger(root: Path, run_folder: bool, findings: list[Finding]) -> list[str]:
    """A run folder without its federation ledger FAILS; device ledgers alone say what cannot be checked."""
    if run_folder:
        findings.append(Finding(FAIL, "evidence.federation_ledger",
                                f"{root}: the run folder has no {FEDERATION_LEDGER_NAME}: who joined which round, "
                                "the pinned device keys, the models sent and every deleted device ledger or "
                                "truncated round cannot be checked"))
    limits = ["no federation ledger: participation (who joined which round), the server's pins of device keys, "
              "the models and configs the server says it sent, and missing device ledgers are not checked",
              "each device's pin of the server key is not compared with the server's key"]
    return limits  # in audit.json ("not_checked") and at the top of report.md


def _check_referenced_files(root: Path, summary: dict[str, Any], findings: list[Finding]) -> None:
    """Every device ledger the summary references must exist: ``privacy.device_ledger_pattern`` with
    ``privacy.num_device_ledgers`` (or, in older run folders, one path per device in ``privacy.device_ledgers``)."""
    privacy = summary.get("privacy")
    if not root.is_dir() or not isinstance(privacy, dict):
        return
    pattern, count = privacy.get("device_ledger_pattern"), privacy.get("num_device_ledgers")
    if privacy.get("ledger_layout") == SQLITE and isinstance(count, int):
        found = count_devices(root / STORE_NAME) if (root / STORE_NAME).is_file() else 0
        if found < count:
            findings.append(Finding(FAIL, "evidence.missing_file",
                                    f"summary.json states {count} device ledgers in {STORE_NAME}; "
                                    f"{found} are in the run folder"))
        return
    if isinstance(pattern, str) and isinstance(count, int):
        inside = pattern and not Path(pattern).is_absolute() and ".." not in Path(pattern).parts
        found = sum(1 for p in root.glob(pattern.replace("{device_id}", "*")) if p.is_file()) if inside else 0
        if found < count:
            findings.append(Finding(FAIL, "evidence.missing_file",
                                    f"summary.json states {count} device ledgers at {pattern!r}; "
                                    f"{found} are in the run folder"))
    refs = privacy.get("device_ledgers")
    if not isinstance(refs, dict):
        return
    for device_id, rel in sorted(refs.items()):
        if not isinstance(rel, str) or not (root / rel).is_file():
            findings.append(Finding(FAIL, "evidence.missing_file",
                                    f"summary.json references {rel!r} for device {device_id}, which is missing",
                                    str(device_id)))


def _summary_privacy(summary: dict[str, Any] | None, findings: list[Finding]) -> dict[str, Any] | None:
    if summary is None:
        return None
    claim = summary.get("privacy")
    if not isinstance(claim, dict):
        findings.append(Finding(WARN, "summary", "summary.json has no 'privacy' section: no stated claim"))
        return None
    return claim


def _trusted_key(path: Path, name: str, findings: list[Finding], who: str):
    pub = path.parent / name
    if not pub.exists():
        findings.append(Finding(WARN, "key", f"{pub.name} not found beside {path}: the header's own key "
                                             "is used, so a wholesale re-signed ledger would not be caught; "
                                             "compare the key fingerprint out of band", device=who))
        return None
    try:
        return signing.load_public_key(pub)
    except signing.KeyFileError as exc:
        findings.append(Finding(FAIL, "key", str(exc), device=who))
        return None


# ----------------------------------------------------------------------------- one device
def _audit_device(path: Path, accountants: tuple[str, str], findings: list[Finding],
                  memo: EpsilonMemo | None = None) -> DeviceAudit:
    key_findings: list[Finding] = []
    read = read_chain(path, _trusted_key(path, DEVICE_PUB_NAME, key_findings, path.parent.name))
    return _audit_read(read, path.parent.name, key_findings, accountants, findings, memo)


def _audit_read(read: ChainRead, name: str, key_findings: list[Finding], accountants: tuple[str, str],
                findings: list[Finding], memo: EpsilonMemo | None = None) -> DeviceAudit:
    """Audit one device chain as read (from its file or from a ledger store); ``name``: its id if the
    header names none."""
    path = read.path
    header = read.entries[0].get("payload", {}) if read.entries and read.entries[0].get("kind") == HEADER else {}
    device_id = str(header.get("device_id") or name)
    findings.extend(replace(f, device=device_id) for f in key_findings)
    dev = DeviceAudit(device_id=device_id, path=str(path), key_fingerprint=header.get("key_fingerprint"),
                      chain_ok=read.ok, n_entries=len(read.entries),
                      entry_hashes=[entry_hash(e) if e else "" for e in read.entries])
    for fault in read.faults:
        findings.append(Finding(FAIL, f"chain.{fault.kind}", fault.message(), device_id, fault.seq))
    if read.torn_tail:
        findings.append(Finding(WARN, "chain.torn_tail",
                                f"{path}: a final line without newline ({len(read.torn_tail)} bytes) is a "
                                "write interrupted by a crash: ignored (its mechanism cannot have run)",
                                device_id))
    reserves, completes = _parse_entries(read, dev, findings)
    dev.events = [ev for _, ev, _ in reserves]
    anchors.check_noise_source(dev, findings)
    _check_budget_records(header, reserves, dev, findings)
    if dev.delta is None:
        return dev
    _recompute(dev, reserves, completes, integer.accountants_for(dev, accountants, findings), findings,
               memo or EpsilonMemo())
    return dev


def _parse_entries(read: ChainRead, dev: DeviceAudit, findings: list[Finding]):
    """Reserve entries as (seq, event, budget) and complete entries as (seq, payload, n_reserved_before)."""
    reserves: list[tuple[int, DPEvent, dict | None]] = []
    completes: list[tuple[int, dict[str, Any], int]] = []
    completed: set[int] = set()
    reserve_seqs: set[int] = set()
    for entry in read.entries:
        if not entry or entry.get("kind") == HEADER:
            continue
        seq, payload = entry["seq"], entry["payload"]
        if entry["kind"] == RESERVE:
            try:
                ev = DPEvent.from_dict(payload.get("event"))
            except (EventError, TypeError) as exc:
                findings.append(Finding(FAIL, "event", f"invalid DP event: {exc}", dev.device_id, seq))
                continue
            reserves.append((seq, ev, payload.get("budget")))
            reserve_seqs.add(seq)
            dev.reserve_spans.append((ev.round, ev.end_round, seq))
            _parse_received(payload.get("received"), ev, seq, dev, findings)
        elif entry["kind"] == COMPLETE:
            target = payload.get("reserve_seq")
            if target not in reserve_seqs:
                findings.append(Finding(FAIL, "complete", f"completes seq {target!r}, which is not an "
                                                          "earlier reserve entry", dev.device_id, seq))
            elif target in completed:
                findings.append(Finding(FAIL, "complete", f"reservation {target} completed twice",
                                        dev.device_id, seq))
            elif payload.get("status") not in STATUSES:
                findings.append(Finding(FAIL, "complete", f"status {payload.get('status')!r}",
                                        dev.device_id, seq))
            else:
                completed.add(target)
                completes.append((seq, payload, len(reserves)))
                _parse_chain(payload.get("received"), target, seq, dev, findings)
        else:
            findings.append(Finding(FAIL, "schema", f"unknown entry kind {entry['kind']!r}", dev.device_id, seq))
    dev.cover()
    dev.pending = sorted(reserve_seqs - completed)
    for seq in dev.pending:
        findings.append(Finding(WARN, "pending", "reserved but never completed (crash or still running): "
                                                 "counted in full, conservatively", dev.device_id, seq))
    return reserves, completes


def _parse_received(rec: Any, ev: DPEvent, seq: int, dev: DeviceAudit, findings: list[Finding]) -> None:
    """A reserve's ``received`` block: the server key it pinned, and (one round) the model and config hashes."""
    if rec is None:
        return
    if not isinstance(rec, dict):
        findings.append(Finding(FAIL, "schema", "'received' must be an object", dev.device_id, seq))
        return
    fp = rec.get("server_key_fingerprint")
    if isinstance(fp, str) and fp:
        dev.server_pins.setdefault(fp, seq)
    if "model_sha256" in rec:
        if rec.get("round") != ev.round or ev.n_rounds != 1:
            findings.append(Finding(FAIL, "schema", f"'received' names round {rec.get('round')!r}, the event "
                                                    f"covers {ev.round}..{ev.end_round}", dev.device_id, seq))
            return
        dev.received[ev.round] = (rec.get("model_sha256"), rec.get("config_sha256"), seq)


def _parse_chain(rec: Any, reserve_seq: int, seq: int, dev: DeviceAudit, findings: list[Finding]) -> None:
    """A span's complete entry: ``received = {scheme, rounds: [[first, last], ...], chain}``."""
    if rec is None:
        return
    ok = (isinstance(rec, dict) and rec.get("scheme") == CHAIN_SCHEME and isinstance(rec.get("chain"), str)
          and isinstance(rec.get("rounds"), list)
          and all(isinstance(iv, list) and len(iv) == 2 and all(isinstance(x, int) for x in iv) and iv[0] <= iv[1]
                  for iv in rec["rounds"]))
    if not ok:
        findings.append(Finding(FAIL, "schema", f"'received' chain record is malformed (scheme {CHAIN_SCHEME} "
                                                "with rounds [[first, last], ...] and a chain)", dev.device_id, seq))
        return
    dev.chains.append((reserve_seq, tuple((int(a), int(b)) for a, b in rec["rounds"]), str(rec["chain"]), seq))


def _check_budget_records(header: dict[str, Any], reserves, dev: DeviceAudit, findings: list[Finding]) -> None:
    budgets = [b for b in [header.get("budget")] + [b for _, _, b in reserves] if b]
    distinct = {json.dumps(b, sort_keys=True) for b in budgets}
    if len(distinct) > 1:
        findings.append(Finding(FAIL, "budget", f"the budget changed during the ledger's life: "
                                                f"{sorted(distinct)}", dev.device_id))
    dev.budget = budgets[-1] if budgets else None
    if dev.budget is None and reserves:
        findings.append(Finding(FAIL, "budget", "no budget recorded (header or reserve entries): "
                                                "cannot check the device against one", dev.device_id))
    elif dev.budget is None:
        findings.append(Finding(WARN, "budget", "no DP event and no budget recorded: nothing spent",
                                dev.device_id))
    deltas = Counter(ev.delta for _, ev, _ in reserves)
    if dev.budget is not None:
        dev.delta = float(dev.budget["delta"])
    elif deltas:
        dev.delta = deltas.most_common(1)[0][0]
    elif not reserves:
        dev.delta = None
    for seq, ev, _ in reserves:
        if dev.delta is not None and ev.delta != dev.delta:
            findings.append(Finding(FAIL, "delta", f"event delta {ev.delta:g} differs from the device's "
                                                   f"delta {dev.delta:g}", dev.device_id, seq))


def _within(reported: float, recomputed: float, accountant: str) -> bool:
    rel, abs_ = REPORT_TOLERANCE[accountant]
    return abs(reported - recomputed) <= abs_ + rel * abs(recomputed)


#: Why a stated epsilon above the recomputed one is a warning, not a failure (the report says it).
OVERSTATED = ("more than the accountant gives: conservative, as a ledger or summary written under an older, looser "
              "bound is (the integer mechanism's subsampling before the symmetric expansion)")


def _mismatch(stated: float, recomputed: float, accountant: str) -> tuple[str, str] | None:
    """None within tolerance; else the severity and what the message adds: FAIL below the recomputed epsilon (a
    claim of more privacy than the events give), WARN above it, saying why (:data:`OVERSTATED`)."""
    if _within(stated, recomputed, accountant):
        return None
    return (FAIL, "") if stated < recomputed else (WARN, f"; {OVERSTATED}")


def _recompute(dev: DeviceAudit, reserves, completes, accountants: tuple[str, str],
               findings: list[Finding], memo: EpsilonMemo) -> None:
    events = dev.events
    assert dev.delta is not None
    delta = dev.delta
    dev.unit = str((dev.budget or {}).get("unit", EXAMPLE))
    curves: dict[tuple[str, str], list[float]] = {}

    def curve(acc: str, unit: str | None = None) -> list[float]:
        # Memoised across devices: the curve depends only on (q, sigma, steps, unit) per event.
        key = (acc, unit or dev.unit)
        if key not in curves:
            curves[key] = memo.curve(events, delta, acc, key[1])
        return curves[key]

    if not _units(dev, accountants, curve, findings):
        return
    dev.epsilon = dict(dev.epsilon_by_unit[dev.unit])
    for seq, payload, n_before in completes:
        acc = str(payload.get("accountant", RDP))
        reported = payload.get("epsilon_after")
        if acc not in REPORT_TOLERANCE or not isinstance(reported, (int, float)) or n_before == 0:
            findings.append(Finding(FAIL, "reported", f"unusable epsilon_after {reported!r} / accountant "
                                                      f"{acc!r}", dev.device_id, seq))
            continue
        if payload.get("delta") is not None and float(payload["delta"]) != dev.delta:
            findings.append(Finding(FAIL, "reported", f"reported at delta {payload['delta']:g}, the device's "
                                                      f"delta is {dev.delta:g}", dev.device_id, seq))
            continue
        unit = str(payload.get("unit", EXAMPLE))
        if unit != dev.unit:
            findings.append(Finding(FAIL, "reported", f"reported per {unit}, the device budgets per {dev.unit}",
                                    dev.device_id, seq))
            continue
        recomputed = curve(acc)[n_before - 1]
        if mismatch := _mismatch(float(reported), recomputed, acc):
            severity, why = mismatch
            findings.append(Finding(severity, "reported", f"reported epsilon {reported:.6g} but the {acc} "
                                                          f"accountant gives {recomputed:.6g} for the "
                                                          f"{n_before} events reserved before it (per {unit}){why}",
                                    dev.device_id, seq))
        dev.reported_final, dev.reported_accountant = float(reported), acc
    rdp_curve = curve(RDP) if events else []
    last_by_round: dict[int, float] = {}
    for ev, eps in zip(events, rdp_curve):
        # A span is charged in full when reserved: at its first round, and still at its last.
        for r in (ev.round, ev.end_round):
            last_by_round[r] = max(eps, last_by_round.get(r, 0.0))
    running = 0.0
    dev.curve_by_round = []
    for r, eps in sorted(last_by_round.items()):
        running = max(running, eps)  # a later event reserved inside a span must not dip the curve
        dev.curve_by_round.append((r, running))
    for unit, values in dev.epsilon_by_unit.items():
        _check_agreement(dev, accountants, findings, values, unit)
    _check_against_budget(dev, curve, findings)


def _units(dev: DeviceAudit, accountants: tuple[str, str], curve, findings: list[Finding]) -> bool:
    """Re-derive every guarantee the ledger supports: example-level always, device-level when every
    spending event is device-level (then also in closed form, the analytic Gaussian)."""
    units = [EXAMPLE] + ([DEVICE] if any(ev.unit == DEVICE for ev in dev.events) or dev.unit == DEVICE else [])
    for unit in units:
        try:
            values = {acc: (curve(acc, unit)[-1] if dev.events else 0.0) for acc in accountants}
        except UnitNotCoveredError as exc:
            if unit == dev.unit:
                findings.append(Finding(FAIL, "unit.uncovered", f"the device budgets per {unit}, but {exc}",
                                        dev.device_id))
                return False
            continue
        if unit == DEVICE and all(ev.sample_rate >= 1.0 and ev.mechanism == GAUSSIAN_SUM for ev in dev.events
                                  if ev.steps):
            values[GAUSSIAN] = compute_epsilon(dev.events, dev.delta or 0.0, GAUSSIAN, DEVICE) if dev.events else 0.0
        dev.epsilon_by_unit[unit] = values
    return True


def _check_agreement(dev: DeviceAudit, accountants: tuple[str, str], findings: list[Finding],
                     values: dict[str, float] | None = None, unit: str = EXAMPLE) -> None:
    values = dev.epsilon if values is None else values
    exact = values.get(GAUSSIAN)
    if exact is not None:
        # Device-level histories are Gaussian sums: the closed form is exact, PLD and RDP are upper bounds.
        for acc in accountants:
            if values[acc] < exact * (1 - TIGHT_OVER_RDP[0]) - TIGHT_OVER_RDP[1]:
                findings.append(Finding(FAIL, "accountants", f"{acc} epsilon {values[acc]:.4g} per {unit} is below "
                                                             f"the exact Gaussian {exact:.4g}: one implementation "
                                                             "is wrong", dev.device_id))
    if RDP not in accountants:
        a, b = (values[x] for x in accountants)
        if abs(a - b) > REPORT_TOLERANCE[PLD][1] + REPORT_TOLERANCE[PLD][0] * max(a, b):
            findings.append(Finding(FAIL, "accountants", f"{accountants[0]} {a:.4g} and {accountants[1]} "
                                                         f"{b:.4g} disagree beyond their discretisation error",
                                    dev.device_id))
        return
    tight = next(x for x in accountants if x != RDP)
    rdp, other = values[RDP], values[tight]
    if other > rdp * (1 + TIGHT_OVER_RDP[0]) + TIGHT_OVER_RDP[1]:
        findings.append(Finding(FAIL, "accountants", f"{tight} epsilon {other:.4g} exceeds the RDP upper bound "
                                                     f"{rdp:.4g}: one implementation is wrong", dev.device_id))
    elif rdp > RDP_SLACK[0] * other + RDP_SLACK[1]:
        findings.append(Finding(WARN, "accountants", f"RDP {rdp:.4g} is far above {tight} {other:.4g}: RDP's "
                                                     "conversion slack, largest for few compositions; the "
                                                     "tight value is the better estimate", dev.device_id))


def _check_against_budget(dev: DeviceAudit, curve, findings: list[Finding]) -> None:
    if dev.budget is None:
        return
    acc = str(dev.budget.get("accountant", RDP))
    eps = curve(acc)[-1] if dev.events else 0.0
    dev.epsilon.setdefault(acc, eps)
    limit = float(dev.budget["epsilon"])
    if eps > limit * (1 + BUDGET_SLACK):
        findings.append(Finding(FAIL, "budget", f"epsilon {eps:.4g} ({acc}, delta {dev.delta:g}) is over the "
                                                f"budget {limit:g}", dev.device_id))


def _check_unique_ids(devices: list[DeviceAudit], findings: list[Finding]) -> None:
    counts = Counter(d.device_id for d in devices)
    for device_id, n in counts.items():
        if n > 1:
            paths = [d.path for d in devices if d.device_id == device_id]
            findings.append(Finding(FAIL, "device_id", f"{n} ledgers claim device {device_id!r}: {paths}",
                                    device_id))


# ----------------------------------------------------------------------------- federation
def _no_dp_round(rec: dict[str, Any], summary: dict[str, Any] | None) -> bool:
    """Whether a signed round (or span) record is one that added no DP noise, so its participants reserve nothing.

    Both parties must say so: the server signs no public DP parameters for the round, and the run's
    summary states dp-mode none. A server that drops the parameters of a DP round still fails
    ``federation.joined`` for every device whose reservation is missing.
    """
    extra = rec.get("extra") or {}
    mode = ((summary or {}).get("privacy") or {}).get("mode")
    return PUBLIC_PARAMETERS in extra and extra[PUBLIC_PARAMETERS] is None and mode == "none"


def _round_list(rounds: list[int], most: int = 8) -> str:
    """``1, 2, 3`` or ``1, 2, ... (40 rounds)``: a finding names the rounds without listing thousands."""
    shown = ", ".join(str(r) for r in rounds[:most])
    return shown if len(rounds) <= most else f"{shown}, ... ({len(rounds)} rounds)"


def _audit_federation(path: Path, devices: list[DeviceAudit], findings: list[Finding],
                      summary: dict[str, Any] | None = None, not_checked: list[str] | None = None) -> dict[str, Any]:
    """Cross-check the server's ``round`` and ``span`` entries against the device ledgers.

    All by round *coverage*: a device's reservations and the server's records
    are interval lists, so a 1,000-round span costs one interval operation per
    device, not 1,000 set lookups.
    """
    read = read_chain(path, _trusted_key(path, SERVER_PUB_NAME, findings, "server"))
    for fault in read.faults:
        findings.append(Finding(FAIL, f"federation.{fault.kind}", fault.message(), "server", fault.seq))
    rounds = [e["payload"] for e in read.entries if e and e.get("kind") == ROUND]
    span_entries = [(e["seq"], e["payload"]) for e in read.entries if e and e.get("kind") == SPAN]
    by_id = {d.device_id: d for d in devices}
    not_audited: set[str] = set()
    # Rounds the server accounts for per device (joined, failed, or dropped out of a joined span):
    # reservations outside them were never recorded by the server.
    recorded: dict[str, list[Interval]] = defaultdict(list)
    evidence = _Evidence(read)
    unguarded: dict[str, list[int]] = defaultdict(list)  # device -> non-DP rounds it joined
    for rec in rounds:
        r = rec.get("round")
        if not isinstance(r, int):
            findings.append(Finding(FAIL, "federation.schema", f"round entry without an int round: {r!r}",
                                    "server"))
            continue
        no_dp = _no_dp_round(rec, summary)
        for device_id in rec.get("joined", []):
            dev = by_id.get(device_id)
            if dev is None:
                not_audited.add(device_id)
            elif no_dp:  # nothing to reserve: the device spent no epsilon because it got no guarantee
                unguarded[device_id].append(r)
            elif subtract_intervals([(r, r)], dev.covered):
                findings.append(Finding(FAIL, "federation.joined",
                                        f"the server recorded device {device_id} as joining round {r}, but its "
                                        "ledger has no reserve entry for that round (entries deleted, or the "
                                        "ledger was truncated)", device_id))
        for device_id in rec.get("declined", []):
            _check_declined(by_id.get(device_id), device_id, r, r, findings)
        for device_id in rec.get("joined", []) + rec.get("failed", []):
            recorded[device_id].append((r, r))
        _check_fingerprints(rec, f"round {r}", by_id, findings)
        evidence.add_round(r, rec, findings)
    spans: list[dict[str, Any]] = []
    span_records: list[tuple[dict[str, Any], dict[str, list[int]]]] = []
    for seq, rec in span_entries:
        parsed = _parse_span(seq, rec, findings)
        if parsed is None:
            continue
        first, last, dropped = parsed
        where = f"rounds {first}..{last}" if last > first else f"round {first}"
        no_dp = _no_dp_round(rec, summary)
        for device_id in rec["joined"]:
            recorded[device_id].append((first, last))
            dev = by_id.get(device_id)
            if dev is None:
                not_audited.add(device_id)
                continue
            if no_dp:
                unguarded[device_id].extend(range(first, last + 1))
                continue
            excused = merge_intervals((r, r) for r in dropped.get(device_id, ()))
            missing = subtract_intervals(subtract_intervals([(first, last)], dev.covered), excused)
            if missing:
                findings.append(Finding(FAIL, "federation.joined",
                                        f"the server recorded device {device_id} as joining {where} (span entry "
                                        f"seq {seq}), but its ledger has no reserve covering "
                                        f"{format_rounds(missing)} (entries deleted, the ledger was truncated, "
                                        "or the span reserved was shorter)", device_id))
        for device_id in rec["failed"]:
            recorded[device_id].append((first, last))
        for device_id in rec["declined"]:
            _check_declined(by_id.get(device_id), device_id, first, last, findings)
        _check_fingerprints(rec, where, by_id, findings)
        evidence.add_span(seq, first, last, rec, dropped, findings)
        span_records.append((rec, dropped))
        spans.append({"seq": seq, "first_round": first, "last_round": last, "joined": len(rec["joined"]),
                      "declined": len(rec["declined"]), "failed": len(rec["failed"]),
                      "dropouts": sum(len(v) for v in dropped.values())})
    if unguarded:
        rounds_joined = sorted({r for rs in unguarded.values() for r in rs})
        findings.append(Finding(WARN, "federation.no_dp",
                                f"{len(unguarded)} device(s) joined round(s) {_round_list(rounds_joined)} that added "
                                "no DP noise (dp-mode none): no DP guarantee covers what they sent, and their ledgers "
                                "rightly reserve nothing for those rounds", "server"))
    if rounds or spans:
        for dev in devices:
            _check_unrecorded(dev, merge_intervals(recorded.get(dev.device_id, [])), findings)
    anchors.check_end_record(read.entries, findings)
    payloads = rounds + [rec for _seq, rec in span_entries]
    anchors.check_ledger_heads(payloads, by_id, findings)
    parsed_spans = [(s["first_round"], s["last_round"], rec, dropped) for s, (rec, dropped) in
                    zip(spans, span_records, strict=True)]
    params = anchors.parameters_by_round(rounds, [(a, b, rec) for a, b, rec, _d in parsed_spans])
    if params:
        anchors.check_parameters(devices, params, findings)
    elif not_checked is not None and (rounds or spans):
        not_checked.append("the federation ledger records no public DP parameters per round (written before "
                           "they were recorded): device events are not cross-checked against them")
    anchors.check_summary_rounds(summary, anchors.recorded_participants(rounds, parsed_spans), findings)
    for device_id in sorted(not_audited):  # evidence deleted: a joined device's spend cannot be checked
        findings.append(Finding(FAIL, "evidence.missing_ledger",
                                f"the federation ledger records device {device_id} as joined, but no "
                                f"{DEVICE_LEDGER_NAME} was found for it", device_id))
    evidence.check(devices, findings)
    return {"path": str(path), "chain_ok": read.ok, "rounds": rounds, "spans": spans,
            "devices_without_ledger": sorted(not_audited)}


def _parse_span(seq: int, rec: dict[str, Any], findings: list[Finding]) -> tuple[int, int, dict[str, list[int]]] | None:
    """(first, last, {device: [dropped rounds]}) of a span entry, or None after a ``federation.schema`` finding."""
    first, last = rec.get("first_round"), rec.get("last_round")
    problem = None
    if not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last):
        problem = f"first_round {first!r} / last_round {last!r} are not rounds in order"
    elif not all(isinstance(rec.get(k), list) for k in ("joined", "declined", "failed")):
        problem = "joined, declined and failed must be lists of device ids"
    if problem is None:
        assert isinstance(first, int) and isinstance(last, int)
        try:
            by_round = dropped_by_round(rec)
        except ValueError as exc:
            problem = str(exc)
        else:
            joined = set(rec["joined"])
            outside = sorted(r for r in by_round if not first <= r <= last)
            strangers = sorted({d for ids in by_round.values() for d in ids} - joined)
            if outside:
                problem = f"extra.dropped names round(s) {outside[:5]} outside the span"
            elif strangers:
                problem = f"extra.dropped names device(s) {strangers[:5]} that did not join the span"
    if problem is not None:
        findings.append(Finding(FAIL, "federation.schema", f"span entry: {problem}", "server", seq))
        return None
    assert isinstance(first, int) and isinstance(last, int)
    dropped: dict[str, list[int]] = defaultdict(list)
    for r, ids in by_round.items():
        for d in ids:
            dropped[d].append(r)
    return first, last, dropped


def _check_declined(dev: DeviceAudit | None, device_id: str, first: int, last: int,
                    findings: list[Finding]) -> None:
    seq = dev.first_seq_covering(first, last) if dev is not None else None
    if seq is not None:
        where = f"round {first}" if first == last else f"rounds {first}..{last}"
        findings.append(Finding(FAIL, "federation.declined",
                                f"declined {where} per the server, yet reserved it: the two signed records disagree "
                                "(counted anyway)", device_id, seq))


def _check_unrecorded(dev: DeviceAudit, recorded: list[Interval], findings: list[Finding]) -> None:
    """Every round a device reserved must be one the server signed it into (joined, failed or dropped out).

    A span with fewer steps than rounds (a Poisson DP-SGD span over a sampled schedule) names its
    rounds only by count: the server must record at least that many of them for the device.
    """
    for ev, (first, last, seq) in zip(dev.events, dev.reserve_spans, strict=True):
        if not one_per_round(ev) and 0 < ev.steps < ev.n_rounds:
            have = count_rounds(subtract_intervals([(first, last)], subtract_intervals([(first, last)], recorded)))
            if have < ev.steps:
                findings.append(Finding(FAIL, "federation.unrecorded",
                                        f"reserved {ev.steps} round(s) within rounds {first}..{last}, but the server "
                                        f"recorded the device in only {have} of them (counted anyway)",
                                        dev.device_id, seq))
            continue
        for a, b in subtract_intervals([(first, last)], recorded):
            findings.append(Finding(FAIL, "federation.unrecorded",
                                    f"reserved {format_rounds([(a, b)])} but the server did not record it as joined "
                                    "or failed: the two signed records disagree (counted anyway)", dev.device_id, seq))


def _check_fingerprints(rec: dict[str, Any], where: str, by_id: dict[str, DeviceAudit],
                        findings: list[Finding]) -> None:
    fingerprints = (rec.get("extra") or {}).get("device_key_fingerprints") or {}
    for device_id, fp in fingerprints.items():
        dev = by_id.get(device_id)
        if dev is not None and dev.key_fingerprint != fp:
            findings.append(Finding(FAIL, "federation.key",
                                    f"the server saw key {str(fp)[:16]} in {where}, the ledger is signed "
                                    f"by {str(dev.key_fingerprint)[:16]}", device_id))


# ----------------------------------------------------------------------------- pins and models
class _Evidence:
    """The server's pins and per-round (model, config) hashes, checked against every device ledger.

    One model per round, provably: every device signed the SHA-256 of the model and config it
    received (a round's reserve entry, or a span's chain on its complete entry); the server
    recorded what it sent. All participants of a round must hold the same hashes (``model.split``,
    without trusting the server's record) and those the server recorded (``model.mismatch``,
    ``config.mismatch``); a server sending one device another model (Pasquini et al., CCS 2022)
    is named by round and device.
    """

    def __init__(self, read: ChainRead) -> None:
        header = read.entries[0].get("payload", {}) if read.entries and read.entries[0].get("kind") == HEADER else {}
        self.server_fp: str | None = header.get("key_fingerprint")
        self.sent: dict[int, tuple[str, str]] = {}
        self.pins: dict[str, str] = {}
        self.joined_rounds: list[tuple[int, list[str]]] = []
        self.joined_spans: list[tuple[int, int, int, list[str], dict[str, list[int]]]] = []

    def _pins(self, rec: dict[str, Any], where: str, findings: list[Finding]) -> None:
        for device_id, fp in ((rec.get("extra") or {}).get("device_key_fingerprints") or {}).items():
            known = self.pins.setdefault(str(device_id), str(fp))
            if known != fp:
                findings.append(Finding(FAIL, "federation.key", f"{where} pins key {str(fp)[:16]}, an earlier entry "
                                                                f"pinned {known[:16]}", str(device_id)))

    def add_round(self, r: int, rec: dict[str, Any], findings: list[Finding]) -> None:
        extra = rec.get("extra") or {}
        self._pins(rec, f"round {r}", findings)
        if isinstance(extra.get("model_sha256"), str):
            self.sent[r] = (extra["model_sha256"], str(extra.get("config_sha256")))
        self.joined_rounds.append((r, list(rec.get("joined", []))))

    def add_span(self, seq: int, first: int, last: int, rec: dict[str, Any], dropped: dict[str, list[int]],
                 findings: list[Finding]) -> None:
        extra = rec.get("extra") or {}
        self._pins(rec, f"span {first}..{last}", findings)
        models = extra.get("models") or {}
        if isinstance(models, dict):
            for key, pair in models.items():
                if str(key).isdigit() and isinstance(pair, list) and len(pair) == 2:
                    self.sent[int(key)] = (str(pair[0]), str(pair[1]))
        rounds = list(range(first, last + 1))
        if extra.get("model_chain") is not None and all(r in self.sent for r in rounds):
            if received_chain((r, *self.sent[r]) for r in rounds) != extra["model_chain"]:
                findings.append(Finding(FAIL, "federation.model_chain",
                                        f"span {first}..{last}: model_chain does not match its per-round hashes",
                                        "server", seq))
        self.joined_spans.append((seq, first, last, list(rec.get("joined", [])), dropped))

    def check(self, devices: list[DeviceAudit], findings: list[Finding]) -> None:
        by_id = {d.device_id: d for d in devices}
        self._check_pins(devices, findings)
        peers: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for dev in devices:
            for r, (model, config, seq) in sorted(dev.received.items()):
                peers[r][str(model)].append(dev.device_id)
                want = self.sent.get(r)
                if want is None:
                    continue
                if model != want[0]:
                    findings.append(Finding(FAIL, "model.mismatch",
                                            f"round {r}: the device received model {str(model)[:16]}, the server "
                                            f"recorded sending {want[0][:16]}", dev.device_id, seq))
                elif config != want[1]:
                    findings.append(Finding(FAIL, "config.mismatch",
                                            f"round {r}: the device received round config {str(config)[:16]}, the "
                                            f"server recorded sending {want[1][:16]}", dev.device_id, seq))
        for r, groups in sorted(peers.items()):
            if len(groups) > 1:  # no single model: name everyone outside the largest group
                majority = max(groups.items(), key=lambda kv: (len(kv[1]), kv[0]))[0]
                for model, ids in sorted(groups.items()):
                    for device_id in sorted(ids) if model != majority else []:
                        findings.append(Finding(FAIL, "model.split",
                                                f"round {r}: participants did not all receive the same model: this "
                                                f"device got {model[:16]}, {len(groups[majority])} other(s) got "
                                                f"{majority[:16]}", device_id, by_id[device_id].received[r][2]))
        self._check_chains(devices, findings)
        self._check_joined(by_id, findings)

    def _check_pins(self, devices: list[DeviceAudit], findings: list[Finding]) -> None:
        for dev in devices:
            if dev.events and dev.device_id not in self.pins:
                findings.append(Finding(FAIL, "federation.unpinned",
                                        "the federation ledger pins no key for this device: a ledger re-keyed "
                                        "wholesale would not be caught", dev.device_id))
            for fp, seq in dev.server_pins.items():
                if self.server_fp is not None and fp != self.server_fp:
                    findings.append(Finding(FAIL, "device.server_pin",
                                            f"the device recorded server key {fp[:16]}, the federation ledger is "
                                            f"signed by {self.server_fp[:16]} (a different or re-keyed server)",
                                            dev.device_id, seq))

    def _check_chains(self, devices: list[DeviceAudit], findings: list[Finding]) -> None:
        memo: dict[tuple[Interval, ...], str | list[int]] = {}  # devices on one schedule: one recomputation
        for dev in devices:
            for _rseq, intervals, chain, seq in dev.chains:
                if intervals not in memo:
                    rounds = [r for a, b in intervals for r in range(a, b + 1)]
                    unknown = [r for r in rounds if r not in self.sent]
                    memo[intervals] = unknown or received_chain((r, *self.sent[r]) for r in rounds)
                expected = memo[intervals]
                where = format_rounds(list(intervals))
                if isinstance(expected, list):
                    findings.append(Finding(FAIL, "model.unrecorded",
                                            f"{where}: the device's received-model chain covers "
                                            f"{format_rounds(merge_intervals((r, r) for r in expected))}, for which "
                                            "the server recorded no model hash", dev.device_id, seq))
                elif chain != expected:
                    findings.append(Finding(FAIL, "model.mismatch",
                                            f"{where}: the chain of models and configs the device received differs "
                                            "from what the server recorded sending in those rounds",
                                            dev.device_id, seq))

    def _check_joined(self, by_id: dict[str, DeviceAudit], findings: list[Finding]) -> None:
        """Every joined device holds a signed record of what it received; the server recorded what it sent."""
        covers: dict[str, list[Interval]] = {}

        def cover(dev: DeviceAudit) -> list[Interval]:
            if dev.device_id not in covers:
                covers[dev.device_id] = merge_intervals([(r, r) for r in dev.received]
                                                        + [iv for _s, ivs, _c, _q in dev.chains for iv in ivs])
            return covers[dev.device_id]

        for r, joined in self.joined_rounds:
            if joined and r not in self.sent:
                findings.append(Finding(FAIL, "model.unrecorded", f"round {r}: {len(joined)} device(s) joined, but "
                                                                  "the server recorded no model hash", "server"))
            for device_id in joined:
                dev = by_id.get(device_id)
                # (a round its reservations do not cover is already a ``federation.joined`` failure)
                if dev is not None and not subtract_intervals([(r, r)], dev.covered) \
                        and subtract_intervals([(r, r)], cover(dev)):
                    findings.append(Finding(FAIL, "model.missing", f"round {r}: joined, but the ledger holds no "
                                                                   "record of the model it received",
                                            device_id, dev.first_seq_covering(r, r)))
        for seq, first, last, joined, dropped in self.joined_spans:
            if joined and not all(r in self.sent for r in range(first, last + 1)):
                findings.append(Finding(FAIL, "model.unrecorded", f"span {first}..{last}: the server recorded no "
                                                                  "model hash for some of its rounds", "server", seq))
            for device_id in joined:
                dev = by_id.get(device_id)
                # Rounds its reservations cover (others fail ``federation.joined``), less its drop-outs.
                excused = merge_intervals([(r, r) for r in dropped.get(device_id, ())] + cover(dev)) \
                    if dev is not None else []
                ours = subtract_intervals([(first, last)], subtract_intervals([(first, last)], dev.covered)) \
                    if dev is not None else []
                missing = subtract_intervals(ours, excused)
                if dev is None or not missing:
                    continue
                pending = any(s in dev.pending for a, b, s in dev.reserve_spans if a <= last and b >= first)
                findings.append(Finding(WARN if pending else FAIL, "model.missing",
                                        f"{format_rounds(missing)}: joined, but the ledger holds no record of the "
                                        "models it received" + (" (its span never completed)" if pending else ""),
                                        device_id, dev.first_seq_covering(first, last)))


# ----------------------------------------------------------------------------- the stated claim
def _check_claim(claim: dict[str, Any] | None, devices: list[DeviceAudit], accountants, findings) -> None:
    if not claim or not devices:
        return
    modes = {ev.mode for d in devices for ev in d.events}
    if claim.get("mode") and modes and modes != {claim["mode"]}:
        findings.append(Finding(FAIL, "summary.mode", f"summary states mode {claim['mode']!r}, ledgers record "
                                                      f"{sorted(modes)}"))
    integer.check_claimed_mechanism(claim, devices, findings)
    # The summary states the budget the run *asked* for; each device's own policy (its ledger header)
    # decides. A device budget above the stated one would make the summary's claim false (FAIL); one
    # below it is the device's policy at work (e.g. a run that asked for more and was declined).
    budget = claim.get("epsilon_budget")
    tighter = 0
    for dev in devices:
        if budget is None or dev.budget is None:
            continue
        own = float(dev.budget["epsilon"])
        if own > float(budget):
            findings.append(Finding(FAIL, "summary.budget", f"summary states budget {budget}, ledger has "
                                                            f"{dev.budget['epsilon']}", dev.device_id))
        elif own < float(budget):
            tighter += 1
    if tighter:
        findings.append(Finding(WARN, "summary.budget", f"summary states the requested budget {budget}; "
                                                        f"{tighter} device(s) hold a smaller budget in their own "
                                                        "policy (their ledgers' budget is what they enforce)"))
    acc = claim.get("accountant", RDP)
    unit = str(claim.get("privacy_unit", EXAMPLE))
    # The claim's own unit, then the implied example-level figures a device-level summary also states.
    for key, in_unit in (("epsilon_max", unit), ("epsilon_example_max", EXAMPLE)):
        stated = claim.get(key)
        if not isinstance(stated, (int, float)) or acc not in REPORT_TOLERANCE:
            continue
        values = [eps for d in devices if (eps := d.epsilon_by_unit.get(in_unit, {}).get(acc)) is not None]
        if len(values) < sum(1 for d in devices if d.events):
            findings.append(Finding(FAIL, f"summary.{key}", f"summary states {key} per {in_unit}, but "
                                                            f"{sum(1 for d in devices if d.events) - len(values)} "
                                                            f"ledger(s) give no guarantee per {in_unit}"))
        elif values and (mismatch := _mismatch(float(stated), max(values), acc)):
            severity, why = mismatch
            findings.append(Finding(severity, f"summary.{key}", f"summary states {key} {stated:.6g}, the ledgers "
                                                                f"give {max(values):.6g} ({acc}, per {in_unit}){why}"))


def _statement(claim: dict[str, Any] | None, devices: list[DeviceAudit]) -> dict[str, Any]:
    """The claim as stated in summary.json, or rebuilt from what the ledgers record."""
    if claim and {"unit", "mode", "trust", "delta"} <= set(claim):
        return dict(claim)
    modes = sorted({ev.mode for d in devices for ev in d.events}) or ["local"]
    deltas = sorted({d.delta for d in devices if d.delta is not None}) or [1e-5]
    budgets: list[float | None] = [*sorted({float(d.budget["epsilon"]) for d in devices if d.budget})] or [None]
    accs = sorted({str(d.budget.get("accountant", RDP)) for d in devices if d.budget}) or [RDP]
    stmt = privacy_statement(modes[0], deltas[0], budgets[-1], accs[0])
    stmt["reconstructed_from_ledgers"] = True
    if len(modes) > 1 or len(deltas) > 1 or len(budgets) > 1:
        stmt["note"] = f"ledgers differ: modes {modes}, deltas {deltas}, budgets {budgets}"
    return stmt

