"""A low-pass filter on the released DP-SGD updates (DOPPLER: Zhang, Bu, Hong and Razaviyayn, NeurIPS 2024).

Across rounds the aggregated gradient changes slowly (the weights move a little per step) while the DP
noise of each round is fresh and white: its power is spread evenly over all "frequencies" of the round
sequence, the signal's sits at the low ones. A linear recursive (IIR) filter over the rounds,

    m_t = - sum_{k=1..n_a} a_k m_{t-k} + sum_{k=0..n_b} b_k g_{t-k},

passes the signal and removes much of the noise; ``m_t / c_t`` (``c_t``: the same recursion run on a
constant 1, i.e. the step response) keeps the first steps unbiased while the filter fills. The server
steps along ``m_t / c_t``: the filter is its optimiser's first moment (``LowPassAdam`` keeps Adam's
second moment on the raw ``g_t``; SGD drops its own momentum). A first-order filter (``b = (1 - beta,)``,
``a = (-beta,)``) is an exponential moving average, Adam's own first moment at ``beta = 0.9``.

What it cannot do: the weights sum their steps, and a filter of DC gain 1 passes that sum's noise whole;
it removes the step-to-step jitter at the price of delaying the gradient. On this problem that lost
(docs/results.md "A low-pass filter on the released updates"); the option stays, off by default.

The filter is a function of the released sums and of its public coefficients only: post-processing,
no privacy cost. This module imports nothing of the library, so the config can check a filter before
any round (:func:`problems`) with the same recursion the server runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The largest filter order accepted (the paper's filters are of order 1-3).
MAX_ORDER = 8
#: A step response this close to 0 cannot be divided by (a badly chosen oscillating filter).
MIN_GAIN = 1e-6


@dataclass(frozen=True)
class LowPass:
    """The coefficients of one filter: ``b`` (b_0 .. b_{n_b}) and ``a`` (a_1 .. a_{n_a}; a_0 = 1 implied)."""

    b: tuple[float, ...]
    a: tuple[float, ...]

    @property
    def dc_gain(self) -> float:
        """The filter's response to a constant: what ``c_t`` tends to."""
        return sum(self.b) / (1.0 + sum(self.a))


def parse(b_text: str, a_text: str) -> LowPass | None:
    """The filter ``server-lowpass-b`` / ``server-lowpass-a`` name (None: no filter); ValueError on bad text."""
    if not b_text.strip():
        if a_text.strip():
            raise ValueError(f"server-lowpass-a = {a_text!r} needs server-lowpass-b (the filter's numerator)")
        return None
    b, a = _numbers("server-lowpass-b", b_text), _numbers("server-lowpass-a", a_text) if a_text.strip() else ()
    return LowPass(b, a)


def problems(b_text: str, a_text: str, steps: int) -> list[str]:
    """What is wrong with the filter for a run of ``steps`` DP-SGD steps (empty: usable)."""
    try:
        lp = parse(b_text, a_text)
    except ValueError as exc:
        return [str(exc)]
    if lp is None:
        return []
    where = f"server-lowpass-b = {b_text!r}, server-lowpass-a = {a_text!r}"
    if len(lp.b) > MAX_ORDER + 1 or len(lp.a) > MAX_ORDER:
        return [f"{where}: at most {MAX_ORDER + 1} b and {MAX_ORDER} a coefficients"]
    if lp.b[0] == 0.0:
        return [f"{where}: b_0 must not be 0 (the first step's output would be 0 / 0)"]
    poles = np.roots([1.0, *lp.a]) if lp.a else np.zeros(0)
    if poles.size and float(np.max(np.abs(poles))) >= 1.0:
        return [f"{where}: unstable (a pole of modulus {float(np.max(np.abs(poles))):.4g} >= 1; "
                "the noise would grow without bound)"]
    gains = step_response(lp, max(steps, 1))
    worst = int(np.argmin(np.abs(gains)))
    if abs(gains[worst]) < MIN_GAIN:
        return [f"{where}: its step response is {gains[worst]:.3g} at step {worst + 1} (the bias correction "
                "divides by it)"]
    return []


