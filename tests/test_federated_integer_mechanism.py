"""The integer mechanism's encoder/decoder: norm bound, released distribution, CSPRNG only, wrap, SecAgg+."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fed_nessa.federated import integer_mechanism as im
from fed_nessa.federated.secagg_field import (
    exact_quantize,
    exact_secaggplus_mod,
    field_sum_from_flower,
    flower_settings,
    to_flower,
)
from fed_nessa.privacy.skellam import skellam_log_pmf
from fed_nessa.randomness import ReproducibleNoise, SecureNoise


def _params(dim: int = 1000, clip: float = 1.0, z: float = 1.0, n: int = 4, **kw: float) -> im.IntegerMechanismParams:
    return im.build_params(dim, clip, z, rotation_seed=11, min_devices=n, max_devices=n, **kw)


def _adversarial_inputs(dim: int, clip: float) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    one = np.zeros(dim)
    one[0] = clip
    spread = np.full(dim, clip / math.sqrt(dim))
    directions = [v / np.linalg.norm(v) * clip for v in rng.normal(size=(60, dim))]
    sparse = np.zeros(dim)
    sparse[:3] = clip / math.sqrt(3)
    return [one, -one, spread, sparse, *directions]


def test_rounded_norm_never_exceeds_the_recorded_bound() -> None:
    params = _params(dim=1000, clip_per_sqrt_dim=1.0)  # coarse scale: rounding inflates the norm most
    noise = ReproducibleNoise(1, "norm")
    for x in _adversarial_inputs(1000, params.l2_clip):
        for _ in range(5):
            rounded = im.encode_rounded(x * 1.5, params, noise)  # above the clip: the encoder clips
            assert int(np.dot(rounded, rounded)) <= params.norm_bound ** 2


def test_conditional_rounding_at_half_fractions_and_its_refusal() -> None:
    """Every coordinate at .5: unconditional rounding exceeds a tight bound about half the time; ours never."""
    v = np.full(256, 3.5)
    tight = math.sqrt(float(np.dot(v, v)))  # the unrounded norm
    noise = ReproducibleNoise(2, "half")
    exceeded = 0
    for _ in range(50):
        r = im.conditional_round(v, tight, noise)
        assert int(np.dot(r, r)) <= tight ** 2
        unconditional = np.floor(v) + (noise.uniform(v.size) < 0.5)
        exceeded += float(np.dot(unconditional, unconditional)) > tight ** 2
    assert exceeded > 10
    with pytest.raises(ArithmeticError, match="no draw within norm"):
        im.conditional_round(v, 1.0, noise, max_tries=3)


def test_rounding_is_unbiased() -> None:
    v = np.linspace(-2.3, 4.7, 64)
    noise = ReproducibleNoise(3, "bias")
    mean = np.mean([im.conditional_round(v, 1e9, noise) for _ in range(4000)], axis=0)
    assert np.abs(mean - v).max() < 0.05


def _chi_square_pvalue(samples: np.ndarray, log_pmf) -> float:  # type: ignore[no-untyped-def]
    from scipy.stats import chi2

    values, counts = np.unique(samples, return_counts=True)
    k = np.arange(values.min(), values.max() + 1)
    expected = np.exp(log_pmf(k)) * samples.size
    observed = np.zeros(k.size)
    observed[values - k[0]] = counts
    # pool bins left to right until each expects >= 5; the tails beyond the range go to the ends
    expected[0] += np.exp(log_pmf(np.arange(k[0] - 2000, k[0]))).sum() * samples.size
    expected[-1] += np.exp(log_pmf(np.arange(k[-1] + 1, k[-1] + 2000))).sum() * samples.size
    obs_bins, exp_bins, o, e = [], [], 0.0, 0.0
    for ob, ex in zip(observed, expected):
        o, e = o + ob, e + ex
        if e >= 5:
            obs_bins.append(o)
            exp_bins.append(e)
            o, e = 0.0, 0.0
    obs_bins[-1] += o
    exp_bins[-1] += e
    stat = float(sum((a - b) ** 2 / b for a, b in zip(obs_bins, exp_bins)))
    return float(chi2.sf(stat, len(obs_bins) - 1))


@pytest.mark.parametrize("mean", [0.4, 6.0, 9.99, 10.0, 37.0, 2500.0])
def test_poisson_sampler_has_the_poisson_law(mean: float) -> None:
    from scipy.stats import poisson

    draws = im.poisson(mean, 40000, ReproducibleNoise(4, "poisson", str(mean)))
    assert _chi_square_pvalue(draws, lambda k: poisson.logpmf(k, mean)) > 1e-3


@pytest.mark.parametrize("device_variance", [3.0, 150.0])
def test_released_integer_sum_has_the_accounted_distribution(device_variance: float) -> None:
    """Fixed inputs, many draws: centred sum minus the devices' rounded vectors ~ Sk(n x device variance)."""
    n = 3
    base = _params(dim=200, n=n)
    params = dataclasses.replace(base, device_variance=device_variance)
    rng = np.random.default_rng(0)
    inputs = [v / np.linalg.norm(v) * 0.7 for v in rng.normal(size=(n, 200))]
    residuals = []
    noise = ReproducibleNoise(5, "release", str(device_variance))
    for _ in range(60):
        encodings, rounded_total = [], np.zeros(params.padded_dim, np.int64)
        for x in inputs:
            rounded = im.encode_rounded(x, params, noise)
            rounded_total += rounded
            encodings.append(np.mod(rounded + im.skellam_share(params.device_variance, params.padded_dim, noise),
                                    params.modulus))
        residuals.append(im.centred(im.modular_sum(np.stack(encodings), params), params) - rounded_total)
    samples = np.concatenate(residuals)
    total_variance = n * device_variance
    assert _chi_square_pvalue(samples, lambda k: skellam_log_pmf(k, total_variance)) > 1e-3
    # a wrong variance (the accounted one at 1.3x) is rejected: the test can fail
    assert _chi_square_pvalue(samples, lambda k: skellam_log_pmf(k, 1.3 * total_variance)) < 1e-6


