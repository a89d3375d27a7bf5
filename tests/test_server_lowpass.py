"""server-lowpass-b / -a: DOPPLER's low-pass filter over the rounds on the released mean update."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.signal import lfilter
from test_federated_device import Cfg

from fed_nessa import lowpass
from fed_nessa.config import ConfigError, DPMode, LinearStart, Phase, from_run_config
from fed_nessa.federated.layout import flat, trainable
from fed_nessa.federated.server_model import ServerModel

EMA = lowpass.LowPass(b=(0.1,), a=(-0.9,))
SECOND_ORDER = lowpass.LowPass(b=(0.005, 0.005), a=(-1.8, 0.81))  # two EMAs of 0.9 in a row


@pytest.mark.parametrize("lp", [EMA, SECOND_ORDER, lowpass.LowPass(b=(0.3, 0.2, 0.1), a=())])
def test_the_raw_output_is_scipys_lfilter(lp: lowpass.LowPass) -> None:
    """An independent implementation of the same difference equation (a_0 = 1), on a 3-coordinate signal."""
    g = np.random.default_rng(0).normal(size=(40, 3))
    f = lowpass.LowPassFilter(lp)
    ours = np.stack([f.push(x)[0] for x in g])
    np.testing.assert_allclose(ours, lfilter(lp.b, [1.0, *lp.a], g, axis=0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lp", [EMA, SECOND_ORDER])
def test_a_constant_passes_unchanged_from_the_first_step(lp: lowpass.LowPass) -> None:
    """The bias correction: a constant update reaches the optimiser undelayed and unscaled."""
    f = lowpass.LowPassFilter(lp)
    for _ in range(30):
        np.testing.assert_allclose(f(np.array([2.5, -1.0])), [2.5, -1.0], rtol=1e-6)
    assert lowpass.step_response(lp, 400)[-1] == pytest.approx(lp.dc_gain)


def test_a_first_order_filter_is_the_bias_corrected_moving_average() -> None:
    """b = (1 - beta,), a = (-beta,): Adam's bias-corrected first moment, m_t / (1 - beta^t)."""
    g = np.random.default_rng(1).normal(size=(20, 4))
    f, m = lowpass.LowPassFilter(EMA), np.zeros(4)
    for t, x in enumerate(g, start=1):
        m = 0.9 * m + 0.1 * x
        np.testing.assert_allclose(f(x), m / (1 - 0.9 ** t), rtol=1e-5)


def _noise_gain(lp: lowpass.LowPass, steps: int = 2_000) -> float:
    """The filtered, bias-corrected output's steady-state variance per unit white input variance: the squared
    impulse response summed, over the DC gain squared."""
    f = lowpass.LowPassFilter(lp)
    h = [f.push(np.array([1.0 if t == 0 else 0.0]))[0][0] for t in range(steps)]
    return float(np.sum(np.square(h))) / lp.dc_gain ** 2


def test_white_noise_is_cut_to_the_filters_noise_gain() -> None:
    """An EMA of decay beta passes (1 - beta) / (1 + beta) of white noise's variance; measured on 20,000 steps.
    Two EMAs of 0.9 in a row pass half of that (and delay the signal twice as long)."""
    assert _noise_gain(EMA) == pytest.approx(0.1 / 1.9)
    f = lowpass.LowPassFilter(EMA)
    noise = np.random.default_rng(2).normal(size=(20_000, 50))
    out = np.stack([f(x) for x in noise])[200:]  # past the filling transient
    assert out.var() == pytest.approx(0.1 / 1.9, rel=0.05)
    assert _noise_gain(SECOND_ORDER) == pytest.approx(0.5 * _noise_gain(EMA), rel=1e-3)


