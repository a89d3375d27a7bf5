"""End-to-end simulations: real ServerApp loop, real ClientApp, real SecAgg+, real DP rounds and ledgers.

Runs over a tiny folder data source (8 devices, 12/16-d embeddings, a 16-wide
aligner) so each run takes seconds on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fed_nessa.config import ConfigError, DevicePolicy, FederationConfig
from fed_nessa.data.shards import make_shard, write_shard
from fed_nessa.sim import runner
from fed_nessa.sim.runner import build_config, main

torch.set_num_threads(1)
ROUND_KEYS = {"round", "eer", "min_dcf", "sid_top1", "participants", "declined", "failed", "seconds"}
#: Every virtual device's own policy: a budget as large as the runs ask, and g = 3 (the rounds here
#: promise g = max(min-arrivals 3, ceil(0.8 x cohort)) = 5 for 6 sampled devices, 7 for all 8).
POLICY = DevicePolicy(epsilon_budget=30.0, guaranteed_arrivals=3)


def simulate(cfg: FederationConfig, policy: DevicePolicy = POLICY, **kwargs: object) -> dict:
    return runner.simulate(cfg, policy=policy, **kwargs)


def make_folder(folder: Path, devices: int = 8, seed: int = 0, dx: int = 16, dy: int = 12) -> Path:
    """Devices of 2 speakers x 10 utterances from two random non-linear 'models', plus eval.npz."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(8, dx)), rng.normal(size=(8, dy))

    def emb(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.tanh(z @ a) + 0.1 * rng.normal(size=(len(z), dx)),
                np.tanh(z @ b) + 0.1 * rng.normal(size=(len(z), dy)))

    folder.mkdir(parents=True, exist_ok=True)
    for d in range(devices):
        lab = np.repeat([0, 1], 10)
        x, y = emb(rng.normal(size=(2, 8))[lab] + 0.3 * rng.normal(size=(20, 8)))
        write_shard(folder / f"dev-{d:03d}.shard.safetensors", make_shard(x, y, lab, "mx", "my"))
    lab, utt = np.repeat(np.arange(12), 14), np.tile(np.arange(14), 12)
    x, y = emb(rng.normal(size=(12, 8))[lab] + 0.3 * rng.normal(size=(len(lab), 8)))
    np.savez(folder / "eval.npz", speaker=lab, utterance=utt, old_model="mx", new_model="my",
             **{"emb:mx": x.astype(np.float32), "emb:my": y.astype(np.float32)})
    return folder


