"""The server's round loop over real devices (in-process Grid, real ClientApp, SecAgg+, ledgers):
the release checks, a hostile resume, and what the run summary says about the guarantee."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_server_secagg_round import stage_of
from test_simulation import POLICY, make_folder, overrides, simulate

from client.app import build_client_app
from client.device import DeviceRuntime, default_runtime
from fed_nessa.config import ReplyStatus
from fed_nessa.federated.device import ClientOutcome
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.privacy.ledger import DEVICE_LEDGER_NAME, DeviceLedger
from fed_nessa.randomness import REPRODUCIBLE_WARNING
from fed_nessa.sim.runner import build_config
from server.checkpoint import ResumeError


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


def _ledger_epsilons(run: Path) -> dict[str, float]:
    return {d.name: DeviceLedger.open(d, d.name).epsilon(1e-5)
            for d in sorted((run / "devices").iterdir()) if (d / DEVICE_LEDGER_NAME).is_file()}


def _spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list:
    calls: list = []
    real = getattr(module, name)

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_a_hostile_resume_asking_a_larger_budget_is_declined_by_every_device(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 1: a server that skips the resume check and asks epsilon-budget = 100.

    The devices' budget is their own (30 here, in their ledger headers): every device
    declines every further round, no epsilon grows, and the audit of the ledgers passes.
    On c5b415a the devices took the budget from the run-config and kept spending.
    """
    import server.federation
    from fed_nessa.privacy.audit import audit

    simulate(build_config(None, overrides(tmp_path, num_server_rounds=2)), quiet=True)
    run = tmp_path / "run"
    before = _ledger_epsilons(run)
    assert len(before) == 8 and all(e > 0 for e in before.values())
    monkeypatch.setattr(server.federation, "check_resumable", lambda ckpt, config: None)
    # The device policy a re-deployed fleet passes in is looser too; the headers' policy wins.
    summary = simulate(build_config(None, overrides(tmp_path, num_server_rounds=4, resume="true",
                                                    epsilon_budget=100)),
                       policy=replace(POLICY, epsilon_budget=100.0), quiet=True)
    later = summary["rounds"][2:]
    assert [r["status"] for r in later] == ["skipped", "skipped"]
    assert all(r["participants"] == 0 and r["declined"] == r["sampled"] == 6 for r in later)
    assert _ledger_epsilons(run) == before
    fed = [json.loads(line)["payload"] for line in (run / "federation-ledger.jsonl").read_text().splitlines()]
    reasons = [r for e in fed if e.get("round") in (3, 4) for r in e["extra"]["decline_reasons"]]
    assert reasons and all("epsilon budget 100" in r and "beyond this device's policy" in r for r in reasons)
    ledgers = audit(run / "devices", out_dir=tmp_path / "audit-devices")  # every ledger: intact, within budget
    assert ledgers.passed, [str(f) for f in ledgers.failures]
    # The whole run folder passes: the summary states the budget the server asked for (100), the
    # ledgers the devices' own (30); that is a warning (the devices' policy at work), not a failure.
    result = audit(run)
    assert result.passed, [str(f) for f in result.failures]
    assert any(f.check == "summary.budget" and "smaller budget in their own policy" in f.message
               for f in result.findings)


def test_resume_with_a_changed_privacy_setting_is_refused(tmp_path: Path, data: Path) -> None:
    """Defect 5 (end to end): the checkpoint's config binds a resumed run; more rounds are fine."""
    simulate(build_config(None, overrides(tmp_path, num_server_rounds=1)), quiet=True)
    with pytest.raises(ResumeError, match=r"in epsilon-budget, noise-multiplier \("):
        simulate(build_config(None, overrides(tmp_path, num_server_rounds=2, resume="true", epsilon_budget=25,
                                              noise_multiplier=0.6)), quiet=True)
    resumed = simulate(build_config(None, overrides(tmp_path, num_server_rounds=2, resume="true")), quiet=True)
    assert [r["status"] for r in resumed["rounds"]] == ["applied", "applied"]


def _declining_runtime(declining: set[str]) -> DeviceRuntime:
    """The production device runtime, except that the listed devices decline every plan."""
    real = default_runtime()

    def plan_round(req, shard, cfg, ledger, policy):  # noqa: ANN001, ANN202
        if ledger.device_id in declining:
            return ClientOutcome(ReplyStatus.DECLINED, None, {"reason": "declined: test"})
        return real.plan_round(req, shard, cfg, ledger, policy)

    return replace(real, plan_round=plan_round)


