"""The server side of a round: the global aligner and its optimiser, advanced one released sum at a time.

Everything here is post-processing of sums SecAgg+ released (see
:mod:`fed_nessa.federated.release` for when a sum may be unmasked at all): the private
ridge solve of the statistics phase, the DP-SGD step on the aggregated gradient, and the
aligner artifact. It never sees an individual device's vector or data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fed_nessa.config import AlignerChoice, FederationConfig, LinearStart, LossCentre, Phase, ServerLrDecay
from fed_nessa.federated import suffstats
from fed_nessa.federated.adaptive_clip import AdaptiveClip
from fed_nessa.federated.layout import build_net, flat, load_flat, nessa_config, trainable
from fed_nessa.federated.mechanism import mechanism_for
from fed_nessa.federated.noise_plan import NoisePlan
from fed_nessa.federated.server_optimizers import AdamBC, LowPassAdam, server_optimizer
from fed_nessa.federated.weight_average import WeightAverage
from fed_nessa.lowpass import LowPassFilter, parse
from fed_nessa.model.aligners.base import AlignerInfo
from fed_nessa.model.aligners.nessa import NessaAligner


class ServerModel:
    """The global aligner and the server's optimiser state, advanced one aggregate at a time."""

    def __init__(self, cfg: FederationConfig, d_x: int, d_y: int, enroll_model: str, runtime_model: str) -> None:
        self.cfg, self.d_x, self.d_y = cfg, d_x, d_y
        self.mechanism = mechanism_for(cfg)
        self.info = AlignerInfo(d_x=d_x, d_y=d_y, enroll_model=enroll_model, runtime_model=runtime_model)
        self.net = build_net(cfg, d_x, d_y)
        # Adam (lr 1e-3) is the measured choice for DP-SGD at fleet scale (field-notes: SGD with
        # momentum made no progress in 600 noise-free rounds); SGD+momentum stays for the landed
        # study configs. The linear part is frozen after a private start, so neither optimiser
        # touches it.
        # server-lowpass-*: DOPPLER's filter over the rounds on the released mean update (None: off); it is
        # the optimiser's first moment (server_optimizer)
        spec = parse(cfg.server_lowpass_b, cfg.server_lowpass_a)
        self.lowpass: LowPassFilter | None = None if spec is None else LowPassFilter(spec)
        self.opt: torch.optim.Optimizer = server_optimizer(cfg.server_optimizer, trainable(self.net), cfg.server_lr,
                                                           lowpass=self.lowpass is not None)
        # Adaptive clipping: the clip of the next DP-SGD round, moved by each released bit sum (public).
        self.clip: AdaptiveClip | None = AdaptiveClip.from_config(cfg) if cfg.clip_target_quantile > 0 else None
        # server-ema: the average of the DP-SGD iterates (from the first DP-SGD step on), what is evaluated and shipped
        self.average: WeightAverage | None = None
        self.completed: list[Phase] = []
        self.dpsgd_steps = self.phases().count(Phase.DPSGD)  # the schedule's DP-SGD steps (public; the lr decay's span)
        self.linear_state: dict[str, torch.Tensor] | None = None  # the aligner after the private start
        self.stats_sum: np.ndarray | None = None  # accumulated (noisy) sufficient statistics
        self.stats_devices = 0
        self.stats_noise_var = 0.0  # per-entry noise variance in stats_sum (public: from the protocol)

    def phases(self, aligner: AlignerChoice = AlignerChoice.NESSA) -> list[Phase]:
        """One phase per server round; the private linear start (if any) comes first.

        When the plan ships the linear start alone (``aligner`` LINEAR) no DP-SGD round is run.
        """
        rounds = self.cfg.num_server_rounds
        if self.cfg.linear_start == LinearStart.SUFFSTATS:
            k = self.cfg.suffstats_rounds
            return [Phase.SUFFSTATS] * k + ([] if aligner == AlignerChoice.LINEAR else [Phase.DPSGD] * (rounds - k))
        return [Phase.DPSGD] * rounds

    def vector(self) -> np.ndarray:
        return flat(list(self.net.parameters()))

    def round_clip(self, phase: Phase) -> float | None:
        """The clip a ``phase`` round's config states: the adaptive clip's current C (None: the run's fixed clip)."""
        return self.clip.clip if self.clip is not None and phase == Phase.DPSGD else None

    def loss_centre(self, phase: Phase) -> np.ndarray | None:
        """The centre a ``phase`` round's config states for the devices' loss (``loss-centre``): the mean
        enrollment embedding of the released statistics, post-processing (None: the plain loss)."""
        if phase != Phase.DPSGD or self.cfg.loss_centre == LossCentre.NONE:
            return None
        if self.stats_sum is None:
            raise ValueError("loss-centre needs the released statistics, and no statistics round has landed")
        gram, cross = suffstats.unpack(self.stats_sum, self.d_x, self.d_y)
        return suffstats.enrollment_mean(gram, cross)

    def payload_bound(self, phase: Phase, plan: NoisePlan) -> float:
        """Largest |coordinate| an honest device's vector can have (sizes SecAgg+'s range; the mechanism's,
        at the round's clip)."""
        return self.mechanism.payload_bound(phase, plan, self.round_clip(phase))

    @property
    def devices_send_gradients(self) -> bool:
        """Whether a DP-SGD round's sum holds gradients, else the devices' local model deltas (the mechanism's)."""
        return self.mechanism.sends_gradients()

    def apply(self, phase: Phase, aggregate_sum: np.ndarray, n_arrived: int,
              noise_arrivals: Sequence[int] = (), quantization_std: float = 0.0,
              plan: NoisePlan | None = None, gradients: bool | None = None) -> None:
        """Advance the model by one released sum.

        ``noise_arrivals`` holds the g each arrived device sized its noise share for (its
        public policy value, from its reply), so the statistics solve knows the released
        noise variance exactly. ``quantization_std`` (SecAgg+'s per-device rounding error,
        public from the codec) is noise in the sum like the DP noise: the solve floors it the
        same way, or a small non-DP fleet would invert rounding noise in weak directions.
        ``gradients`` says what a DP-SGD sum holds (None: :attr:`devices_send_gradients`); the
        fleet engine always sends gradient sums, also without DP. A gradient sum is stepped
        against (the optimiser), a sum of model deltas added (a delta already points downhill).
        """
        if n_arrived < 1:
            raise ValueError("no device contributed to the aggregate")
        if phase == Phase.SUFFSTATS:
            vec = np.asarray(aggregate_sum, np.float64)
            self.stats_sum = vec if self.stats_sum is None else self.stats_sum + vec
            self.stats_devices += n_arrived
            self.stats_noise_var += n_arrived * quantization_std ** 2
            sigma = (plan or self.default_plan()).suffstats_sigma
            self.stats_noise_var += self.released_noise_var(n_arrived, noise_arrivals, sigma)
            gram, cross = suffstats.unpack(self.stats_sum, self.d_x, self.d_y)
            W, b = suffstats.solve(gram, cross, nessa_config(self.cfg).ridge_alpha,
                                   noise_std=math.sqrt(self.stats_noise_var))
            self.net.set_linear(W, b)
            self.linear_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        else:
            if self.cfg.server_ema > 0 and self.average is None:  # starts at the first step's starting weights
                self.average = WeightAverage(self.net, self.cfg.server_ema)
            if self.devices_send_gradients if gradients is None else gradients:
                total = np.asarray(aggregate_sum, np.float32)
                clip = self.round_clip(phase)
                if self.clip is not None:  # the last coordinate is the bits' sum (DeviceLevel.bit_scale)
                    total = self._next_clip(total, n_arrived, plan)
                self._apply_gradient(total, n_arrived, noise_arrivals, plan, clip)
            else:
                params = trainable(self.net)
                mean = self._filtered(np.asarray(aggregate_sum, np.float32) / n_arrived)
                load_flat(params, flat(params) + self.step_lr() * mean)
            if self.average is not None:
                self.average.update(self.net)
        self.completed.append(phase)

    def step_lr(self) -> float:
        """The server learning rate of the DP-SGD step being applied: ``server-lr``, scaled by ``t / warmup``
        over the first ``server-lr-warmup`` steps (``t`` counts from 1; the completed phases say where a
        resumed run is, so the schedule needs no state of its own), then by ``server-lr-decay`` over the
        scheduled steps that follow."""
        warmup = self.cfg.server_lr_warmup
        t = sum(1 for p in self.completed if p != Phase.SUFFSTATS) + 1
        rate = self.cfg.server_lr * (min(1.0, t / warmup) if warmup > 0 else 1.0)
        if self.cfg.server_lr_decay == ServerLrDecay.COSINE and t > warmup:
            after = self.dpsgd_steps - warmup  # S: the decay's steps
            rate *= 0.5 * (1.0 + math.cos(math.pi * min(t - warmup - 1, after) / max(after, 1)))
        return rate

    def _filtered(self, mean: np.ndarray) -> np.ndarray:
        """The released mean update through ``server-lowpass`` (unchanged without a filter)."""
        return mean if self.lowpass is None else self.lowpass(mean)

    def default_plan(self) -> NoisePlan:
        """The noise plan when the caller gives none (tests; a run passes the round's plan)."""
        return NoisePlan(self.cfg.suffstats_noise_multiplier, self.cfg.noise_multiplier, 0)

    def released_noise_var(self, n_arrived: int, noise_arrivals: Sequence[int], sigma_s: float | None = None) -> float:
        """Per-entry DP noise variance in a released statistics sum (0 without DP).

        ``noise_arrivals`` are the g each device sized its share for; without them (tests) every
        device is taken to have the run's ``min-arrivals``.
        """
        plan = self.default_plan() if sigma_s is None else NoisePlan(sigma_s, self.cfg.noise_multiplier, 0)
        gs = list(noise_arrivals) or [self.cfg.min_arrivals] * n_arrived
        return self.mechanism.released_variance(Phase.SUFFSTATS, plan, gs)

    def _next_clip(self, total: np.ndarray, n_arrived: int, plan: NoisePlan | None) -> np.ndarray:
        """Move the adaptive clip by the released bit sum (the sum's last coordinate); the delta sum without it."""
        if self.clip is None or plan is None:
            raise ValueError("an adaptive-clip round's sum needs the run's noise plan (the bit's public scale)")
        scale = self.mechanism.bit_scale(self.clip.clip, plan)
        if scale is None:
            raise ValueError("the mechanism sends no adaptive-clip bit")
        self.clip = self.clip.next(float(total[-1]) / scale, n_arrived)
        return total[:-1]

    def _apply_gradient(self, grad_sum: np.ndarray, n_arrived: int, noise_arrivals: Sequence[int] = (),
                        plan: NoisePlan | None = None, clip: float | None = None) -> None:
        params = trainable(self.net)
        # Example level: a sum of ~batch-size clipped gradients per device; device level: one
        # clipped mean gradient per device. Either way the step follows the mean per device.
        per_device = self.mechanism.gradient_units()
        scale = max(n_arrived * per_device, 1)
        if isinstance(self.opt, AdamBC):  # the released mean's known DP noise variance per coordinate
            gs = list(noise_arrivals) or [self.cfg.min_arrivals] * n_arrived
            variance = self.mechanism.released_variance(Phase.DPSGD, plan or self.default_plan(), gs, clip)
            self.opt.noise_var = variance / scale ** 2
        raw = np.asarray(grad_sum / scale, np.float32)
        filtered = self._filtered(raw)
        for group in self.opt.param_groups:
            group["lr"] = self.step_lr()
        if isinstance(self.opt, LowPassAdam):  # its second moment from the raw mean, its step along the filter
            for p, g in zip(params, _split(raw, params), strict=True):
                p.grad = g
            self.opt.step_along(_split(filtered, params))
        else:
            for p, g in zip(params, _split(filtered, params), strict=True):
                p.grad = g
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    # -- persistence / evaluation ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Plain strings: checkpoints are unpickled weights-only, which refuses the Phase enum class.
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(),
                "completed": [str(p) for p in self.completed],
                "stats_sum": None if self.stats_sum is None else torch.from_numpy(self.stats_sum),
                "stats_devices": self.stats_devices, "stats_noise_var": self.stats_noise_var,
                "linear_state": self.linear_state, "clip": None if self.clip is None else self.clip.clip,
                "average": None if self.average is None else self.average.state_dict(),
                "lowpass": None if self.lowpass is None else self.lowpass.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.completed = [Phase(p) for p in state["completed"]]
        stats = state.get("stats_sum")
        self.stats_sum = None if stats is None else torch.as_tensor(stats).numpy().astype(np.float64)
        self.stats_devices = int(state.get("stats_devices", 0))
        self.stats_noise_var = float(state.get("stats_noise_var", 0.0))
        self.linear_state = state.get("linear_state")
        if self.clip is not None and state.get("clip") is not None:
            self.clip = replace(self.clip, clip=float(state["clip"]))
        average = state.get("average")
        self.average = None if average is None else WeightAverage.restored(self.net, average)
        lowpass = state.get("lowpass")
        if self.lowpass is not None and lowpass is not None:
            self.lowpass = LowPassFilter.restored(self.lowpass.lp, lowpass)

    def linear_start_aligner(self) -> NessaAligner | None:
        """The aligner as it was after the private linear start (None without one)."""
        if self.linear_state is None:
            return None
        net = build_net(self.cfg, self.d_x, self.d_y)
        net.load_state_dict(self.linear_state)
        aligner = NessaAligner(AlignerInfo(d_x=self.d_x, d_y=self.d_y, enroll_model=self.info.enroll_model,
                                           runtime_model=self.info.runtime_model), nessa_config(self.cfg))
        aligner.net = net
        return aligner

    def restore_linear_start(self) -> None:
        """Hold the linear start again: the gate picked it over DP NESSA on the server's validation speakers."""
        if self.linear_state is not None:
            self.net.load_state_dict(self.linear_state)
            self.average = None  # the start replaces the trained aligner, averaged or not

    def comparator(self, last_iterate: bool = False) -> NessaAligner:
        """The global aligner as evaluated, gated and shipped: the weight average under ``server-ema``
        (``last_iterate``: the optimiser's own weights, for the round curve beside it)."""
        aligner = NessaAligner(self.info, nessa_config(self.cfg))
        aligner.net = self.average.net if self.average is not None and not last_iterate else self.net
        return aligner

    def save_artifact(self, out_dir: Path, card_extra: dict[str, Any], deployable: bool = True) -> None:
        """Weights and card, plus the ONNX head a product deploys; an aligner the gate did not ship
        (``deployable`` false) gets no ONNX file: nothing in the folder is fit to deploy."""
        from fed_nessa.model.artifacts import ONNX_FILE, check_onnx_matches, export_onnx

        aligner = self.comparator()
        aligner.info.training.update(card_extra)
        out_dir = Path(out_dir)
        aligner.save(out_dir)
        (out_dir / ONNX_FILE).unlink(missing_ok=True)  # a replaced run's ONNX must not outlive its aligner
        if not deployable:
            return
        head = aligner.head()
        export_onnx(head, self.d_y, out_dir / ONNX_FILE)
        check_onnx_matches(head, out_dir / ONNX_FILE, self.d_y)


def _split(vec: np.ndarray, params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """A flat vector cut into tensors shaped like ``params`` (in order)."""
    out, offset = [], 0
    for p in params:
        out.append(torch.from_numpy(vec[offset:offset + p.numel()].copy()).view_as(p))
        offset += p.numel()
    return out
