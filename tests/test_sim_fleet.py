"""The fleet engine: held to the Flower engine round by round, and its fast numerics to its exact ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from fed_nessa.config import DevicePolicy, FederationConfig, FleetNumerics, Phase, from_run_config
from fed_nessa.federated.codec import make_codec
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.model.aligners.nessa import NessaConfig, NessaNet
from fed_nessa.model.losses import get_loss
from fed_nessa.privacy.audit import audit
from fed_nessa.privacy.ledger import DeviceLedger
from fed_nessa.sim.fleet_numerics import encode_all, fast_rounding, modular_sum
from fed_nessa.sim.ghost import clipped_gradient_sums

DEVICES = 12
#: These runs replay the noise (reproducible-noise = true), so their devices must allow it.
POLICY = DevicePolicy(guaranteed_arrivals=8, allow_reproducible_noise=True)


def _cfg(tmp: Path, name: str, **over: Any) -> FederationConfig:
    base = {"num-devices": DEVICES, "num-server-rounds": 3, "clients-per-round": 0, "min-arrivals": 8,
            "secagg-num-shares": 5, "secagg-reconstruction-threshold": 3, "sample-rate": 0.2,
            "suffstats-noise-multiplier": 1.0, "noise-multiplier": 1.5, "aligner": "nessa", "eval-speakers": 20,
            "validation-speakers": 20, "reproducible-noise": True, "fleet-numerics": "exact", "hidden": 8,
            "server-optimizer": "sgd", "server-lr": 0.05, "run-dir": str(tmp / name)}
    base.update(over)
    return from_run_config(base)


def test_ghost_clipping_equals_per_example_gradients() -> None:
    """Ghost norms and clipped sums equal those of explicit per-example gradients (torch.func)."""
    torch.manual_seed(0)
    net = NessaNet(6, 5, NessaConfig(hidden=4, depth=2, train_linear=True), seed=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(9, 5), torch.randn(9, 6)
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    loss = get_loss("cosine")
    per_ex = vmap(grad(lambda p, xi, yi: loss(functional_call(net, p, (yi[None],)), xi[None]).sum()),
                  in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([per_ex[k].reshape(9, -1) for k in params], 1)
    norms = flat.norm(dim=1)
    factor = (0.3 / (norms + 1e-6)).clamp(max=1.0)
    sums, got_norms = clipped_gradient_sums(net, x, y, 0.3)
    assert torch.allclose(got_norms, norms, atol=1e-5)
    assert torch.allclose(sums, (factor[:, None] * flat).sum(0), atol=1e-5)
    seg = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    per_device, _ = clipped_gradient_sums(net, x, y, 0.3, segments=seg, groups=3)
    want = torch.zeros(3, flat.shape[1]).index_add_(0, seg, factor[:, None] * flat)
    assert torch.allclose(per_device, want, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"loss-centre": "enrollment-mean"}], ids=["plain", "mean-free"])
def test_fleet_engine_equals_the_flower_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        applied_sums: list[tuple[str, np.ndarray, int]], extra: dict[str, Any]) -> None:
    """Same seeds (reproducible-noise), 12 devices, example level, the plain loss or the loss about the released
    mean: the same released aggregate every round within SecAgg+'s quantization error, and the same epsilon in
    every device's ledger."""
    from fed_nessa.sim.fleet import run_fleet
    from fed_nessa.sim.runner import simulate

    seen = applied_sums
    flower = simulate(_cfg(tmp_path, "flower", **extra), policy=POLICY, quiet=True)
    flower_sums = list(seen)
    seen.clear()
    fleet = run_fleet(_cfg(tmp_path, "fleet", **extra), POLICY)
    fleet_sums = list(seen)
    assert [s[0] for s in flower_sums] == [s[0] for s in fleet_sums] == ["suffstats", "dpsgd", "dpsgd"]
    cfg = _cfg(tmp_path, "bounds")
    model, plan = ServerModel(cfg, 256, 192, "x", "y"), noise_plan(cfg, DEVICES)
    for (phase, a, n_a), (_, b, n_b) in zip(flower_sums, fleet_sums, strict=True):
        assert n_a == n_b == DEVICES
        codec = make_codec(model.payload_bound(Phase(phase), plan), cfg.secagg_clipping_range,
                           cfg.secagg_quantization_range, DEVICES)
        # Each engine's sum carries its own stochastic rounding, at most n steps per coordinate
        # (SecAggCodec.sum_error_bound); float32 arithmetic adds far less than that.
        assert np.abs(a - b).max() <= 2 * codec.sum_error_bound(DEVICES) + 1e-5 * np.abs(a).max(), phase
    for i in range(DEVICES):
        dev = f"device-{i:05d}"
        eps = [DeviceLedger.open(tmp_path / run / "devices" / dev, dev).epsilon(POLICY.delta)
               for run in ("flower", "fleet")]
        assert eps[0] == pytest.approx(eps[1], rel=1e-9)
    assert fleet["engine"]["name"] == "fleet" and "masks" in fleet["engine"]
    assert flower["privacy"]["guarantee_holds"] is False and fleet["privacy"]["guarantee_holds"] is False
    for run in ("flower", "fleet"):  # public-seed noise never passes; every other check does
        assert {f.check for f in audit(tmp_path / run).failures} == {"noise.public_seed", "summary.guarantee"}