def step_response(lp: LowPass, steps: int) -> np.ndarray:
    """``c_1 .. c_steps``: the filter run on a constant 1 (the bias correction of each step)."""
    f = LowPassFilter(lp)
    return np.array([f.push(np.zeros(1))[1] for _ in range(steps)])  # c_t does not depend on the input


class LowPassFilter:
    """The filter's state over the rounds: the last ``n_b`` inputs, the last ``n_a`` outputs and the step count."""

    def __init__(self, lp: LowPass) -> None:
        self.lp = lp
        self.inputs: list[np.ndarray] = []  # g_{t-1}, g_{t-2}, ... (newest first)
        self.outputs: list[np.ndarray] = []  # m_{t-1}, m_{t-2}, ...
        self.gains: list[float] = []  # c_{t-1}, c_{t-2}, ...
        self.steps = 0

    def push(self, g: np.ndarray) -> tuple[np.ndarray, float]:
        """Fold in the next input; the raw output ``m_t`` and the step response ``c_t``."""
        g = np.asarray(g, np.float64)
        m = _recur(self.lp.b, self.lp.a, [g, *self.inputs], self.outputs)
        c = float(_recur(self.lp.b, self.lp.a, [1.0] * min(self.steps + 1, len(self.lp.b)), self.gains))
        self.inputs = [g, *self.inputs][:len(self.lp.b) - 1]
        self.outputs = [m, *self.outputs][:len(self.lp.a)]
        self.gains = [c, *self.gains][:len(self.lp.a)]
        self.steps += 1
        return m, c

    def __call__(self, g: np.ndarray) -> np.ndarray:
        """The bias-corrected output ``m_t / c_t`` for the next released mean ``g_t`` (same shape, float32)."""
        m, c = self.push(g)
        if abs(c) < MIN_GAIN:  # the config refuses such filters; a hand-built one still fails loudly
            raise ValueError(f"low-pass filter: step response {c:.3g} at step {self.steps}; cannot bias-correct")
        return (m / c).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"b": list(self.lp.b), "a": list(self.lp.a), "steps": self.steps, "gains": list(self.gains),
                "inputs": [x.tolist() for x in self.inputs], "outputs": [x.tolist() for x in self.outputs]}

    @classmethod
    def restored(cls, lp: LowPass, state: dict[str, Any]) -> LowPassFilter:
        """The filter a checkpoint holds; refused if the checkpoint's coefficients are not ``lp``'s."""
        if tuple(state["b"]) != lp.b or tuple(state["a"]) != lp.a:
            raise ValueError(f"the checkpoint's low-pass filter (b={state['b']}, a={state['a']}) is not the "
                             f"run's (b={list(lp.b)}, a={list(lp.a)})")
        f = cls(lp)
        f.steps = int(state["steps"])
        f.gains = [float(x) for x in state["gains"]]
        f.inputs = [np.asarray(x, np.float64) for x in state["inputs"]]
        f.outputs = [np.asarray(x, np.float64) for x in state["outputs"]]
        return f


def _recur(b: Sequence[float], a: Sequence[float], inputs: Sequence[Any],
           outputs: Sequence[Any]) -> Any:
    """One step of the recursion on arrays or plain numbers; missing history (the first steps) counts as 0."""
    out = sum((bk * x for bk, x in zip(b, inputs, strict=False)), start=0.0 * inputs[0])
    for ak, y in zip(a, outputs, strict=False):
        out = out - ak * y
    return out


def _numbers(key: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{key} = {text!r}: expected comma-separated numbers") from None
    if not all(np.isfinite(values)):
        raise ValueError(f"{key} = {text!r}: every coefficient must be finite")
    return values
