"""Checks that tie together what two parties signed, and what no party could re-sign alone.

A hash chain proves that no entry was edited, inserted or reordered, but not that the
newest ones were not dropped: what remains of a cut ledger is still validly signed. And a
party with its own key can sign anything it likes. So the audit also holds each record
against the other party's:

* **ledger heads**: the server signs each participating device's ledger head (seq and
  SHA-256 of its last entry) into its record of the round; a device ledger that no longer
  reaches that head was cut (or rewritten) after the server saw it;
* **end-of-run record**: the federation ledger's last entry must be the server's signed
  ``end`` record (the last round, the rounds run, the digest of the final heads); without it
  the run did not finish or its newest rounds were cut;
* **public parameters**: every device event's noise multiplier, clip norm, sample rate, unit,
  mechanism and mode must equal what the server signed for that round;
* **participants**: ``summary.json``'s participant count of each round must equal the
  federation ledger's;
* **noise source**: an event whose noise came from a public seed gives no guarantee, and a
  summary that says ``guarantee_holds: false`` never passes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fed_nessa.privacy.audit.findings import FAIL, DeviceAudit, Finding, format_rounds
from fed_nessa.privacy.events import PUBLIC_FIELDS, PUBLIC_SEED, DPEvent
from fed_nessa.privacy.ledger import END, LEDGER_HEADS, PUBLIC_PARAMETERS, ROUND, SPAN, final_heads, heads_digest
from fed_nessa.randomness import REPRODUCIBLE_WARNING


# ----------------------------------------------------------------------------- noise source
def public_seed(ev: DPEvent) -> bool:
    """The event's noise came from a public seed: the structured field, or (ledgers written before
    it existed) the fixed warning every such event's note carries."""
    return ev.noise_source == PUBLIC_SEED or (not ev.noise_source and REPRODUCIBLE_WARNING in ev.note)


def check_noise_source(dev: DeviceAudit, findings: list[Finding]) -> None:
    """One FAIL per device whose events used public-seed noise: nothing it spent is protected."""
    seqs = [seq for ev, (_a, _b, seq) in zip(dev.events, dev.reserve_spans, strict=True) if public_seed(ev)]
    if seqs:
        findings.append(Finding(FAIL, "noise.public_seed",
                                f"{len(seqs)} event(s) drew their noise from a public seed (reproducible-noise): "
                                "anyone who knows the seed can subtract it, so NO differential-privacy "
                                "guarantee holds for what this device sent", dev.device_id, seqs[0]))


def check_summary_guarantee(claim: dict[str, Any] | None, findings: list[Finding]) -> None:
    """A run whose own summary says its guarantee does not hold never passes."""
    if claim is not None and claim.get("guarantee_holds") is False:
        findings.append(Finding(FAIL, "summary.guarantee",
                                "summary.json states guarantee_holds: false (the run's noise came from a public "
                                f"seed): {claim.get('noise_source', 'no guarantee')}"))


# ----------------------------------------------------------------------------- the tails
def check_end_record(entries: list[dict[str, Any]], findings: list[Finding]) -> None:
    """The last entry is the signed end-of-run record, and every end record agrees with what precedes it."""
    body = [e for e in entries[1:] if e]
    if not body or body[-1].get("kind") != END:
        findings.append(Finding(FAIL, "federation.end",
                                "the federation ledger does not end with the server's signed end-of-run record: "
                                "the run did not finish, its newest rounds were cut, or the ledger predates "
                                "end records (then it cannot prove its own length)", "server"))
    before: list[dict[str, Any]] = []
    for e in body:
        if e.get("kind") in (ROUND, SPAN):
            before.append(e["payload"])
        elif e.get("kind") == END:
            _check_one_end(e, before, findings)


def _check_one_end(entry: dict[str, Any], before: list[dict[str, Any]], findings: list[Finding]) -> None:
    payload = entry.get("payload") or {}
    rounds: set[int] = set()
    for p in before:
        first, last = (p.get("first_round"), p.get("last_round")) if "first_round" in p else (p.get("round"),) * 2
        if isinstance(first, int) and isinstance(last, int):
            rounds.update(range(first, last + 1))
    want = {"last_round": max(rounds) if rounds else 0, "rounds": len(rounds),
            "heads_digest": heads_digest(final_heads(before))}
    wrong = [k for k, v in want.items() if payload.get(k) != v]
    if wrong:
        findings.append(Finding(FAIL, "federation.end",
                                f"the end-of-run record's {', '.join(wrong)} do(es) not match the entries before it "
                                f"(recorded {[payload.get(k) for k in wrong]}, entries give "
                                f"{[want[k] for k in wrong]})", "server", entry.get("seq")))