def _raise(*_a: object, **_k: object) -> None:
    raise AssertionError("a draw from a global generator")


def test_no_draw_from_numpys_or_torchs_global_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("rand", "randn", "random", "random_sample", "randint", "uniform", "normal", "poisson",
                 "binomial", "choice", "permutation", "shuffle", "default_rng", "RandomState", "seed"):
        monkeypatch.setattr(np.random, name, _raise)
    for name in ("rand", "randn", "randint", "normal", "poisson", "bernoulli", "manual_seed", "randperm"):
        monkeypatch.setattr(torch, name, _raise)
    params = _params(dim=300, n=2)
    encodings = np.stack([im.encode(np.full(300, 0.05), params, SecureNoise()) for _ in range(2)])
    im.decode(im.modular_sum(encodings, params), params, 2)
    settings = flower_settings(params)
    exact_quantize([to_flower(encodings[0], params)], settings.clipping_range, settings.quantization_range)


def test_encode_decode_exact_without_noise() -> None:
    params = dataclasses.replace(_params(dim=777, n=5), device_variance=0.0)
    rng = np.random.default_rng(8)
    inputs = rng.normal(size=(5, 777)) * 0.3
    noise = ReproducibleNoise(6, "exact")
    rounded = [im.encode_rounded(x, params, noise) for x in inputs]
    encodings = np.stack([np.mod(r, params.modulus) for r in rounded])
    decoded = im.decode(im.modular_sum(encodings, params), params, 5)
    assert np.array_equal(decoded, im.unrotate(np.sum(rounded, axis=0).astype(np.float64), params) / params.scale)
    clipped_sum = sum(im.clip_l2(x, params.l2_clip) for x in inputs)
    assert np.linalg.norm(decoded - clipped_sum) <= 5 * math.sqrt(params.padded_dim) / params.scale


def test_rotation_is_the_orthonormal_hadamard_with_public_signs() -> None:
    from scipy.linalg import hadamard

    x = np.random.default_rng(9).normal(size=(3, 64))
    assert np.allclose(im.fwht(x), x @ hadamard(64) / 8.0)
    params = _params(dim=50)
    v = np.random.default_rng(10).normal(size=50)
    assert np.allclose(im.unrotate(im.rotate(v, params), params), v)
    assert np.linalg.norm(im.rotate(v, params)) == pytest.approx(np.linalg.norm(v))
    assert np.array_equal(im.rotation_signs(3, 64), im.rotation_signs(3, 64))
    assert not np.array_equal(im.rotation_signs(3, 64), im.rotation_signs(4, 64))


