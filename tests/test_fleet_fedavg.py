"""DP-FedAvg on the fleet engine: held to the Flower engine, fast numerics to exact, audited end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fed_nessa.config import DevicePolicy, FederationConfig, FleetNumerics, Phase, from_run_config
from fed_nessa.federated.codec import make_codec
from fed_nessa.federated.layout import trainable
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.rounds import CLIP_COLUMN, LEDGER_FILE
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.privacy.audit import audit
from fed_nessa.privacy.ledger import DeviceLedger
from fed_nessa.sim.fleet_numerics import encode_all, modular_sum

DEVICES = 12
#: Rounds drawn by the distribution test (its bounds are averaged over every coordinate).
DRAWS = 20
POLICY = DevicePolicy(privacy_unit="device", guaranteed_arrivals=8, min_noise_multiplier=0.2,
                      min_suffstats_noise_multiplier=0.2)


def _cfg(tmp: Path, name: str, **over: Any) -> FederationConfig:
    base = {"num-devices": DEVICES, "num-server-rounds": 3, "min-arrivals": 8, "secagg-num-shares": 5,
            "secagg-reconstruction-threshold": 3, "privacy-unit": "device", "device-update": "fedavg",
            "local-epochs": 2, "local-batch": 3, "local-lr": 0.5, "suffstats-noise-multiplier": 2.0,
            "noise-multiplier": 3.0, "aligner": "nessa", "eval-speakers": 20, "validation-speakers": 20,
            "hidden": 8, "device-stats-pairs": 20, "references": False, "run-dir": str(tmp / name)}
    base.update(over)
    return from_run_config(base)


#: Adaptive clipping on, with server Adam's DP bias correction (12 devices: the bit's count noise of 1 x the fleet
#: leaves the delta z_d = 3.02 of the round's z = 3).
ADAPTIVE = {"clip-target-quantile": 0.5, "clip-count-noise": 1.0, "clip-lr": 0.5, "server-optimizer": "adam-bc"}


#: Each device's clipped delta weighed by its pairs (a cap above every device's pairs: every weight below 1).
PAIR_WEIGHTED = {"device-weight": "pairs", "device-stats-pairs": 400}


#: The loss about the mean enrollment embedding of the released statistics (fed_nessa/model/centre.py).
MEAN_FREE = {"loss-centre": "enrollment-mean"}


@pytest.mark.parametrize("extra", [{}, ADAPTIVE, PAIR_WEIGHTED, MEAN_FREE],
                         ids=["fixed-clip", "adaptive-clip", "pair-weighted", "mean-free"])
def test_fleet_fedavg_equals_the_flower_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               extra: dict[str, Any]) -> None:
    """Reproducible noise: the Flower ClientApps' DP-FedAvg sums and the fleet's exact numerics agree round by
    round within SecAgg+'s rounding, and every device's ledger holds the same epsilon. With adaptive clipping
    the sums carry the bits' sum as their last coordinate, and both engines move the clip alike."""
    from fed_nessa.sim.fleet import run_fleet
    from fed_nessa.sim.runner import simulate

    seen: list[tuple[str, np.ndarray]] = []
    original = ServerModel.apply

    def spy(self: ServerModel, phase: Phase, aggregate_sum: np.ndarray, n_arrived: int, **kw: Any) -> None:
        seen.append((str(phase), np.array(aggregate_sum, np.float64)))
        original(self, phase, aggregate_sum, n_arrived, **kw)

    monkeypatch.setattr(ServerModel, "apply", spy)
    over = {"reproducible-noise": True, "fleet-numerics": "exact", **extra}
    replay = replace(POLICY, allow_reproducible_noise=True)
    runs = [simulate(_cfg(tmp_path, "flower", **over), policy=replay, quiet=True)]
    flower = list(seen)
    seen.clear()
    runs.append(run_fleet(_cfg(tmp_path, "fleet", **over), replay))
    assert [s[0] for s in flower] == [s[0] for s in seen] == ["suffstats", "dpsgd", "dpsgd"]
    clips = [[e.get(CLIP_COLUMN) for e in run["rounds"]] for run in runs]
    if "device-weight" in extra:  # the weighted sum is smaller than the equal one would be, not just rounding
        fleet = _engine(tmp_path, "w", "exact", **over)
        weights = fleet.model.mechanism.update_weights(fleet.fleet.n.tolist())
        assert 0 < float(weights.max()) < 1
    if extra.get("clip-target-quantile"):
        params = trainable(ServerModel(_cfg(tmp_path, "n"), 256, 192, "x", "y").net)
        assert len(flower[1][1]) == sum(p.numel() for p in params) + 1  # the delta, then the bits' sum
        assert clips[0][0] is None and clips[0][1] == 0.1 and clips[0][2] != 0.1  # the clip moved after round 2
        # the bits' sum carries SecAgg+'s rounding like every coordinate (divided by the public bit scale)
        assert clips[1][0] is None and clips[0][1:] == pytest.approx(clips[1][1:], rel=1e-3, abs=0)
        lines = [json.loads(line) for line in (tmp_path / "flower" / LEDGER_FILE).read_text().splitlines()]
        signed = {e["payload"]["round"]: e["payload"]["extra"][CLIP_COLUMN] for e in lines
                  if e.get("kind") == "round" and CLIP_COLUMN in e["payload"].get("extra", {})}
        assert signed == {2: clips[0][1], 3: clips[0][2]}  # the Flower engine's federation ledger signs each C_t
        for run in ("flower", "fleet"):  # every device's event agrees with the server's signed public parameters
            checks = {f.check for f in audit(tmp_path / run).findings}
            assert "params.mismatch" not in checks and not any(c.startswith("evidence") for c in checks), checks
    else:
        assert clips == [[None] * 3] * 2
    cfg = _cfg(tmp_path, "bounds", **over)
    model, plan = ServerModel(cfg, 256, 192, "x", "y"), noise_plan(cfg, DEVICES)
    for (phase, a), (_, b) in zip(flower, seen, strict=True):
        codec = make_codec(model.payload_bound(Phase(phase), plan), cfg.secagg_clipping_range,
                           cfg.secagg_quantization_range, DEVICES)
        assert np.abs(a - b).max() <= 2 * codec.sum_error_bound(DEVICES) + 1e-5 * np.abs(a).max(), phase
    assert np.abs(flower[1][1]).max() > 10 * codec.sum_error_bound(DEVICES)  # the sums are not just rounding
    for i in range(DEVICES):
        dev = f"device-{i:05d}"
        eps = [DeviceLedger.open(tmp_path / run / "devices" / dev, dev).epsilon(POLICY.delta)
               for run in ("flower", "fleet")]
        assert eps[0] == pytest.approx(eps[1], rel=1e-9) and eps[0] > 0