def check_ledger_heads(payloads: list[dict[str, Any]], by_id: dict[str, DeviceAudit],
                       findings: list[Finding]) -> None:
    """Every ledger head the server signed must be an entry of that device's ledger, hash and all."""
    seen: set[tuple[str, int, str]] = set()
    for payload in payloads:
        heads = (payload.get("extra") or {}).get(LEDGER_HEADS) or {}
        if not isinstance(heads, dict):
            findings.append(Finding(FAIL, "federation.schema", f"extra.{LEDGER_HEADS} must be an object", "server"))
            continue
        where = (f"round {payload['round']}" if "round" in payload
                 else f"rounds {payload.get('first_round')}..{payload.get('last_round')}")
        for device_id, head in heads.items():
            if not (isinstance(head, list) and len(head) == 2 and isinstance(head[0], int)
                    and isinstance(head[1], str)):
                findings.append(Finding(FAIL, "federation.schema", f"{where}: ledger head {head!r} is not "
                                                                   "[seq, sha256]", str(device_id)))
                continue
            key = (str(device_id), head[0], head[1])
            dev = by_id.get(str(device_id))
            if key in seen or dev is None:  # (a joined device without a ledger is its own failure)
                continue
            seen.add(key)
            if head[0] >= len(dev.entry_hashes):
                findings.append(Finding(FAIL, "evidence.ledger_head",
                                        f"{where}: the server signed this device's ledger head at seq {head[0]}, but "
                                        f"its ledger ends at seq {len(dev.entry_hashes) - 1}: entries after it were "
                                        "cut", str(device_id)))
            elif dev.entry_hashes[head[0]] != head[1]:
                findings.append(Finding(FAIL, "evidence.ledger_head",
                                        f"{where}: the ledger's entry at seq {head[0]} is not the one the server "
                                        "signed as its head: the ledger was rewritten after the round",
                                        str(device_id), head[0]))


# ----------------------------------------------------------------------------- public parameters
def parameters_by_round(rounds: list[dict[str, Any]],
                        spans: list[tuple[int, int, dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """round -> the public DP parameters the server signed for it (rounds without any are absent)."""
    out: dict[int, dict[str, Any]] = {}
    for rec in rounds:
        params = (rec.get("extra") or {}).get(PUBLIC_PARAMETERS)
        if isinstance(params, dict) and isinstance(rec.get("round"), int):
            out[rec["round"]] = params
    for first, last, rec in spans:
        params = (rec.get("extra") or {}).get(PUBLIC_PARAMETERS)
        if isinstance(params, dict):
            for r in range(first, last + 1):
                out[r] = params
    return out


def check_parameters(devices: list[DeviceAudit], params: dict[int, dict[str, Any]],
                     findings: list[Finding]) -> None:
    """Each event's public parameters must equal the server's signed ones for its first round."""
    for dev in devices:
        for ev, (_a, _b, seq) in zip(dev.events, dev.reserve_spans, strict=True):
            want = params.get(ev.round)
            if want is None:
                continue
            # (a null field, e.g. a sample rate that depends on a device's private pair count, is not checked)
            wrong = [k for k in PUBLIC_FIELDS if want.get(k) is not None and getattr(ev, k) != want[k]]
            if wrong:
                findings.append(Finding(FAIL, "params.mismatch",
                                        f"round {ev.round}: the device's event has "
                                        + ", ".join(f"{k} {getattr(ev, k)!r}" for k in wrong)
                                        + "; the server signed " + ", ".join(f"{k} {want[k]!r}" for k in wrong)
                                        + " for that round", dev.device_id, seq))


# ----------------------------------------------------------------------------- participants
def recorded_participants(rounds: list[dict[str, Any]],
                          spans: list[tuple[int, int, dict[str, Any], dict[str, list[int]]]]) -> dict[int, int]:
    """round -> devices whose contribution the server records as in the round (joined, less drop-outs)."""
    counts: dict[int, int] = defaultdict(int)
    for rec in rounds:  # a round re-run after a crash is recorded again: its last record counts
        if isinstance(rec.get("round"), int):
            counts[rec["round"]] = len(rec.get("joined") or [])
    for first, last, rec, dropped in spans:
        gone: dict[int, int] = defaultdict(int)
        for rs in dropped.values():
            for r in rs:
                gone[r] += 1
        for r in range(first, last + 1):
            counts[r] += len(rec.get("joined") or []) - gone[r]
    return dict(counts)


def check_summary_rounds(summary: dict[str, Any] | None, counts: dict[int, int], findings: list[Finding]) -> None:
    """``summary.json``'s per-round participants (unsigned) must equal the federation ledger's (signed)."""
    rows = (summary or {}).get("rounds")
    if not isinstance(rows, list):
        return
    stated: dict[int, int] = {}
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("round"), int) and isinstance(row.get("participants"), int):
            stated[row["round"]] = row["participants"]
    wrong = sorted(r for r in set(stated) | set(counts) if stated.get(r, 0) != counts.get(r, 0))
    if wrong:
        r = wrong[0]
        findings.append(Finding(FAIL, "summary.participants",
                                f"summary.json states {stated.get(r, 0)} participant(s) in round {r}, the federation "
                                f"ledger records {counts.get(r, 0)} ({len(wrong)} round(s) differ: "
                                f"{format_rounds([(x, x) for x in wrong])})"))
