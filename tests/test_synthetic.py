"""The synthetic population: determinism, shared models, households, quality and non-linearity."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fed_nessa.cli import main
from fed_nessa.data.datasets import EmbeddingSet
from fed_nessa.data.shards import load_shard, shard_paths
from fed_nessa.data.synthetic import (
    EVAL_SPEAKER_OFFSET,
    NEW,
    OLD,
    SyntheticWorld,
    WorldConfig,
    generate_population,
    with_world,
)
from fed_nessa.evaluation.protocol import evaluate_trials, gap_closure

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pop():  # noqa: ANN201
    return generate_population(40, seed=5)


def test_same_seed_gives_identical_arrays(pop) -> None:  # noqa: ANN001
    again = generate_population(40, seed=5)
    for m in (OLD, NEW):
        np.testing.assert_array_equal(again.train.emb(m), pop.train.emb(m))
        np.testing.assert_array_equal(again.eval.emb(m), pop.eval.emb(m))
    for a, b in zip(pop.devices, again.devices):
        np.testing.assert_array_equal(a.enroll, b.enroll)
        np.testing.assert_array_equal(a.runtime, b.runtime)
        np.testing.assert_array_equal(a.speaker, b.speaker)


def test_other_seed_other_speakers_same_models(pop) -> None:  # noqa: ANN001
    other = generate_population(40, seed=6)
    assert other.model_ids == pop.model_ids
    assert not np.allclose(other.eval.emb(OLD)[:50], pop.eval.emb(OLD)[:50])
    # Same models: the two worlds map the same latent inputs to the same embeddings.
    w1, w2 = SyntheticWorld.build(pop.config.world), SyntheticWorld.build(other.config.world)
    rng = np.random.default_rng(0)
    z, c = rng.standard_normal((4, 64), dtype=np.float32), rng.standard_normal((4, 16), dtype=np.float32)
    for name in (OLD, NEW):
        a, b = w1.models[name], w2.models[name]
        np.testing.assert_array_equal(a.embed(a.speaker_part(z), c), b.embed(b.speaker_part(z), c))
    # A different world seed is a different pair of models, with different ids.
    w3 = SyntheticWorld.build(with_world(WorldConfig(), world_seed=1))
    assert w3.old.model_id != w1.old.model_id and w3.new.model_id != w1.new.model_id
    assert not np.allclose(w3.old.embed(w3.old.speaker_part(z), c), w1.old.embed(w1.old.speaker_part(z), c))


def test_dims_norms_and_model_ids(pop) -> None:  # noqa: ANN001
    assert pop.train.dim(OLD) == 256 and pop.train.dim(NEW) == 192
    for es in (pop.train, pop.eval):
        for m in (OLD, NEW):
            np.testing.assert_allclose(np.linalg.norm(es.emb(m), axis=1), 1.0, atol=1e-5)
            assert es.model_ids[m].startswith(f"{m}:world=")
    assert json.loads(pop.train.meta["config"])["num_devices"] == 40


def test_households(pop) -> None:  # noqa: ANN001
    assert len(pop.devices) == 40
    for d, shard in enumerate(pop.devices):
        assert 1 <= shard.num_speakers <= 6
        assert np.array_equal(np.unique(shard.speaker), np.arange(shard.num_speakers))
        counts = np.bincount(shard.speaker)
        assert counts.min() >= 5 and counts.max() <= 60
        rows = pop.train_device == d
        np.testing.assert_array_equal(shard.enroll, pop.train.emb(OLD)[rows])  # runtime-upgrade default
        np.testing.assert_array_equal(shard.runtime, pop.train.emb(NEW)[rows])
        assert (shard.enroll_model, shard.runtime_model) == (pop.model_ids[OLD], pop.model_ids[NEW])
    sizes = [s.num_speakers for s in pop.devices]
    assert min(sizes) < max(sizes)  # non-IID by construction


def test_enrollment_upgrade_orientation() -> None:
    p = generate_population(3, seed=5, scenario="enrollment-upgrade")
    assert (p.enroll_model, p.runtime_model) == (NEW, OLD)
    assert p.devices[0].d_x == 192 and p.devices[0].d_y == 256
    with pytest.raises(ValueError, match="unknown scenario"):
        generate_population(3, scenario="both-upgrade")  # type: ignore[arg-type]


def test_eval_is_other_speakers_and_independent_of_fleet_size(pop) -> None:  # noqa: ANN001
    assert (pop.eval.num_speakers, pop.eval.n) == (200, 6000)
    assert pop.eval.speakers.min() >= EVAL_SPEAKER_OFFSET > pop.train.speakers.max()
    bigger = generate_population(60, seed=5)
    np.testing.assert_array_equal(bigger.eval.emb(NEW), pop.eval.emb(NEW))
    # Devices are drawn per device: the first 40 devices of a larger fleet hold the same speakers.
    np.testing.assert_allclose(bigger.devices[7].enroll, pop.devices[7].enroll, atol=1e-6)


def test_within_model_quality_and_naive_cross(pop) -> None:  # noqa: ANN001
    ev = pop.eval

    def eer(p: np.ndarray, q: np.ndarray) -> float:
        return evaluate_trials(p, q, ev.speaker, ev.utterance, k=10).eer

    old, new = eer(ev.emb(OLD), ev.emb(OLD)), eer(ev.emb(NEW), ev.emb(NEW))
    assert 0.08 <= old <= 0.15, old
    assert 0.02 <= new <= 0.06, new
    padded = np.hstack([ev.emb(NEW), np.zeros((ev.n, 64), np.float32)])
    assert 0.42 <= eer(ev.emb(OLD), padded) <= 0.58  # different models: naive cosine at chance


def _ridge(y: np.ndarray, x: np.ndarray, lam: float = 1e-5) -> np.ndarray:
    ya = np.c_[y, np.ones(len(y))].astype(np.float64)
    return np.linalg.solve(ya.T @ ya + lam * len(y) * np.eye(ya.shape[1]), ya.T @ x)


def _residual_mlp(y: np.ndarray, x: np.ndarray, w: np.ndarray, epochs: int):  # noqa: ANN202
    """A small residual MLP on top of the ridge map (inputs scaled to unit variance per coordinate)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(y.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, 512),
                              torch.nn.GELU(), torch.nn.Linear(512, x.shape[1]))
    with torch.no_grad():
        net[-1].weight.zero_()
        net[-1].bias.zero_()
    wt, scale = torch.tensor(w, dtype=torch.float32), float(np.sqrt(y.shape[1]))

    def f(v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.cat([v, torch.ones(len(v), 1)], 1) @ wt + net(v * scale), dim=1)

    opt = torch.optim.Adam(net.parameters(), 1e-3)
    yt, xt, gen = torch.tensor(y), torch.tensor(x), torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), 256):
            b = perm[i:i + 256]
            loss = (1 - (f(yt[b]) * xt[b]).sum(1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return lambda v: f(torch.tensor(v)).detach().numpy()


def generator_figures(num_devices: int, epochs: int, seed: int = 0) -> dict[str, float]:
    """Runtime-upgrade figures on held-out speakers: within-model EERs, ridge and residual-MLP cross EERs."""
    p = generate_population(num_devices, seed=seed)
    ev, tr = p.eval, p.train

    def eer(a: np.ndarray, b: np.ndarray) -> float:
        return evaluate_trials(a, b, ev.speaker, ev.utterance, k=10).eer

    before, after = eer(ev.emb(OLD), ev.emb(OLD)), eer(ev.emb(NEW), ev.emb(NEW))
    w = _ridge(tr.emb(NEW), tr.emb(OLD))
    ridge = eer(ev.emb(OLD), (np.c_[ev.emb(NEW), np.ones(ev.n)] @ w).astype(np.float32))
    mlp = eer(ev.emb(OLD), _residual_mlp(tr.emb(NEW), tr.emb(OLD), w, epochs)(ev.emb(NEW)))
    return {"pairs": tr.n, "speakers": tr.num_speakers, "old": before, "new": after, "ridge": ridge, "mlp": mlp,
            "gc_ridge": gap_closure(before, after, ridge), "gc_mlp": gap_closure(before, after, mlp)}


@pytest.mark.slow
def test_linear_map_is_not_the_ceiling() -> None:
    """A small MLP trained on enough pairs beats ridge clearly on held-out speakers (runtime upgrade).

    ``pytest -s -k ceiling tests/test_synthetic.py`` prints the figures (1000 devices, 6 epochs) of
    docs/synthetic.md; FED_NESSA_FIGURES_DEVICES and FED_NESSA_FIGURES_EPOCHS change the size.
    """
    figs = generator_figures(int(os.environ.get("FED_NESSA_FIGURES_DEVICES", "1000")),
                             int(os.environ.get("FED_NESSA_FIGURES_EPOCHS", "6")))
    print(json.dumps(figs))
    assert figs["mlp"] < 0.8 * figs["ridge"], figs
    assert figs["gc_mlp"] > figs["gc_ridge"] + 0.2, figs


def test_cli_writes_loadable_fleet(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "fleet"
    argv = ["synth", "--devices", "12", "--seed", "2", "--out", str(out), "--eval-speakers", "20"]
    assert main(argv) == 0
    paths = shard_paths(out)
    assert len(paths) == 12
    shards = [load_shard(p, expect_dx=256, expect_dy=192) for p in paths]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_devices"] == 12 and manifest["total_pairs"] == sum(s.n for s in shards)
    assert manifest["config"]["seed"] == 2 and manifest["scenario"] == "runtime-upgrade"
    ev = EmbeddingSet.load(out / "eval.safetensors")
    assert ev.num_speakers == 20 and ev.model_ids[OLD] == shards[0].enroll_model
    with np.load(out / "eval.npz") as z:  # the server's evaluation-file layout
        assert str(z["old_model"]) == shards[0].enroll_model and str(z["new_model"]) == shards[0].runtime_model
        np.testing.assert_array_equal(z[f"emb:{shards[0].runtime_model}"], ev.emb(NEW))
    same = generate_population(12, seed=2, eval_speakers=20)
    np.testing.assert_array_equal(shards[5].runtime, same.devices[5].runtime)
    assert main(argv) == 2  # refuses to mix with the shards already there
    assert main([*argv[:-2], "--eval-speakers", "20", "--overwrite", "--scenario", "enrollment-upgrade"]) == 0
    assert load_shard(shard_paths(out)[0]).d_x == 192
    assert main(["synth", "--devices", "0", "--out", str(tmp_path / "x")]) == 2