def _engine(tmp: Path, name: str, numerics: str, **over: Any) -> Any:
    from fed_nessa.data.registry import load_federation_data
    from fed_nessa.sim.fleet import FleetEngine

    cfg = _cfg(tmp, name, **{"num-server-rounds": 2, "fleet-numerics": numerics, **over})
    return FleetEngine(cfg, POLICY, load_federation_data(cfg, None))


def test_without_noise_fast_and_exact_release_the_same_sum(tmp_path: Path) -> None:
    """dp-mode none, full-batch local steps (the row order cannot matter): the fast numerics' one summed
    vector is the exact numerics' per-device deltas summed; each delta is clipped to the device clip."""
    over = {"dp-mode": "none", "local-batch": 0}
    exact, fast = _engine(tmp_path, "e", "exact", **over), _engine(tmp_path, "f", "fast", **over)
    arrived = list(range(DEVICES))
    vectors = exact._device_vectors(arrived, exact._open_ledgers(), 2)
    (total,) = fast._device_vectors(arrived, fast._open_ledgers(), 2)
    assert len(vectors) == DEVICES and fast.numerics == FleetNumerics.FAST
    assert max(float(np.linalg.norm(v)) for v in vectors) <= exact.cfg.device_clip_norm * (1 + 1e-5)
    np.testing.assert_allclose(np.sum(vectors, axis=0), total, rtol=1e-4, atol=1e-6)
    assert np.abs(total).max() > 1e-4


@pytest.mark.slow
def test_fast_fedavg_agrees_with_exact_in_distribution(tmp_path: Path) -> None:
    """With DP and minibatches (fresh orders and noise every draw): the fast released sum has the exact one's
    mean and per-coordinate variance (one Gaussian of the summed shares = the shares summed). Each draw is
    another round's reproducible streams at the same model: fresh draws, a deterministic test."""
    engine = _engine(tmp_path, "dist", "exact", **{"reproducible-noise": True})
    book, arrived = engine._open_ledgers(), list(range(DEVICES))
    codec = make_codec(engine.model.payload_bound(Phase.DPSGD, engine.plan), engine.cfg.secagg_clipping_range,
                       engine.cfg.secagg_quantization_range, DEVICES)
    draws: dict[str, list[np.ndarray]] = {"exact": [], "fast": []}
    for r in range(2, 2 + DRAWS):
        engine.numerics = FleetNumerics.EXACT
        payloads, _, _ = encode_all(engine._device_vectors(arrived, book, r), arrived, codec)
        draws["exact"].append(modular_sum(payloads, codec))
        engine.numerics = FleetNumerics.FAST
        (total,) = engine._device_vectors(arrived, book, r)
        draws["fast"].append(engine._fast_device_total(total, arrived, book, r, codec))
    exact, fast = (np.stack(draws[m]).astype(np.float64) for m in ("exact", "fast"))
    assert 0.8 < fast.var(axis=0).mean() / exact.var(axis=0).mean() < 1.25
    se = np.sqrt((exact.var(axis=0) + fast.var(axis=0)) / DRAWS)
    z = (fast.mean(axis=0) - exact.mean(axis=0)) / se
    assert abs(float(z.mean())) < 0.2 and 0.7 < float(z.std()) < 1.3


@pytest.mark.parametrize("numerics", ["exact", "fast"])
def test_a_fleet_fedavg_run_passes_its_audit(tmp_path: Path, numerics: str) -> None:
    """``fed-nessa simulate --engine fleet`` with device-update = fedavg runs (no refusal) and audits PASS."""
    from fed_nessa.sim.runner import run_engine

    summary = run_engine(_cfg(tmp_path, "run", **{"fleet-numerics": numerics}), POLICY, engine="fleet", quiet=True)
    assert summary["engine"]["name"] == "fleet" and summary["privacy"]["epsilon_max"] > 0
    assert [e["status"] for e in summary["rounds"]] == ["applied"] * 3
    result = audit(tmp_path / "run")
    assert result.passed, [f.message for f in result.findings]
