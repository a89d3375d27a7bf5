"""Is the linear start's ceiling a limit of closed forms? A noise-free check with random features.

Issue 20's small-epsilon cells ship the DP linear start, and there it already matches the non-private
ridge on every pair (docs/results.md "The integer mechanism at small epsilon"): its gap closure is capped
by the linear map, not by the noise. A closed form that is not linear would lift that cap at the same
single statistics round: the ridge of ``x`` on ``[y, phi(y)]`` for public random features ``phi``, whose
sufficient statistics are the linear start's with a larger Gram block. This check asks whether any such
``phi`` beats the linear ridge before any noise is added. It pools every pair of a population that is
never reported (seed 1), fits each feature set with the protocol's own ridge
(:func:`fed_nessa.model.aligners.linear.ridge_from_stats`, the same relative ``alpha``) and scores it on
the population's evaluation speakers. The features, drawn from their own public seed:

- ``relu-H``: ``max(0, y A + c)``, ``H`` random units (the first layer of an untrained residual MLP);
- ``abs-H``: ``|y A|``, an even function of ``y`` (the part of the enrollment model a linear map misses
  is even in the speaker latent, docs/synthetic.md);
- ``quad-R``: every product of two of ``R`` random projections of ``y`` (``logcosh`` is quadratic near 0).

It prints a markdown table (docs/results.md cites it).

    python -m simulations.feature_ridge_check [--devices 3000] [--seed 1] [--widths 64 256 1024] [--ranks 16 32]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fed_nessa.data.population import Scenario
from fed_nessa.data.synthetic import generate_population
from fed_nessa.evaluation.protocol import evaluate_held_out
from fed_nessa.federated.suffstats import DEFAULT_ALPHA
from fed_nessa.model.aligners.linear import RidgeStats, ridge_from_stats

#: The features' own public seed (fixed: nothing here depends on the population's draws).
FEATURE_SEED = 2026
Features = Callable[[np.ndarray], np.ndarray]


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class FeatureRidge:
    """``x_hat = W [y, phi(y)] + b``, the enrollment side unchanged (a Comparator for the evaluation)."""

    features: Features
    w: np.ndarray  # (d_x, d_features)
    b: np.ndarray  # (d_x,)

    def map_enroll(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64)

    def map_runtime(self, y: np.ndarray) -> np.ndarray:
        return self.features(_unit(y)) @ self.w.T + self.b


def _relu(a: np.ndarray, c: np.ndarray) -> Features:
    return lambda y: np.maximum(y @ a + c, 0.0)


def _abs(a: np.ndarray) -> Features:
    return lambda y: np.abs(y @ a)


def _quad(p: np.ndarray) -> Features:
    rows, cols = np.triu_indices(p.shape[1])

    def phi(y: np.ndarray) -> np.ndarray:
        z = y @ p
        return z[:, rows] * z[:, cols]

    return phi


def _with_y(phi: Features) -> Features:
    return lambda y: np.concatenate([y, phi(y)], axis=1)


def feature_sets(d_y: int, widths: Sequence[int], ranks: Sequence[int]) -> dict[str, Features]:
    """The linear ridge's features first, then every random feature set (each keeps ``y`` itself)."""
    rng = np.random.default_rng(FEATURE_SEED)
    sets: dict[str, Features] = {"linear": lambda y: y}
    for h in widths:
        a = rng.standard_normal((d_y, h)) * (3.0 / np.sqrt(d_y))  # pre-activations of std ~3 on unit rows
        c = rng.standard_normal(h) * 0.5
        sets[f"relu-{h}"] = _with_y(_relu(a, c))
        sets[f"abs-{h}"] = _with_y(_abs(a))
    for r in ranks:
        sets[f"quad-{r}"] = _with_y(_quad(rng.standard_normal((d_y, r)) * (3.0 / np.sqrt(d_y))))
    return sets


def fit(features: Features, enroll: np.ndarray, runtime: np.ndarray, alpha: float = DEFAULT_ALPHA) -> FeatureRidge:
    """The protocol's ridge of the unit enrollment rows on the features of the unit runtime rows."""
    w, b = ridge_from_stats(RidgeStats.from_pairs(_unit(enroll), features(_unit(runtime))), alpha)
    return FeatureRidge(features, w.astype(np.float64), b.astype(np.float64))


@dataclass(frozen=True)
class Row:
    """One feature set's fit, scored on the evaluation speakers."""

    features: str
    size: int  # ridge inputs
    eer: float
    gap_closure: float | None
    pairs: int
    none: float  # not updating's EER


def check(devices: int, seed: int, widths: Sequence[int], ranks: Sequence[int]) -> list[Row]:
    """One row per feature set: its size and its EER and gap closure on the evaluation speakers."""
    pop = generate_population(devices, seed=seed)
    x = np.concatenate([d.enroll for d in pop.devices])
    y = np.concatenate([d.runtime for d in pop.devices])
    sets = feature_sets(y.shape[1], widths, ranks)
    fits = {name: fit(phi, x, y) for name, phi in sets.items()}
    report = evaluate_held_out(pop.eval, Scenario(pop.enroll_model, pop.runtime_model), fits)
    none = report.row("sym_before").metrics.eer
    return [Row(name, model.w.shape[1], report.row(f"asym_{name}").metrics.eer,
                report.row(f"asym_{name}").gap_closure, len(x), none) for name, model in fits.items()]


def markdown(rows: Sequence[Row], devices: int, seed: int) -> str:
    lines = [f"{devices} devices, population seed {seed}, {rows[0].pairs} pairs; not updating "
             f"{100 * rows[0].none:.2f} % EER", "",
             "| features | ridge inputs | EER % | gap closure |", "|---|---:|---:|---:|"]
    for r in rows:
        gap = "n/a" if r.gap_closure is None else f"{r.gap_closure:.2f}"
        lines.append(f"| {r.features} | {r.size} | {100 * r.eer:.2f} | {gap} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--widths", type=int, nargs="*", default=[64, 256, 1024])
    ap.add_argument("--ranks", type=int, nargs="*", default=[16, 32])
    args = ap.parse_args(argv)
    print(markdown(check(args.devices, args.seed, args.widths, args.ranks), args.devices, args.seed))


if __name__ == "__main__":
    main()
