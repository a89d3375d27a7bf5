"""The block engine runs DP-FedAvg's adaptive clip (issue 22): == the fleet engine under gaussian and skellam.

Exact numerics with reproducible noise: each device's row orders, Gaussian (or integer) share and its bit's
count share come from its own keyed stream in both engines, each block clips to the C_t the round config
states and appends the bit as the fleet engine does, so what the server applies (the bit's scaled sum last),
the clip of every round, the device ledgers and the federation ledger's records (each round's C_t in the span
entry) are compared for equality, not within a tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_sim_blocks_engine import DEVICES, POLICY, _blocks, _cfg, _ledgers, _population, _records, _same_runs

from fed_nessa.federated import mechanism as mechanism_module
from fed_nessa.federated.layout import build_net, trainable
from fed_nessa.federated.rounds import CLIP_COLUMN
from fed_nessa.privacy.audit import audit
from fed_nessa.sim.blocks.backends import IN_PROCESS
from fed_nessa.sim.blocks.engine import BlockEngine, lazy_federation, refusal
from fed_nessa.sim.blocks.worker import BlockError
from fed_nessa.sim.fleet import FleetEngine
from fed_nessa.sim.fleet_ledgers import ADAPTIVE_CLIPS

#: DP-FedAvg with the adaptive clip, started among this tiny fleet's update norms (~1e-8 to 2e-8 after the
#: linear start) so that the first round's bits are mixed and the clip moves (a count noise of 0.5 x 24
#: devices: z_b = 24, far above the round's 1.5); server Adam with the DP bias correction, as the fleet's test.
ADAPTIVE = {"device-update": "fedavg", "local-epochs": 2, "local-batch": 3, "local-lr": 0.5,
            "clip-target-quantile": 0.5, "clip-count-noise": 0.5, "clip-lr": 0.5, "device-clip-norm": 1.5e-8,
            "server-optimizer": "adam-bc"}
MECHANISMS = ["gaussian", "skellam"]


@pytest.fixture(autouse=True)
def _key_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FED_NESSA_KEY_STORE", str(tmp_path / "keys"))


def _adaptive(tmp: Path, name: str, mechanism: str, **over: Any) -> Any:
    return _cfg(tmp, name, **{**ADAPTIVE, "distributed-mechanism": mechanism, **over})


def _clips(summary: dict[str, Any]) -> list[float]:
    return [e[CLIP_COLUMN] for e in summary["rounds"] if CLIP_COLUMN in e]


@pytest.fixture
def bits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float, float]]:
    """Every device's ``(norm, clip, 1[norm <= clip])`` as the payloads' bit is formed (either engine)."""
    seen: list[tuple[float, float, float]] = []
    original = mechanism_module.clip_bit

    def clip_bit(norm: float, clip: float, count_std: float, noise: Any) -> float:
        seen.append((norm, clip, float(norm <= clip)))
        return original(norm, clip, count_std, noise)

    monkeypatch.setattr(mechanism_module, "clip_bit", clip_bit)
    return seen


@pytest.mark.parametrize("mech", MECHANISMS)
def test_adaptive_blocks_equal_the_fleet_engine(tmp_path: Path, mech: str, bits: list[tuple[float, float, float]],
                                               applied_sums: list[tuple[str, np.ndarray, int]]) -> None:
    """Statistics then two adaptive DP-FedAvg rounds, three blocks: the same bits (mixed in the first round),
    the same released sums bit for bit (the delta and the bit's scaled sum), the same C_t each round (moved by
    the first round's bits), the same epsilons, device ledgers line for line and federation-ledger records,
    the span's C_t included."""
    cfg = _adaptive(tmp_path, "blocks", mech)
    blocks = _blocks(cfg, IN_PROCESS, per_block=10)
    by_blocks, applied_sums[:] = list(applied_sums), []
    block_bits, bits[:] = sorted(bits), []
    fcfg = _adaptive(tmp_path, "fleet", mech)
    fleet = FleetEngine(fcfg, POLICY, lazy_federation(fcfg, _population(fcfg), devices=True)).run()
    assert len(block_bits) == 2 * DEVICES and block_bits == sorted(bits)
    first = [b for _, clip, b in block_bits if clip == ADAPTIVE["device-clip-norm"]]
    assert len(first) == DEVICES and 0 < sum(first) < DEVICES
    assert [(p, n) for p, _, n in by_blocks] == [(p, n) for p, _, n in applied_sums] == \
        [("suffstats", DEVICES), ("dpsgd", DEVICES), ("dpsgd", DEVICES)]
    data = lazy_federation(cfg, _population(cfg))
    weights = sum(p.numel() for p in trainable(build_net(cfg, data.d_x, data.d_y)))
    for (phase, a, _), (_, b, _) in zip(by_blocks, applied_sums, strict=True):
        np.testing.assert_array_equal(a, b)
        if phase == "dpsgd":
            assert a.size == weights + 1 and a[-1] != 0  # the delta, then the bits' scaled (noisy) sum
    clips = _clips(blocks)
    assert clips == _clips(fleet) and len(clips) == 2 and clips[0] == ADAPTIVE["device-clip-norm"] != clips[1]
    _same_runs(blocks, fleet)
    assert blocks["privacy"]["epsilon_max"] > 0
    assert _ledgers(cfg.run_dir) == _ledgers(fcfg.run_dir)
    records = _records(cfg.run_dir)
    assert records == _records(fcfg.run_dir)
    assert sum(f'"{ADAPTIVE_CLIPS}": {{"2": {clips[0]!r}, "3": {clips[1]!r}}}' in r for r in records) == 1


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_one_block_or_three_release_the_same_adaptive_rounds(tmp_path: Path, mechanism: str,
                                                             applied_sums: list[tuple[str, np.ndarray, int]]) -> None:
    """The blocks' partial sums (bit coordinate included) add up to the same released sums and clips."""
    one = _blocks(_adaptive(tmp_path, "one", mechanism), IN_PROCESS, per_block=DEVICES)
    by_one, applied_sums[:] = list(applied_sums), []
    three = _blocks(_adaptive(tmp_path, "three", mechanism), IN_PROCESS, per_block=10)
    assert len(by_one) == len(applied_sums) == 3
    for (_, a, _), (_, b, _) in zip(by_one, applied_sums, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _clips(one) == _clips(three)
    _same_runs(one, three)
    assert _ledgers(str(tmp_path / "one")) == _ledgers(str(tmp_path / "three"))


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_fast_numerics_move_the_clip_from_the_blocks_bits(tmp_path: Path, mechanism: str,
                                                         applied_sums: list[tuple[str, np.ndarray, int]]) -> None:
    """Fast numerics (each block's float sum with its bits' sum appended; one draw of noise per block under
    gaussian, one of the whole sum's Skellam noise under skellam): the bit coordinate is there and the clip,
    started far below every update norm (~1e-8 here), grows; started far above, shrinks (the bits all 0, or
    all 1: a centred sum of -12 or +12 under count noise of std 1.2 sqrt(24 / 8) ~ 2.1, the step's sign holds)."""
    for start, grows in ((1e-10, True), (100.0, False)):
        over = {"fleet-numerics": "fast", "clip-count-noise": 0.05, "clip-lr": 1.0, "device-clip-norm": start}
        applied_sums.clear()
        summary = _blocks(_adaptive(tmp_path, f"fast-{start:g}", mechanism, **over), IN_PROCESS, per_block=10)
        assert [phase for phase, _, _ in applied_sums] == ["suffstats", "dpsgd", "dpsgd"]
        clips = _clips(summary)
        assert clips[0] == start and (clips[1] > start if grows else clips[1] < start)


@pytest.mark.parametrize("mech", MECHANISMS)
def test_an_adaptive_block_run_with_secure_noise_passes_its_audit(tmp_path: Path, mech: str) -> None:
    """Noise from the OS CSPRNG (fast numerics): every round applied, each DP-SGD round's C_t in the summary
    and the federation ledger, and ``fed-nessa audit`` PASSES the block run folder (the span's clips included)."""
    cfg = _adaptive(tmp_path, "secure", mech, **{"reproducible-noise": False, "fleet-numerics": "fast"})
    summary = _blocks(cfg, IN_PROCESS, per_block=10)
    assert [e["status"] for e in summary["rounds"]] == ["applied"] * 3
    clips = _clips(summary)
    assert len(clips) == 2 and clips[0] == ADAPTIVE["device-clip-norm"]
    assert any(f'"{ADAPTIVE_CLIPS}"' in r for r in _records(cfg.run_dir))
    result = audit(Path(cfg.run_dir), write=False)
    assert result.passed, [f.message for f in result.findings if f.severity == "fail"][:3]


def test_the_adaptive_clip_is_no_longer_refused_but_what_the_engine_does_not_run_still_is(tmp_path: Path) -> None:
    for mechanism in MECHANISMS:
        assert refusal(_adaptive(tmp_path, mechanism, mechanism), POLICY) is None
    dropouts = _adaptive(tmp_path, "dropouts", "gaussian", **{"dropout-rate": 0.1})
    with pytest.raises(BlockError, match="drop-outs"):
        BlockEngine(dropouts, POLICY, _population(dropouts))
    assert not Path(dropouts.run_dir).exists()
