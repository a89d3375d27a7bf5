"""The round protocol, written once: every engine's run is :func:`run_protocol`.

Per round ``r`` (phase from ``ServerModel.phases()`` of the run's noise plan):

1. the engine's cohort; the promised ``g`` (:func:`fed_nessa.federated.release.promised_arrivals`);
2. the round config (plan fleet, server key, model ids), which the engine sends to the cohort; the
   devices answer (accepted, declined with reasons, failed; key fingerprints, epsilons);
3. key pinning (:class:`fed_nessa.federated.engine.Pins`): a device whose key changed is refused;
4. ``may_start``: fewer accepted than ``g`` and nothing is computed;
5. the engine's secure sum over the accepted devices, ``may_unmask`` on what arrived, then
   ``ServerModel.apply``;
6. the federation-ledger record of the round (:func:`round_record`; the fleet engine records its
   DP-SGD phase as spans when it closes), the evaluation cadence, the round entry, progress.

At the end: the engine's ``close`` hook, the ledger's signed end record and
:func:`fed_nessa.federated.rounds.finish_run`. The engine is the transport only
(:class:`fed_nessa.federated.engine.Engine`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fed_nessa.config import FederationConfig, Phase, RoundStatus
from fed_nessa.federated.codec import saturation_note
from fed_nessa.federated.engine import Answers, Engine, Pins, Released, RunState
from fed_nessa.federated.mechanism import public_parameters
from fed_nessa.federated.noise_plan import NoisePlan
from fed_nessa.federated.protocol import round_config, with_centre, with_clip
from fed_nessa.federated.release import may_start, may_unmask, promised_arrivals
from fed_nessa.federated.rounds import (
    CLIP_COLUMN,
    FIELD_BITS_COLUMN,
    LAST_ITERATE_COLUMN,
    LEDGER_FILE,
    Progress,
    RunOutputs,
    evaluates,
    finish_run,
    not_evaluated,
    round_entry,
)
from fed_nessa.federated.skellam_mechanism import IntegerCodec, RoundCodec, round_codec
from fed_nessa.privacy.ledger import LEDGER_HEADS, PUBLIC_PARAMETERS, FederationLedger, server_key_folder

log = logging.getLogger(__name__)


def run_protocol(engine: Engine, outputs: RunOutputs, progress: Progress | None = None) -> dict[str, Any]:
    """Run every round of the configured federation on ``engine``; returns the run's summary."""
    progress = progress or (lambda event: None)
    cfg = engine.cfg
    run_dir = Path(cfg.run_dir)
    # The private key lives in the run's key store (deployment: beside the run folder), never in it.
    ledger = FederationLedger.open(run_dir / LEDGER_FILE, server_key_folder(run_dir))
    pins, state = Pins(ledger.pinned_devices()), RunState()
    try:
        plan = engine.noise_plan()
        log.info(plan.reason)
        phases = engine.model.phases(plan.aligner)
        start = engine.start(ledger, pins, state)
        progress({"event": "start", "first_round": start, "rounds": len(phases)})
        for r in range(start, len(phases) + 1):
            entry = run_round(engine, outputs, ledger, pins, state, r, phases[r - 1], len(phases))
            state.history.append(entry)
            engine.round_done(r, len(phases), entry)
            progress({"event": "round", **entry})
        engine.close(ledger, pins)
        ledger.record_end()  # signed: a federation ledger cut back to an earlier round lacks it
        end = engine.ending()
        return finish_run(engine.model, engine.data, cfg, plan, outputs, rounds=len(state.history),
                          summary_of=end.summary_of, references=end.references, evaluation=end.evaluation,
                          card_extra=end.card_extra, progress=progress)
    finally:
        engine.release()