def overrides(tmp_path: Path, **extra: object) -> list[str]:
    base = {"data-source": f'"{tmp_path / "data"}"', "run-dir": f'"{tmp_path / "run"}"', "num-devices": 8,
            "clients-per-round": 6, "secagg-num-shares": 5, "secagg-reconstruction-threshold": 3,
            "min-arrivals": 3, "num-server-rounds": 3, "hidden": 16, "depth": 1, "epsilon-budget": 30,
            "seed": 0, "noise-multiplier": 1.0, "suffstats-noise-multiplier": 1.0, "batch-size": 16, "server-lr": 1.0,
            # DP-SGD rounds are what these runs test: aligner auto would ship the linear start alone
            # for 8 devices; SGD with momentum is the optimiser server-lr 1.0 is sized for.
            "aligner": '"nessa"', "server-optimizer": '"sgd"'}
    base.update({k.replace("_", "-"): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


def test_run_folder_has_every_required_key_and_file(tmp_path: Path, data: Path) -> None:
    # no validation.npz in the folder: ship-without-validation lets the pinned DP NESSA ship (and its ONNX)
    summary = simulate(build_config(None, overrides(tmp_path, ship_without_validation="true")), quiet=True)
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert set(on_disk) >= {"config", "rounds", "final", "privacy", "secure_aggregation"}
    assert len(on_disk["rounds"]) == 3 and all(ROUND_KEYS <= set(r) for r in on_disk["rounds"])
    assert [r["status"] for r in on_disk["rounds"]] == ["applied"] * 3
    assert on_disk["rounds"][0]["phase"] == "suffstats"
    final = on_disk["final"]
    for key in ("eer", "min_dcf", "sid_top1", "gap_closure", "centralised_nessa", "ridge", "aligner_plan", "gate"):
        assert key in final
    # aligner = nessa pins DP NESSA; untested (no validation set) because the run config says so
    assert "aligner nessa" in final["aligner_plan"] and final["gate"]["shipped"] == "dp-nessa"
    assert "ship-without-validation = true" in final["gate"]["reason"] and final["eer"] == final["dp_nessa"]["eer"]
    priv = on_disk["privacy"]
    for key in ("unit", "mode", "trust", "delta", "accountant", "epsilon_budget", "epsilon_max", "epsilon_median",
                "device_ledger_pattern", "num_device_ledgers"):
        assert key in priv
    assert priv["mode"] == "distributed" and 0 < priv["epsilon_max"] <= 30
    # one pattern and a count, not one path per device
    ledgers = sorted(run.glob(priv["device_ledger_pattern"].replace("{device_id}", "*")))
    assert priv["num_device_ledgers"] == len(ledgers) == 8 and "device_ledgers" not in priv
    sa = on_disk["secure_aggregation"]
    assert sa["num_shares"] == 5 and sa["reconstruction_threshold"] == 3 and sa["saturated_coordinates"] == 0
    for name in ("report.md", "eer-per-round.png", "epsilon-per-round.png", "federation-ledger.jsonl",
                 "aligner/aligner.safetensors", "aligner/card.json", "aligner/aligner.onnx"):
        assert (run / name).is_file(), name
    assert summary["final"]["eer"] == final["eer"]
    fed_rounds = [json.loads(line) for line in (run / "federation-ledger.jsonl").read_text().splitlines()]
    joined = [e["payload"]["joined"] for e in fed_rounds if e.get("kind") == "round"]
    # Round 1 is the sufficient-statistics round: every device contributes once (8); then 6 sampled.
    assert [len(j) for j in joined] == [8, 6, 6] and all(d.startswith("dev-") for d in joined[0])


def test_resume_continues_from_the_last_checkpoint(tmp_path: Path, data: Path) -> None:
    first = simulate(build_config(None, overrides(tmp_path, num_server_rounds=2)), quiet=True)
    resumed = simulate(build_config(None, overrides(tmp_path, num_server_rounds=3, resume="true")), quiet=True)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    for a, b in zip(first["rounds"], resumed["rounds"][:2], strict=True):
        assert a == b  # restored from the checkpoint, not re-run
    fresh = simulate(build_config(None, overrides(tmp_path, num_server_rounds=3, run_dir=f'"{tmp_path / "r2"}"')),
                     quiet=True)
    assert [r["participants"] for r in fresh["rounds"]] == [r["participants"] for r in resumed["rounds"]]


def test_bad_shard_fails_its_device_and_the_rounds_go_on(tmp_path: Path, data: Path) -> None:
    (data / "dev-002.shard.safetensors").write_bytes(b"garbage")
    summary = simulate(build_config(None, overrides(tmp_path, clients_per_round=8, secagg_num_shares=7,
                                                    secagg_reconstruction_threshold=4)), quiet=True)
    rounds = summary["rounds"]
    assert all(r["status"] == "applied" for r in rounds)
    assert all(r["failed"] == 1 and r["participants"] == 7 for r in rounds)
    # The Flower engine's gate: a folder without validation.npz ships nothing by default
    final, run = summary["final"], tmp_path / "run"
    assert final["gate"]["shipped"] == "none" and "no server-side validation set" in final["gate"]["reason"]
    assert final["eer"] == final["sym_before"]["eer"] and final["dp_nessa"]["eer"] != final["eer"]
    assert not (run / "aligner" / "aligner.onnx").exists() and (run / "aligner" / "card.json").is_file()
    assert (run / "report.md").read_text().splitlines()[2].startswith("**Shipped: nothing")


def test_devices_decline_when_the_budget_is_spent(tmp_path: Path, data: Path) -> None:
    summary = simulate(build_config(None, overrides(tmp_path, epsilon_budget=6, num_server_rounds=3)), quiet=True)
    statuses = [r["status"] for r in summary["rounds"]]
    assert statuses[0] == "applied" and statuses[-1] == "skipped"
    assert summary["rounds"][-1]["declined"] == 6
    assert summary["privacy"]["epsilon_max"] <= 6 and summary["privacy"]["devices_within_budget"]


def test_saturating_devices_fail_on_the_device_and_the_run_goes_on(tmp_path: Path, data: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 4: a vector that would saturate SecAgg+'s range fails on its device, not at the server.

    With a payload bound far below what devices send, every device refuses to send its vector
    (SaturationError in ``encode``), so nothing arrives and nothing is released; the run ends
    normally. c5b415a let the vectors be clipped and raised SaturationError at the server.
    """
    from fed_nessa.federated.server_model import ServerModel

    monkeypatch.setattr(ServerModel, "payload_bound", lambda self, phase, plan: 1e-3)
    # Flower's quantizer range (the Gaussian shares); the integer mechanism projects onto its bound instead
    summary = simulate(build_config(None, overrides(tmp_path, num_server_rounds=1, distributed_mechanism='"gaussian"')),
                       quiet=True)
    [r] = summary["rounds"]
    assert r["status"] in ("refused", "aborted") and r["participants"] == 0 and r["failed"] == 8
    assert summary["secure_aggregation"]["saturated_coordinates"] == 0


def test_bad_config_is_one_clear_error_before_any_round(tmp_path: Path, data: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="secagg-reconstruction-threshold"):
        build_config(None, overrides(tmp_path, secagg_reconstruction_threshold=9))
    assert main(["--set", "clip-norm=-1", "--run-dir", str(tmp_path / "x")]) == 2
    assert "clip-norm = -1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_summary_config_names_no_machine_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fed_nessa.evaluation.run_folder import portable_config as _portable_config

    monkeypatch.chdir(tmp_path)
    out = _portable_config({"run-dir": str(tmp_path / "results" / "run-a"), "data-source": "/elsewhere/shards",
                            "seed": 0})
    assert out == {"run-dir": "results/run-a", "data-source": "shards", "seed": 0}


def test_report_names_only_the_parameters_each_phase_used() -> None:
    from fed_nessa.evaluation.run_folder import _phase_lines

    cfg = {"linear-start": "suffstats", "suffstats-rounds": 1, "num-server-rounds": 1, "clients-per-round": 100,
           "suffstats-noise-multiplier": 0.64, "noise-multiplier": 1.5, "clip-norm": 1.0}
    lines = _phase_lines(cfg, "distributed")
    assert any("noise multiplier 0.64" in line for line in lines)
    assert not any("DP-SGD" in line or "1.5" in line for line in lines)
    assert any("DP-SGD: 5 round(s), 100 devices" in line for line in _phase_lines({**cfg, "num-server-rounds": 6},
                                                                                      "distributed"))
    assert not any("loss" in line for line in _phase_lines({**cfg, "num-server-rounds": 6}, "distributed"))
    centred = _phase_lines({**cfg, "num-server-rounds": 6, "loss-centre": "enrollment-mean"}, "distributed")
    assert any("cosine loss taken about the mean enrollment embedding of the released statistics" in line
               for line in centred)


def test_report_states_the_calibrated_sigmas_and_full_participation() -> None:
    """With a budget split the report's sigmas are the noise plan's, not the config keys' (a claim in an
    output must be exactly true)."""
    from fed_nessa.evaluation.run_folder import _phase_lines

    cfg = {"linear-start": "suffstats", "suffstats-rounds": 1, "num-server-rounds": 3,
           "suffstats-noise-multiplier": 0.64, "noise-multiplier": 1.5, "clip-norm": 1.0, "clients-per-round": 0}
    plan = {"suffstats_sigma": 1.8234, "dpsgd_sigma": 0.7083, "sample_rate": 0.02, "reason": "aligner nessa"}
    text = "\n".join(_phase_lines(cfg, "distributed", plan, [{"phase": "suffstats"}, {"phase": "dpsgd"}]))
    assert "noise multiplier 1.823" in text and "noise multiplier 0.7083" in text and "0.64" not in text
    assert "every device in every round" in text and "q 0.02" in text and "1 round(s)" in text