def _dpsgd_round_at_hand(tmp: Path, name: str, **over: Any) -> tuple[Any, Any, list[int], Any, np.ndarray]:
    """A fleet engine with its ledgers open and round 2's codec and rates: a DP-SGD round to drive by hand."""
    from fed_nessa.data.registry import load_federation_data
    from fed_nessa.sim.fleet import FleetEngine

    cfg = _cfg(tmp, name, **{"num-server-rounds": 2, **over})
    engine = FleetEngine(cfg, POLICY, load_federation_data(cfg, None))
    arrived = list(range(DEVICES))
    codec = make_codec(engine.model.payload_bound(Phase.DPSGD, engine.plan), cfg.secagg_clipping_range,
                       cfg.secagg_quantization_range, DEVICES)
    return engine, engine._open_ledgers(), arrived, codec, engine._rates(arrived)


def test_fast_numerics_agree_with_exact_in_distribution(tmp_path: Path) -> None:
    """Over repeated draws at a fixed model, the fast round's aggregate has the exact round's mean and
    per-coordinate noise variance (the distribution-equivalent claim of fleet-numerics = fast)."""
    engine, book, arrived, codec, q = _dpsgd_round_at_hand(tmp_path, "dist", **{"reproducible-noise": False})
    draws: dict[str, list[np.ndarray]] = {"exact": [], "fast": []}
    for _ in range(40):
        payloads, sent, _ = encode_all(engine._exact_vectors(arrived, book, 2, q), arrived, codec)
        draws["exact"].append(modular_sum(payloads, codec))
        rows, _ = engine._sample(arrived, 2, q)
        draws["fast"].append(engine._fast_gradient_total(rows, arrived, book, 2, codec))
    exact, fast = (np.stack(draws[m]).astype(np.float64) for m in ("exact", "fast"))
    var_ratio = fast.var(axis=0).mean() / exact.var(axis=0).mean()
    assert 0.8 < var_ratio < 1.25
    # means agree within the standard error of 40 draws (averaged over coordinates)
    se = np.sqrt((exact.var(axis=0) + fast.var(axis=0)) / 40)
    z = (fast.mean(axis=0) - exact.mean(axis=0)) / se
    assert abs(float(z.mean())) < 0.2 and 0.7 < float(z.std()) < 1.3
    assert engine.numerics == FleetNumerics.EXACT  # both paths were driven explicitly above


def test_fast_numerics_replay_under_reproducible_noise(tmp_path: Path) -> None:
    """reproducible-noise: a fast round's released sum (noise share AND rounding errors) is the same on
    every replay of the same round, and differs from another round's."""
    engine, book, arrived, codec, q = _dpsgd_round_at_hand(tmp_path, "replay", **{"fleet-numerics": "fast"})

    def released(r: int) -> np.ndarray:
        rows, _ = engine._sample(arrived, r, q)
        return engine._fast_gradient_total(rows, arrived, book, r, codec)

    assert np.array_equal(released(2), released(2))
    assert not np.array_equal(released(2), released(3))
    zero = np.zeros(5)
    assert np.array_equal(*(fast_rounding(zero, DEVICES, codec, engine.cfg, 2) for _ in range(2)))