def run_round(engine: Engine, outputs: RunOutputs, ledger: FederationLedger, pins: Pins, state: RunState,
              r: int, phase: Phase, rounds: int) -> dict[str, Any]:
    """One round of the protocol (the module docstring's steps 1-6); returns its summary entry."""
    t0 = time.perf_counter()
    cfg, model, plan = engine.cfg, engine.model, engine.noise_plan()
    engine.before_round(r, phase)
    cohort = engine.cohort(r, phase)
    promised = promised_arrivals(cfg, len(cohort))
    clip = model.round_clip(phase)  # the adaptive clip's C_t (public), None at a fixed clip
    request = with_centre(with_clip(round_config(str(phase), r, promised, plan.fleet, ledger.key_fingerprint,
                                                 engine.data.enroll_model, engine.data.runtime_model), clip),
                          model.loss_centre(phase))
    answers = engine.ask(r, phase, cohort, request)
    mismatched = pins.check(answers)
    start = may_start(len(answers.accepted), promised)
    status, note, released, bits = RoundStatus.SKIPPED, start.reason, None, None
    if start.release:
        codec = round_codec(cfg, phase, plan, (model.d_x, model.d_y), r, promised, len(answers.accepted),
                            model.payload_bound(phase, plan), clip)
        bits = codec.params.bits if isinstance(codec, IntegerCodec) else None
        released = engine.secure_sum(r, phase, answers, request, codec, promised)
        status, note = _release(engine, state, r, phase, released, codec, promised) or (status, note)
    heads = engine.settle(r, phase, answers, released)
    arrived = released.arrived if released is not None else []
    landed = set(arrived)
    failed = answers.failed + [h for h in answers.accepted if h not in landed]
    saturated = released.saturated if released is not None and status == RoundStatus.APPLIED else 0
    evaluated = evaluates(cfg, r, rounds, phase, statistics_rounds=engine.evaluates_statistics_round)
    fed = outputs.round_row(*engine.data.evaluation(), model.comparator()) if evaluated else not_evaluated()
    if engine.records_round(phase):
        name = answers.device_id
        fields = round_record(engine.name, phase, cfg, plan, status, note, promised, saturated, answers, released,
                              pins.flush(), heads, mismatched, clip)
        ledger.record_round(r, [name(h) for h in arrived], [name(h) for h in answers.declined],
                            [name(h) for h in failed], fields)
    entry = round_entry(r, phase, status, note, fed, participants=len(arrived), declined=len(answers.declined),
                        failed=len(failed), saturated=saturated)
    if clip is not None:
        entry[CLIP_COLUMN] = clip
    if bits is not None:
        entry[FIELD_BITS_COLUMN] = bits
    if evaluated and model.average is not None:  # the average's curve beside the last iterate's, same noise
        entry[LAST_ITERATE_COLUMN] = outputs.round_row(*engine.data.evaluation(),
                                                       model.comparator(last_iterate=True))["eer"]
    return {**entry, **engine.device_epsilons(r, phase, answers, released), "seconds": time.perf_counter() - t0}


def _release(engine: Engine, state: RunState, r: int, phase: Phase, released: Released, codec: RoundCodec,
             promised: int) -> tuple[RoundStatus, str] | None:
    """The release rule on what came back, then ``ServerModel.apply``: the round's status and note
    (None: nothing came back and nothing halted, the round stays as ``may_start`` left it)."""
    if released.refused is not None:
        return RoundStatus.REFUSED, released.refused
    if released.aborted is not None:
        return RoundStatus.ABORTED, released.aborted
    if released.total is None:
        return None
    unmask = may_unmask(released.n, promised)
    if not unmask.release:  # an engine that released below g: never applied
        return RoundStatus.REFUSED, unmask.reason
    state.saturated_total += released.saturated
    diag = saturation_note(released.saturated, r)
    if diag:
        log.warning(diag)
    engine.model.apply(phase, released.total, released.n, noise_arrivals=released.noise_arrivals,
                       quantization_std=codec.device_error_std(), plan=engine.noise_plan(),
                       gradients=released.gradients)
    return RoundStatus.APPLIED, f"sum of {released.n} devices released (g = {promised})"


def round_record(engine: str, phase: Phase, cfg: FederationConfig, plan: NoisePlan, status: RoundStatus, note: str,
                 promised: int, saturated: int, answers: Answers, released: Released | None, new_pins: dict[str, str],
                 heads: dict[str, list[int | str]], mismatched: dict[str, str],
                 clip: float | None = None) -> dict[str, Any]:
    """The fields of a round's federation-ledger record (every engine's, built here only): what the
    round promised and did, why devices declined, what it sent (hashes), the keys pinned this round,
    the devices' ledger heads, the public noise parameters and (adaptive clipping) the round's clip."""
    return {"phase": str(phase), "status": str(status), "note": note, "engine": engine, "saturated": saturated,
            "guaranteed_arrivals": promised, "decline_reasons": dict(Counter(answers.reasons.values())),
            **answers.evidence, **(released.evidence if released is not None else {}),
            "device_key_fingerprints": new_pins, LEDGER_HEADS: heads,
            PUBLIC_PARAMETERS: public_parameters(phase, cfg, plan),
            **({"key_mismatch": mismatched} if mismatched else {}),
            **({CLIP_COLUMN: clip} if clip is not None else {})}