def test_no_secagg_round_starts_with_fewer_acceptances_than_g(tmp_path: Path, data: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 7 (may_start): 4 of 8 devices accept a statistics round that promised g = 7.

    The round is skipped before SecAgg+ starts: no secure sum is attempted and no device
    computes anything (no ledger spends). Fails if Federation.run_round ignores may_start.
    """
    import server.federation

    calls = _spy(monkeypatch, server.federation, "secure_sum")
    app = build_client_app(_declining_runtime({f"dev-{i:03d}" for i in range(4)}))
    summary = simulate(build_config(None, overrides(tmp_path, num_server_rounds=1)), client_app=app, quiet=True)
    [r] = summary["rounds"]
    assert (r["status"], r["declined"], r["participants"]) == ("skipped", 4, 0)
    assert "4 device(s) accepted the plan, fewer than the 7" in r["note"]
    assert calls == []
    assert all(e == 0.0 for e in _ledger_epsilons(tmp_path / "run").values())


def test_nothing_is_unmasked_or_applied_when_fewer_than_g_vectors_arrive(tmp_path: Path, data: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 3/7 (the unmask guard): 2 of 8 devices vanish after masking; g = 7.

    The round is refused: no unmask message goes out, no sum is decoded or applied, the
    model is unchanged. Fails if the guard is disabled (c5b415a unmasked, then discarded).
    """
    from fed_nessa.federated.codec import SecAggCodec

    stages: list[str | None] = []

    def drop(msg) -> bool:  # noqa: ANN001
        stage = stage_of(msg)
        stages.append(stage)
        return msg.metadata.dst_node_id in (1001, 1002) and stage == "collect_masked_vectors"

    applied = _spy(monkeypatch, ServerModel, "apply")
    decoded = _spy(monkeypatch, SecAggCodec, "decode")
    summary = simulate(build_config(None, overrides(tmp_path, num_server_rounds=1)), drop=drop, quiet=True)
    [r] = summary["rounds"]
    assert r["status"] == "refused" and r["participants"] == 0 and r["failed"] == 8
    assert "only 6 masked vector(s) arrived, fewer than the promised g = 7" in r["note"]
    assert stages.count("collect_masked_vectors") == 8 and "unmask" not in stages
    assert applied == [] and decoded == []


def test_the_run_summary_says_whether_the_guarantee_holds(tmp_path: Path, data: Path) -> None:
    """Defect 2: with reproducible-noise the summary and every ledger event say no DP guarantee holds."""
    secure = simulate(build_config(None, overrides(tmp_path, num_server_rounds=1)), quiet=True)
    assert secure["privacy"]["guarantee_holds"] is True
    replay = simulate(build_config(None, overrides(tmp_path, num_server_rounds=1, reproducible_noise="true",
                                                   run_dir=f'"{tmp_path / "replay"}"')),
                      replace(POLICY, allow_reproducible_noise=True), quiet=True)
    assert replay["privacy"]["guarantee_holds"] is False
    assert "REPRODUCIBLE NOISE" in replay["privacy"]["noise_source"]
    for d in (tmp_path / "replay" / "devices").iterdir():
        assert all(REPRODUCIBLE_WARNING in e.note for e in DeviceLedger.open(d, d.name).events())


def test_devices_whose_g_exceeds_the_promise_decline(tmp_path: Path, data: Path) -> None:
    """Defect 1/3: the rounds here promise g = 7 and 5; devices whose policy says g = 8 decline them all."""
    summary = simulate(build_config(None, overrides(tmp_path, num_server_rounds=2)),
                       policy=replace(POLICY, guaranteed_arrivals=8), quiet=True)
    assert [(r["status"], r["declined"]) for r in summary["rounds"]] == [("skipped", 8), ("skipped", 6)]
    assert summary["privacy"]["epsilon_max"] == 0.0


def test_the_round_config_names_only_public_values_and_no_cohort_size() -> None:
    """What a device is told: phase, round, the promised g and the fleet size; nothing sizes its noise.

    The Poisson rate and the calibrated sigmas follow from the run config and the (public)
    fleet size on the device; a server-chosen cohort size is not on the wire.
    """
    from fed_nessa.config import FederationConfig, Phase
    from fed_nessa.federated.protocol import FLEET_SIZE_KEY, PHASE_KEY, PROMISED_ARRIVALS_KEY, ROUND_KEY, round_config
    from server.federation import sample_cohort

    assert round_config(str(Phase.DPSGD), 3, 7, 8) == {PHASE_KEY: "dpsgd", ROUND_KEY: 3, PROMISED_ARRIVALS_KEY: 7,
                                                  FLEET_SIZE_KEY: 8}
    nodes = [10**19 + i for i in range(8)]  # Flower's node ids reach 2**64
    full = FederationConfig().replace(num_devices=8, secagg_num_shares=5, secagg_reconstruction_threshold=3,
                                      min_arrivals=3)
    assert sample_cohort(nodes, full, 2, Phase.DPSGD) == nodes  # clients-per-round = 0: every device
    some = full.replace(clients_per_round=6)
    cohort = sample_cohort(nodes, some, 2, Phase.DPSGD)
    assert len(cohort) == 6 and set(cohort) <= set(nodes) and cohort == sample_cohort(nodes, some, 2, Phase.DPSGD)
    assert sample_cohort(nodes, some, 1, Phase.SUFFSTATS) == nodes  # the statistics round: every device once


def test_the_noise_plan_is_built_once_per_run(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: the Flower engine builds its noise plan once (from the fleet connected at the start),
    and every round's public parameters name that plan's fleet. It built one more per round before."""
    import server.federation

    calls = _spy(monkeypatch, server.federation, "noise_plan")
    simulate(build_config(None, overrides(tmp_path, num_server_rounds=2)), quiet=True)
    assert [args[1] for args in calls] == [8]  # one plan, for the 8 connected devices