@pytest.mark.parametrize(("b", "a", "message"), [
    ("0.1", "-1.1", "unstable"),
    ("0.1", "-2,1", "unstable"),  # a double pole on the unit circle
    ("x", "", "comma-separated numbers"),
    ("0.1,nan", "", "finite"),
    ("", "-0.9", "needs server-lowpass-b"),
    ("0", "-0.9", "b_0 must not be 0"),
    (",".join(["0.1"] * 10), "", "at most 9 b"),
])
def test_the_config_refuses_a_filter_it_cannot_run(b: str, a: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_run_config({"server-lowpass-b": b, "server-lowpass-a": a})


def test_a_step_response_through_zero_is_refused_before_round_one() -> None:
    """b = (1, -1): a stable filter whose step response is 0 from step 2 on (it removes every constant)."""
    with pytest.raises(ConfigError, match="step response is 0 at step 2"):
        from_run_config({"server-lowpass-b": "1,-1", "server-lowpass-a": "", "num-server-rounds": 5})


def test_a_lone_number_is_a_one_coefficient_list() -> None:
    """``--set server-lowpass-b=0.1`` arrives as a float (TOML): it is the list (0.1,), not a type error."""
    cfg = from_run_config({"server-lowpass-b": 0.1, "server-lowpass-a": -0.9})
    assert (cfg.server_lowpass_b, cfg.server_lowpass_a) == ("0.1", "-0.9")
    with pytest.raises(ConfigError, match="server-lowpass-b = True"):
        from_run_config({"server-lowpass-b": True})


def test_the_filter_and_adams_dp_bias_correction_are_refused_together() -> None:
    with pytest.raises(ConfigError, match="adam-bc"):
        from_run_config({"server-lowpass-b": "0.1", "server-lowpass-a": "-0.9", "server-optimizer": "adam-bc"})
    assert from_run_config({"server-lowpass-b": "0.1", "server-lowpass-a": "-0.9"}).server_lowpass_a == "-0.9"


def _model(b: str = "", a: str = "", optimizer: str = "sgd", lr: float = 1.0) -> ServerModel:
    cfg = Cfg(dp_mode=DPMode.NONE, linear_start=LinearStart.NONE, server_optimizer=optimizer, server_lr=lr,
              server_lowpass_b=b, server_lowpass_a=a)
    return ServerModel(cfg, 5, 4, "X", "Y")


def _walk(model: ServerModel, grads: list[float] | list[np.ndarray]) -> np.ndarray:
    """The trainable weights' displacement after one step per mean gradient (a number: a constant vector)."""
    size = sum(p.numel() for p in trainable(model.net))
    per_device = model.mechanism.gradient_units()
    before = flat(trainable(model.net)).astype(np.float64)
    for value in grads:
        g = np.broadcast_to(np.asarray(value, np.float32), (size,))
        model.apply(Phase.DPSGD, (g * per_device).astype(np.float32), 1, gradients=True)
    return flat(trainable(model.net)).astype(np.float64) - before


def test_sgd_steps_along_the_filtered_update() -> None:
    """The filter is SGD's momentum: a steady gradient moves the weights by lr x the gradient from the first
    step (bias-corrected), and a gradient alternating in sign each round (noise at the highest frequency)
    moves them far less than SGD with its own momentum 0.9 does."""
    np.testing.assert_allclose(_walk(_model("0.1", "-0.9"), [0.01] * 6), -0.06, rtol=1e-4)
    flipping = [0.01 * (-1) ** t for t in range(40)]
    filtered, plain = _model("0.1", "-0.9"), _model()
    _walk(filtered, flipping), _walk(plain, flipping)
    last = np.abs(_walk(filtered, [0.01])).max(), np.abs(_walk(plain, [0.01])).max()
    assert last[0] < 0.2 * last[1]


def test_a_sum_of_model_deltas_is_filtered_before_it_is_added() -> None:
    """Device-level DP-FedAvg sums deltas, which the server adds (no optimiser): the filter still passes a
    steady delta whole and damps one alternating in sign."""
    size = sum(p.numel() for p in trainable(_model().net))

    def last_move(model: ServerModel, deltas: list[float]) -> float:
        before = flat(trainable(model.net)).astype(np.float64)
        for i, d in enumerate(deltas):
            if i == len(deltas) - 1:
                before = flat(trainable(model.net)).astype(np.float64)
            model.apply(Phase.DPSGD, np.full(size, d, np.float32), 1, gradients=False)
        return float(np.abs(flat(trainable(model.net)) - before).max())

    assert last_move(_model("0.1", "-0.9"), [0.01] * 5) == pytest.approx(0.01, rel=1e-4)
    flipping = [0.01 * (-1) ** t for t in range(41)]
    assert last_move(_model("0.1", "-0.9"), flipping) < 0.1 * last_move(_model(), flipping)


def test_adam_with_a_moving_average_filter_is_adam() -> None:
    """With Adam the filter replaces the first moment and the second stays on the raw released mean: the
    filter b = (0.1,), a = (-0.9,) is Adam's own first moment, so the trajectory is torch's Adam's."""
    size = sum(p.numel() for p in trainable(_model().net))
    grads = list(np.random.default_rng(3).normal(scale=0.01, size=(8, size)).astype(np.float32))
    filtered = _walk(_model("0.1", "-0.9", "adam", 1e-2), grads)
    np.testing.assert_allclose(filtered, _walk(_model("", "", "adam", 1e-2), grads), rtol=1e-4, atol=1e-7)
    second_order = _walk(_model("0.005,0.005", "-1.8,0.81", "adam", 1e-2), grads)
    assert not np.allclose(second_order, filtered, atol=1e-4)


def test_lowpass_adam_refuses_a_plain_step() -> None:
    from fed_nessa.federated.server_optimizers import LowPassAdam

    with pytest.raises(TypeError, match="step_along"):
        _model("0.1", "-0.9", "adam").opt.step()
    assert isinstance(_model("0.1", "-0.9", "adam").opt, LowPassAdam)


def test_a_resumed_run_continues_the_filter_exactly() -> None:
    grads = [0.02, -0.01, 0.03, 0.0, 0.01, -0.02]
    whole = _model("0.005,0.005", "-1.8,0.81")
    expected = _walk(whole, grads)
    first = _model("0.005,0.005", "-1.8,0.81")
    start = flat(trainable(first.net)).astype(np.float64)
    _walk(first, grads[:3])
    resumed = _model("0.005,0.005", "-1.8,0.81")
    resumed.load_state_dict(first.state_dict())
    _walk(resumed, grads[3:])
    np.testing.assert_allclose(flat(trainable(resumed.net)) - start, expected, rtol=1e-5, atol=1e-8)


def test_a_checkpoint_of_another_filter_is_refused() -> None:
    state = _model("0.1", "-0.9")
    _walk(state, [0.01])
    with pytest.raises(ValueError, match="not the run's"):
        _model("0.2", "-0.8").load_state_dict(state.state_dict())


def test_a_fleet_run_with_the_filter_records_it_and_filters_every_dpsgd_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet engine (the same ServerModel) runs the filter: the summary names its coefficients, and the
    filter saw one update per DP-SGD round, of the trainable weights' size."""
    from test_sim_fleet import POLICY, _cfg

    from fed_nessa.sim.fleet import run_fleet

    seen: list[int] = []
    original = lowpass.LowPassFilter.__call__

    def spy(self: lowpass.LowPassFilter, g: np.ndarray) -> np.ndarray:
        seen.append(g.size)
        return original(self, g)

    monkeypatch.setattr(lowpass.LowPassFilter, "__call__", spy)
    cfg = _cfg(tmp_path, "lp", **{"server-lowpass-b": "0.1", "server-lowpass-a": "-0.9", "references": False,
                                  "num-server-rounds": 4})
    summary = run_fleet(cfg, POLICY)
    assert summary["config"]["server-lowpass-b"] == "0.1" and summary["config"]["server-lowpass-a"] == "-0.9"
    dpsgd = [r for r in summary["rounds"] if r["phase"] == str(Phase.DPSGD)]
    assert len(dpsgd) == len(seen) == 3
    assert len(set(seen)) == 1 and seen[0] > 0