def test_wrap_around_is_refused() -> None:
    params = _params(dim=100, n=3)
    bound = im.sum_bound(params, 3)
    assert bound < params.modulus // 2
    fine = np.zeros(params.padded_dim, np.int64)
    fine[0] = int(bound)
    im.decode(fine, params, 3)
    # a true sum just past the half-range wraps to the far negative end: refused
    wrapped = np.mod(np.full(params.padded_dim, params.modulus // 2 + 5, np.int64), params.modulus)
    with pytest.raises(im.WrapAroundError, match="may have wrapped"):
        im.decode(wrapped, params, 3)
    # a sum beyond the bound but not wrapped: refused too
    beyond = np.zeros(params.padded_dim, np.int64)
    beyond[3] = -int(bound) - 2
    with pytest.raises(im.WrapAroundError):
        im.decode(np.mod(beyond, params.modulus), params, 3)
    # inputs aligned with one rotated axis (the seed is public, so an adversary can): the real sum wraps
    quiet = dataclasses.replace(params, device_variance=0.0)
    quiet = dataclasses.replace(quiet, bits=math.ceil(math.log2(im.sum_bound(quiet, 3) + 1)) + 1)
    axis = np.zeros(params.padded_dim)
    axis[0] = 1.0
    x = im.unrotate(axis, quiet) * quiet.l2_clip
    enc = np.stack([im.encode(x, quiet, ReproducibleNoise(7, "wrap", i)) for i in range(3)])
    assert 3 * quiet.scale * quiet.l2_clip > quiet.modulus // 2  # the true coordinate is past the half-range
    with pytest.raises(im.WrapAroundError, match="may have wrapped"):
        im.decode(im.modular_sum(enc, quiet), quiet, 3)
    # a bit width that cannot hold the bound is refused outright
    with pytest.raises(im.WrapAroundError, match="too few bits"):
        im.decode(fine, dataclasses.replace(params, bits=8), 3)


def test_decoder_refuses_fewer_devices_than_accounted() -> None:
    params = im.build_params(100, 1.0, 1.0, 1, min_devices=3, max_devices=5)
    with pytest.raises(ValueError, match="accounted noise"):
        im.decode(np.zeros(params.padded_dim, np.int64), params, 2)


def test_build_params_sizes_and_refusals() -> None:
    small, large = _params(dim=78000, n=1000), _params(dim=78000, n=1_000_000)
    assert small.padded_dim == 131072 and small.bits < large.bits <= im.MAX_BITS
    assert small.norm_bound / (small.scale * small.l2_clip) - 1 < 0.003  # the stated inflation at the default
    assert small.central_variance == pytest.approx((1.0 * small.scale * small.l2_clip) ** 2)  # equal noise
    with pytest.raises(ValueError, match="bits"):
        _params(dim=78000, n=10 ** 9)
    with pytest.raises(ValueError, match="padded_dim"):
        dataclasses.replace(small, padded_dim=100)


def _flower_round(encodings: np.ndarray, params: im.IntegerMechanismParams) -> np.ndarray:
    """Flower's own client maps (weight factor, quantize, masks, mod) and server maps (unmask, dequantize)."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    s = flower_settings(params)
    n = len(encodings)
    shape = [(1,), (params.padded_dim,)]
    pair_seed = {(i, j): bytes([i, j, 7, 7]) for i in range(n) for j in range(n) if i < j}
    masked_total = [np.zeros(1, np.int64), np.zeros(params.padded_dim, np.int64)]
    private = []
    for i, enc in enumerate(encodings):
        q_ratio = round(1 / s.max_weight * s.quantization_range)  # every device reports weight 1
        values = parameters_multiply([to_flower(enc, params)], q_ratio / s.quantization_range)
        vec = factor_combine(q_ratio, quantize(values, s.clipping_range, s.quantization_range))
        own = pseudo_rand_gen(bytes([i, 1, 2, 3]), s.modulus_range, shape)
        private.append(own)
        vec = parameters_addition(vec, own)
        for (a, b), seed in pair_seed.items():
            if i in (a, b):
                mask = pseudo_rand_gen(seed, s.modulus_range, shape)
                vec = parameters_addition(vec, mask) if i == a else parameters_subtraction(vec, mask)
        masked_total = parameters_addition(masked_total, parameters_mod(vec, s.modulus_range))
    for own in private:
        masked_total = parameters_subtraction(masked_total, own)
    q_total, recon = factor_extract(parameters_mod(masked_total, s.modulus_range))
    out = dequantize(recon, s.clipping_range, s.quantization_range)[0]
    out += -(n - 1) * s.clipping_range
    out *= s.quantization_range / q_total
    return out


def test_flowers_secaggplus_maps_our_field_elements_exactly() -> None:
    params = im.build_params(3000, 1.0, 1.0, 5, min_devices=4, max_devices=4)
    noise = ReproducibleNoise(12, "flower")
    inputs = np.random.default_rng(13).normal(size=(4, 3000))
    encodings = np.stack([im.encode(x, params, noise) for x in inputs])
    aggregate = _flower_round(encodings, params)
    assert np.array_equal(field_sum_from_flower(aggregate, 4, params), im.modular_sum(encodings, params))


def test_exact_quantize_is_flowers_quantize_on_field_elements_and_refuses_floats() -> None:
    from flwr.common.secure_aggregation.quantization import quantize

    params = _params(dim=500, n=3)
    s = flower_settings(params)
    enc = im.encode(np.full(500, 0.04), params, ReproducibleNoise(14, "q"))
    values = [to_flower(enc, params)]
    ours = exact_quantize(values, s.clipping_range, s.quantization_range)[0]
    assert np.array_equal(ours, enc)
    assert np.array_equal(quantize(values, s.clipping_range, s.quantization_range)[0], enc)
    with pytest.raises(ValueError, match="not field elements"):
        exact_quantize([values[0] + 0.5], s.clipping_range, s.quantization_range)
    with pytest.raises(ValueError, match="2 x clipping_range"):
        exact_quantize(values, 8.0, 4194304)


def test_exact_secaggplus_mod_is_flowers_mod_with_our_quantizer() -> None:
    import importlib

    flower = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    collect = exact_secaggplus_mod.__globals__["_collect_masked_vectors"]
    assert collect.__code__ is flower._collect_masked_vectors.__code__
    assert collect.__globals__["quantize"] is exact_quantize
    assert exact_secaggplus_mod.__code__ is flower.secaggplus_mod.__code__
    assert flower.quantize is not exact_quantize  # Flower itself is untouched
    assert "quantize" in flower._collect_masked_vectors.__code__.co_names  # the name we rebind is still used


def _capture_strategy(grid):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """A legacy Strategy that sends every node the same FitIns and keeps the unmasked aggregate."""
    from flwr.common import FitIns
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import Strategy

    class Capture(Strategy):
        mean: np.ndarray | None = None
        arrived: list[int] = []
        failures: list[str] = []

        def initialize_parameters(self, client_manager):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
            return None

        def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
            return [(GridClientProxy(nid, grid, 1), FitIns(parameters, {})) for nid in grid.get_node_ids()]

        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
            from flwr.common import parameters_to_ndarrays

            self.failures = [str(f) for f in failures]
            if results:
                self.mean = parameters_to_ndarrays(results[0][1].parameters)[0]
                self.arrived = [int(proxy.node_id) for proxy, _ in results]
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
            return []

        def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
            return None, {}

        def evaluate(self, server_round, parameters):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
            return None

    return Capture()


def _run_real_secaggplus(encodings: np.ndarray, params: im.IntegerMechanismParams) -> np.ndarray:
    """One real SecAgg+ round (Flower's workflow and client mod, in-process Grid) over ``encodings``."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.common.constant import PARTITION_ID_KEY
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    from fed_nessa.sim.grid import InProcessGrid

    app = ClientApp(mods=[exact_secaggplus_mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        vec = to_flower(encodings[int(ctx.node_config[PARTITION_ID_KEY])], params)
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vec]), num_examples=1, metrics={})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    n = len(encodings)
    grid = InProcessGrid(app, n, {})
    strategy = _capture_strategy(grid)
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([np.zeros(1, np.float32)])
    legacy = LegacyContext(Context(run_id=1, node_id=1, node_config={}, state=state, run_config={}),
                           strategy=strategy, client_manager=SimpleClientManager())
    s = flower_settings(params)
    SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=3, max_weight=s.max_weight,
                       clipping_range=s.clipping_range, quantization_range=s.quantization_range,
                       modulus_range=s.modulus_range)(grid, legacy)
    assert strategy.mean is not None, strategy.failures
    return field_sum_from_flower(strategy.mean, len(strategy.arrived), params)


def test_a_real_secaggplus_round_sums_our_field_exactly_with_no_global_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's workflow + our exact mod: the unmasked sum is the modular sum; numpy's global generator never used."""
    params = im.build_params(100, 1.0, 1.0, 21, min_devices=5, max_devices=5)
    noise = ReproducibleNoise(15, "round")
    encodings = np.stack([im.encode(x, params, noise) for x in np.random.default_rng(16).normal(size=(5, 100))])
    for name in ("rand", "randn", "random", "random_sample", "randint", "uniform", "normal", "choice", "seed"):
        monkeypatch.setattr(np.random, name, _raise)
    revealed = _run_real_secaggplus(encodings, params)
    assert np.array_equal(revealed, im.modular_sum(encodings, params))
    decoded = im.decode(revealed, params, 5)
    assert decoded.shape == (100,)


def test_summed_noise_has_the_law_of_the_sum_of_shares() -> None:
    params = dataclasses.replace(_params(dim=200, n=4), device_variance=7.0)
    noise = ReproducibleNoise(17, "summed")
    draws = np.concatenate([im.summed_noise(params, 4, noise) for _ in range(100)])
    assert _chi_square_pvalue(draws, lambda k: skellam_log_pmf(k, 28.0)) > 1e-3
    assert _chi_square_pvalue(draws, lambda k: skellam_log_pmf(k, 7.0)) < 1e-6


class _FixedUniforms:
    """A noise source whose uniforms are given: the coupling's shared draws, chosen adversarially."""

    def __init__(self, u: np.ndarray) -> None:
        self.u = u

    def uniform(self, n: int) -> np.ndarray:
        assert n == self.u.size
        return self.u

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:  # pragma: no cover - never drawn
        raise AssertionError("the rounding draws uniforms only")


def _coupled_sup(params: im.IntegerMechanismParams, s: np.ndarray, x: np.ndarray) -> float:
    """sup over the shared uniforms of ``||R_u(s + x) - R_u(s)||_2``, through the encoder itself.

    A coordinate's difference depends on its own uniform only and is constant between the breakpoints
    (the two fractional parts), so the left ends 0, f(s), f(s + x) of the pieces reach every value.
    """
    radius = params.vectors_per_device * params.l2_clip
    a, b = (im.rotate(im.clip_l2(v, radius) * params.scale, params) for v in (s, s + x))
    worst = np.zeros(params.padded_dim)
    for u in (np.zeros(params.padded_dim), a - np.floor(a), b - np.floor(b)):
        d = im.encode_rounded(s + x, params, _FixedUniforms(u)) - im.encode_rounded(s, params, _FixedUniforms(u))
        worst = np.maximum(worst, d.astype(np.float64) ** 2)
    return float(math.sqrt(worst.sum()))


def test_the_example_levels_coupled_bound_is_never_exceeded_at_adversarial_inputs() -> None:
    """Example level: a device rounds the SUM of its clipped examples once (beta 0). For neighbouring sums s and
    s + x (||x|| <= clip) and the WORST shared uniforms, the rounded sums are within the recorded bound c + sqrt(d);
    adversarial inputs come close to it, above both the clip and the one-vector (conditional rounding) bound."""
    from fed_nessa.privacy.skellam import DEFAULT_BETA, rounded_l2_norm_bound

    dim, m = 256, 4
    params = im.build_params(dim, 1.0, 1.0, 3, min_devices=2, max_devices=2, vectors_per_device=m, beta=0.0,
                             clip_per_sqrt_dim=8.0)
    c = params.scale * params.l2_clip
    assert params.norm_bound == c + math.sqrt(dim)

    def from_rotated(y: np.ndarray) -> np.ndarray:
        return im.unrotate(y, params) / params.scale

    rng = np.random.default_rng(23)
    half = np.where(np.arange(dim) % 2, 1e-3, 0.0)  # half the coordinates just above 0: each rounds 0 or 1
    half[::2] = math.sqrt((c * c * (1 - 1e-6) - np.dot(half, half)) / (dim // 2))  # the rest spends the norm
    spread = np.full(dim, c / math.sqrt(dim) * (1 - 1e-9))
    spike = np.zeros(dim)
    spike[0] = c * (1 - 1e-9)
    adversarial = [half, -half, spread, spike, *(v / np.linalg.norm(v) * c for v in rng.normal(size=(10, dim)))]
    sums = [np.full(dim, 0.5), rng.uniform(-3, 3, dim), 1e-3 * np.ones(dim)]
    sups = []
    for y_x in adversarial:
        for y_s in sums:
            x = from_rotated(y_x)
            assert np.linalg.norm(x) <= params.l2_clip
            sups.append(_coupled_sup(params, from_rotated(y_s), x))
    # the projection onto the ball of m clips: a sum on its surface, x pushing out or in
    edge = rng.normal(size=dim)
    edge *= m * params.l2_clip / np.linalg.norm(edge)
    for sign in (1.0, -1.0):
        sups.append(_coupled_sup(params, edge, sign * edge / m))
    assert max(sups) <= params.norm_bound
    one_vector = rounded_l2_norm_bound(c, DEFAULT_BETA, dim)
    assert max(sups) > one_vector and max(sups) > c + 0.4 * math.sqrt(dim)


def test_a_sum_of_examples_is_rounded_once_and_projected() -> None:
    """encode: one rounding and one share per device, its sum projected onto m clips; more than one vector
    needs beta 0; the bit width counts the clipped vectors, the rounding error one per device."""
    params = dataclasses.replace(im.build_params(300, 0.5, 1.0, 3, min_devices=2, max_devices=2,
                                                 vectors_per_device=4, beta=0.0), device_variance=0.0)
    far = np.random.default_rng(18).normal(size=300) * 10
    rounded = im.centred(im.encode(far, params, ReproducibleNoise(19, "rows")), params)
    # the decoded vector is the projection onto radius 4 x 0.5 (up to the rounding of one vector)
    decoded = im.unrotate(rounded.astype(np.float64), params) / params.scale
    np.testing.assert_allclose(decoded, far * 2.0 / np.linalg.norm(far), atol=2 * math.sqrt(300) / params.scale)
    with pytest.raises(ValueError, match="beta must be 0"):
        im.build_params(300, 0.5, 1.0, 3, min_devices=2, max_devices=2, vectors_per_device=4)
    assert im.sum_bound(params, 2) > im.sum_bound(dataclasses.replace(params, vectors_per_device=1), 2)


def test_the_scale_is_the_largest_candidate_whose_field_fits() -> None:
    small = im.build_params(1000, 1.0, 1.0, 1, min_devices=4, max_devices=4)
    assert small.scale * small.l2_clip == im.SCALE_CANDIDATES[0] * math.sqrt(small.padded_dim)
    crowded = im.build_params(1 << 17, 1.0, 1.0, 1, min_devices=10, max_devices=10_000, vectors_per_device=400,
                              beta=0.0)
    k = crowded.scale * crowded.l2_clip / math.sqrt(crowded.padded_dim)
    assert k in im.SCALE_CANDIDATES and k < im.SCALE_CANDIDATES[0] and crowded.bits <= im.MAX_BITS
    bigger = [c for c in im.SCALE_CANDIDATES if c > k]
    for c in bigger:  # every larger scale would need more than the field's bits
        with pytest.raises(ValueError, match="bits"):
            im.build_params(1 << 17, 1.0, 1.0, 1, min_devices=10, max_devices=10_000, vectors_per_device=400,
                            beta=0.0, clip_per_sqrt_dim=c)


def test_edited_parameters_are_refused_and_the_release_is_what_is_accounted() -> None:
    params = _params(dim=500, n=10)
    for field, value in (("norm_bound", params.norm_bound * 0.9), ("scale", params.scale * 2),
                         ("l2_clip", 0.5), ("beta", 0.01)):
        with pytest.raises(ValueError, match="is not the rounded bound"):
            dataclasses.replace(params, **{field: value})
    release = params.release(0.02, 30)
    assert (release.l2_sensitivity, release.l1_sensitivity) == (params.norm_bound, params.l1_bound)
    assert release.variance == params.device_variance * params.min_devices
    assert (release.sample_rate, release.steps) == (0.02, 30)