def test_a_harmful_run_ships_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Huge noise: both aligners are far worse than not updating on the validation speakers, so the run
    ships nothing: the final figures are not updating's, no ONNX is written and ``apply`` refuses."""
    from fed_nessa.cli import main
    from fed_nessa.data.registry import load_federation_data
    from fed_nessa.evaluation.protocol import evaluate_held_out
    from fed_nessa.sim.fleet import run_fleet

    cfg = _cfg(tmp_path, "harm", **{"suffstats-noise-multiplier": 30.0, "noise-multiplier": 30.0, "references": False})
    final = run_fleet(cfg, POLICY)["final"]
    gate = final["gate"]
    assert gate["shipped"] == "none" and gate["aligner"] == "dp-nessa"
    val = gate["validation_eer"]
    assert min(val["linear-start"], val["dp-nessa"]) > val["none"]
    not_updating = evaluate_held_out(*load_federation_data(cfg, None).evaluation(), {}).row("sym_before")
    assert final["eer"] == not_updating.metrics.eer and final["dp_nessa"]["eer"] > final["eer"]
    run = tmp_path / "harm"
    assert json.loads((run / "aligner" / "card.json").read_text())["training"]["shipped"] is False
    assert not (run / "aligner" / "aligner.onnx").exists()
    assert (run / "report.md").read_text().splitlines()[2].startswith(
        "**Shipped: nothing (keep the current runtime model).** Aligner = nessa pins DP NESSA; DP NESSA does not beat")
    np.save(tmp_path / "in.npy", np.zeros((2, 192), np.float32))
    capsys.readouterr()
    assert main(["apply", "--aligner", str(run / "aligner"), "--input", str(tmp_path / "in.npy"),
                 "--output", str(tmp_path / "out.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not shipped by its run's promotion gate" in err[0] and not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize(("devices", "validation", "ship_untested", "shipped"), [
    (150, 20, False, "linear-start"),  # a linear-start-only run (aligner auto) that beats not updating
    (12, 0, False, "none"),  # no validation set: nothing ships...
    (12, 0, True, "linear-start"),  # ...unless the operator says so
])
def test_the_gate_runs_for_a_linear_start_only_run(tmp_path: Path, devices: int, validation: int,
                                                   ship_untested: bool, shipped: str) -> None:
    from fed_nessa.sim.fleet import run_fleet

    cfg = _cfg(tmp_path, "run", **{"num-devices": devices, "num-server-rounds": 1, "aligner": "auto",
                                   "dp-mode": "none", "references": False, "validation-speakers": validation,
                                   "ship-without-validation": ship_untested})
    final = run_fleet(cfg, DevicePolicy(guaranteed_arrivals=8, allow_non_dp=True))["final"]
    assert final["gate"]["shipped"] == shipped and "dp_nessa" not in final
    if shipped == "linear-start":
        assert final["eer"] == final["linear_start"]["eer"]
        assert (tmp_path / "run" / "aligner" / "aligner.onnx").is_file()
    if not validation:
        assert set(final["gate"]["validation_eer"].values()) == {None}
        assert "ship-without-validation" in final["gate"]["reason"]


def test_a_fleet_run_with_the_ledger_store_equals_one_with_files_and_passes_its_audit(tmp_path: Path) -> None:
    """ledger-layout = sqlite: the same spending in one store (no per-device files), named in the summary,
    the same epsilons as the file layout, and `fed-nessa audit` reads it and passes."""
    from fed_nessa.privacy.audit import audit
    from fed_nessa.sim.fleet import run_fleet

    files = run_fleet(_cfg(tmp_path, "files", **{"reproducible-noise": False}), POLICY)
    store = run_fleet(_cfg(tmp_path, "store", **{"reproducible-noise": False, "ledger-layout": "sqlite"}), POLICY)
    assert store["privacy"]["ledger_layout"] == "sqlite" and files["privacy"]["ledger_layout"] == "files"
    assert not (tmp_path / "store" / "devices").exists() and (tmp_path / "files" / "devices").is_dir()
    assert store["privacy"]["epsilon_max"] == pytest.approx(files["privacy"]["epsilon_max"])
    result = audit(tmp_path / "store", write=False)
    assert result.passed, result.failures[:3]


def test_the_flower_engine_refuses_the_ledger_store(tmp_path: Path) -> None:
    from fed_nessa.sim.runner import run_engine

    with pytest.raises(ValueError, match="every device keeps its own ledger file"):
        run_engine(_cfg(tmp_path, "f", **{"ledger-layout": "sqlite"}), POLICY, engine="flower", quiet=True)
    assert not (tmp_path / "f").exists()


def test_replace_replaces_a_run_kept_in_the_ledger_store(tmp_path: Path) -> None:
    """--replace proves a store-backed run its own (the store file, the seed in the key store) and replaces it."""
    from fed_nessa.sim.runner import run_engine

    cfg = _cfg(tmp_path, "run", **{"ledger-layout": "sqlite"})
    run_engine(cfg, POLICY, engine="fleet", quiet=True)
    assert (tmp_path / "run" / "ledger-store.sqlite").is_file()
    (tmp_path / "run" / "summary.json").write_text("{}")  # the replaced run's summary must go
    summary = run_engine(cfg, POLICY, engine="fleet", quiet=True, replace=True)
    assert summary["privacy"]["ledger_layout"] == "sqlite"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]["ledger_layout"] == "sqlite"


def test_a_run_with_the_weight_average_ships_the_average_and_records_both_curves(tmp_path: Path) -> None:
    """server-ema: every evaluated DP-SGD round states the average's EER and the last iterate's, the
    statistics round has no average, and the run's DP NESSA candidate (gated, and saved if shipped) is the
    average: its held-out EER is the last round's ``eer``, not the last iterate's."""
    from fed_nessa.federated.rounds import LAST_ITERATE_COLUMN
    from fed_nessa.sim.fleet import run_fleet

    cfg = _cfg(tmp_path, "ema", **{"server-ema": 0.5, "num-server-rounds": 4, "references": False,
                                   "server-lr": 0.5})
    summary = run_fleet(cfg, POLICY)
    assert summary["config"]["server-ema"] == 0.5
    rounds = summary["rounds"]
    assert LAST_ITERATE_COLUMN not in rounds[0]  # the statistics round: nothing averaged yet
    dpsgd = [r for r in rounds if r["phase"] == str(Phase.DPSGD)]
    assert len(dpsgd) == 3 and all(isinstance(r[LAST_ITERATE_COLUMN], float) for r in dpsgd)
    assert any(r["eer"] != r[LAST_ITERATE_COLUMN] for r in dpsgd)
    assert summary["final"]["dp_nessa"]["eer"] == dpsgd[-1]["eer"] != dpsgd[-1][LAST_ITERATE_COLUMN]


def test_a_plan_below_the_devices_floor_is_named_before_round_one(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A plan whose statistics sigma is below the simulated devices' floor: one warning naming the phase, the
    sigma and the policy key before any round, and every device still declines that phase, as its policy says."""
    import logging
    from dataclasses import replace

    from fed_nessa.sim.fleet import run_fleet

    cfg = _cfg(tmp_path, "floor", **{"num-server-rounds": 1, "references": False, "aligner": "linear"})
    with caplog.at_level(logging.WARNING):
        summary = run_fleet(cfg, replace(POLICY, min_suffstats_noise_multiplier=2.0))
    warned = [r.getMessage() for r in caplog.records if "every device will decline" in r.getMessage()]
    assert warned == ["the plan's suffstats noise multiplier 1 is below the devices' min-suffstats-noise-multiplier "
                      "2: every device will decline that phase"]
    assert summary["rounds"][0]["status"] == "skipped" and summary["rounds"][0]["declined"] == DEVICES
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_fleet(replace(cfg, run_dir=str(tmp_path / "ok")), POLICY)
    assert not [r for r in caplog.records if "every device will decline" in r.getMessage()]
