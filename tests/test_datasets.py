"""Embedding sets: validation, files, the real-model loader, voice splits and households."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fed_nessa.data import datasets as D
from fed_nessa.data.datasets import EmbeddingSet, EmbeddingSetError
from fed_nessa.data.shards import load_shard, shard_paths

torch.set_num_threads(1)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    a = rng.standard_normal((n, d)).astype(np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _toy(n_voices: int = 6, per_voice: int = 2, utts: int = 8, seed: int = 0) -> EmbeddingSet:
    """n_voices voices x per_voice pseudo-speakers x utts utterances, two models (dims 5 and 3)."""
    rng = np.random.default_rng(seed)
    spk = np.repeat(np.arange(n_voices * per_voice), utts)
    voice = spk // per_voice
    utt = np.tile(np.arange(utts), n_voices * per_voice)
    n = spk.size
    return EmbeddingSet({"a": _unit(rng, n, 5), "b": _unit(rng, n, 3)}, spk, voice, utt,
                        {"a": "model-a:v1", "b": "model-b:v1"}, name="toy")


# --- construction and validation -------------------------------------------------------------

def test_basic_properties() -> None:
    es = _toy()
    assert es.n == 96 and len(es) == 96
    assert es.models == ("a", "b") and es.dim("a") == 5 and es.dim("b") == 3
    assert es.num_speakers == 12 and es.num_voices == 6
    assert es.emb("model-b:v1") is es.emb("b")  # a model id works where a name does
    with pytest.raises(ValueError, match="no model 'c'"):
        es.emb("c")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda kw: kw["embeddings"].__setitem__("a", kw["embeddings"]["a"][:-1]), "expected shape"),
        (lambda kw: kw.__setitem__("speaker", kw["speaker"][:-1]), "one id per row"),
        (lambda kw: kw["embeddings"]["a"].__setitem__((3, 1), np.nan), "non-finite"),
        (lambda kw: kw["embeddings"]["a"].__setitem__(4, 0.0), "all-zero"),
        (lambda kw: kw["embeddings"].__setitem__("a", kw["embeddings"]["a"].astype(np.float64)), "float32"),
        (lambda kw: kw["model_ids"].pop("b"), "missing model id"),
        (lambda kw: kw["voice"].__setitem__(0, 5), "more than one voice"),
        (lambda kw: kw["utterance"].__setitem__(1, 0), "duplicate"),
        (lambda kw: kw["speaker"].__setitem__(0, -1), "negative"),
    ],
)
def test_invalid_sets_raise(change, message) -> None:  # noqa: ANN001
    es = _toy()
    kw = {"embeddings": {m: e.copy() for m, e in es.embeddings.items()}, "speaker": es.speaker.copy(),
          "voice": es.voice.copy(), "utterance": es.utterance.copy(), "model_ids": dict(es.model_ids),
          "name": "bad"}
    change(kw)
    with pytest.raises(EmbeddingSetError, match=message):
        EmbeddingSet(**kw)


def test_rows_are_normalised_on_construction() -> None:
    es = _toy()
    scaled = EmbeddingSet({"a": es.emb("a") * 3, "b": es.emb("b")}, es.speaker, es.voice, es.utterance,
                          es.model_ids, "scaled")
    np.testing.assert_allclose(np.linalg.norm(scaled.emb("a"), axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(scaled.emb("a"), es.emb("a"), atol=1e-6)


def test_subset_and_concat() -> None:
    es = _toy()
    sub = es.subset(es.voice < 2)
    assert sub.num_voices == 2 and sub.n == 32
    assert es.subset(np.array([5, 1])).speaker.tolist() == [es.speaker[5], es.speaker[1]]
    with pytest.raises(ValueError, match="does not match"):
        es.subset(np.ones(3, bool))
    with pytest.raises(ValueError, match="collide"):
        es.concat(sub)
    other = es.subset(es.voice >= 2)
    both = sub.concat(other)
    assert both.n == es.n and both.num_speakers == es.num_speakers
    renamed = EmbeddingSet(other.embeddings, other.speaker, other.voice, other.utterance,
                           {"a": "model-a:v2", "b": "model-b:v1"}, "other")
    with pytest.raises(ValueError, match="model ids differ"):
        sub.concat(renamed)


# --- files -------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path) -> None:  # noqa: ANN001
    es = EmbeddingSet(_toy().embeddings, _toy().speaker, _toy().voice, _toy().utterance, _toy().model_ids,
                      "toy", meta={"seed": "7"})
    path = es.save(tmp_path / "set.safetensors")
    back = EmbeddingSet.load(path)
    assert back.name == "toy" and back.meta == {"seed": "7"} and back.model_ids == es.model_ids
    for m in es.models:
        np.testing.assert_array_equal(back.emb(m), es.emb(m))
    for k in ("speaker", "voice", "utterance"):
        np.testing.assert_array_equal(getattr(back, k), getattr(es, k))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_load_missing_and_corrupt_files(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(EmbeddingSetError, match="nowhere.safetensors: file not found"):
        EmbeddingSet.load(tmp_path / "nowhere.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(EmbeddingSetError, match="bad.safetensors: unreadable"):
        EmbeddingSet.load(bad)
    path = _toy().save(tmp_path / "ok.safetensors")
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(EmbeddingSetError, match="trunc.safetensors"):
        EmbeddingSet.load(truncated)


def _rewrite(path, tensors=None, meta=None):  # noqa: ANN001, ANN202
    from safetensors import safe_open
    from safetensors.numpy import save

    with safe_open(str(path), framework="numpy") as fh:
        t = {k: fh.get_tensor(k) for k in fh.keys()}
        m = dict(fh.metadata())
    t.update(tensors or {})
    m.update(meta or {})
    path.write_bytes(save(t, metadata=m))


def test_load_rejects_nan_and_wrong_dims(tmp_path) -> None:  # noqa: ANN001
    es = _toy()
    nan = es.save(tmp_path / "nan.safetensors")
    a = es.emb("a").copy()
    a[7, 2] = np.nan
    _rewrite(nan, {"emb/a": a})
    with pytest.raises(EmbeddingSetError, match=r"nan.safetensors: .*non-finite row.*first at row 7"):
        EmbeddingSet.load(nan)
    dims = es.save(tmp_path / "dims.safetensors")
    _rewrite(dims, meta={"dims": json.dumps({"a": 4, "b": 3})})
    with pytest.raises(EmbeddingSetError, match=r"dims.safetensors: model 'a': dimension .*recorded dimension 4"):
        EmbeddingSet.load(dims)
    other = es.save(tmp_path / "fmt.safetensors")
    _rewrite(other, meta={"format": "something else"})
    with pytest.raises(EmbeddingSetError, match="not a fed-nessa embedding set"):
        EmbeddingSet.load(other)


# --- real-model data ---------------------------------------------------------------------------

def test_real_sets_shapes_and_models() -> None:
    dev = D.load_real("real-dev")
    assert (dev.n, dev.num_speakers, dev.num_voices) == (1500, 50, 50)
    assert {m: dev.dim(m) for m in dev.models} == {"campp": 192, "resemblyzer": 256, "vfl_dvec": 256}
    np.testing.assert_array_equal(dev.speaker, dev.voice)
    speed = D.load_real("real-speed-dev")
    assert (speed.n, speed.num_speakers, speed.num_voices) == (6000, 250, 50)
    assert speed.model_ids == dev.model_ids
    for es in (dev, speed):
        for m in es.models:
            np.testing.assert_allclose(np.linalg.norm(es.emb(m), axis=1), 1.0, atol=1e-5)


def test_real_voice_ids_are_consistent_between_dev_and_speed_dev() -> None:
    dev, speed = D.load_real("real-dev"), D.load_real("real-speed-dev")
    np.testing.assert_array_equal(dev.voices, speed.voices)
    assert np.intersect1d(dev.speakers, speed.speakers).size == 0
    # The data itself links them: each speed-dev voice's speed-1.00 centroid is nearest the dev speaker
    # with the same id (pseudo-speaker id = offset + 5 x voice + speed index; index 2 is speed 1.00).
    for m in dev.models:
        cd = np.stack([dev.emb(m)[dev.voice == v].mean(0) for v in dev.voices])
        rows = speed.speaker == D.SPEED_SPEAKER_OFFSET + 5 * speed.voice + 2
        cs = np.stack([speed.emb(m)[rows & (speed.voice == v)].mean(0) for v in dev.voices])
        sim = (cs / np.linalg.norm(cs, axis=1, keepdims=True)) @ (cd / np.linalg.norm(cd, axis=1, keepdims=True)).T
        assert (sim.argmax(axis=1) == np.arange(dev.num_voices)).all(), m
    both = D.load_real("real-dev+speed")
    assert (both.n, both.num_speakers, both.num_voices) == (7500, 300, 50)


def test_real_folder_resolution(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    dev = D.load_real(D.resolve_real_folder("real-voices-dev"))  # an explicit folder works
    assert dev.n == 1500
    monkeypatch.setenv("FED_NESSA_DATA", str(tmp_path))
    (tmp_path / "real-voices-dev").mkdir()
    (tmp_path / "real-voices-dev" / "embeddings.npz").write_bytes(b"not a zip")
    with pytest.raises(EmbeddingSetError, match="embeddings.npz: unreadable or corrupt"):
        D.load_real("real-dev")
    with pytest.raises(FileNotFoundError, match="neither a data folder nor a known real set"):
        D.load_real("real-nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="embeddings.npz: file not found"):
        D.load_real(empty)


def test_real_folder_with_wrong_dims(tmp_path) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "embeddings.npz", speaker=np.zeros(3, np.int32), utterance=np.arange(3, dtype=np.int32),
             campp=_unit(rng, 3, 100))
    with pytest.raises(EmbeddingSetError, match="model 'campp': expected dimension 192"):
        D.load_real(tmp_path)


# --- splits ------------------------------------------------------------------------------------

def test_split_by_voice_never_shares_a_voice() -> None:
    es = D.load_real("real-dev+speed")
    for seed in range(5):
        train, test = D.split_by_voice(es, test_fraction=0.3, seed=seed)
        assert np.intersect1d(train.voice, test.voice).size == 0
        assert train.n + test.n == es.n and test.num_voices == 15
    a, b = D.split_by_voice(es, n_test_voices=10, seed=1), D.split_by_voice(es, n_test_voices=10, seed=1)
    np.testing.assert_array_equal(a[1].voices, b[1].voices)
    assert not np.array_equal(D.split_by_voice(es, n_test_voices=10, seed=2)[1].voices, a[1].voices)
    with pytest.raises(ValueError, match="not both"):
        D.split_by_voice(es, test_fraction=0.3, n_test_voices=3)
    with pytest.raises(ValueError, match="between 1 and 49"):
        D.split_by_voice(es, n_test_voices=50)


def test_validation_split_and_voice_samples() -> None:
    es = D.load_real("real-dev+speed")
    train, test = D.split_by_voice(es, n_test_voices=10, seed=0)
    fit, val = D.validation_split(train, 0.2, seed=0)
    assert val.num_voices == 8 and np.intersect1d(fit.voice, val.voice).size == 0
    assert np.intersect1d(val.voice, test.voice).size == 0
    small, big = D.sample_voices(train, 10, seed=3), D.sample_voices(train, 20, seed=3)
    assert small.num_voices == 10 and big.num_voices == 20
    assert np.isin(small.voices, big.voices).all()  # nested samples
    with pytest.raises(ValueError, match="cannot sample 41 voices"):
        D.sample_voices(train, 41)


def test_pairs() -> None:
    es = _toy()
    x, y, spk = D.pairs(es, "a", "b")
    assert x.shape == (96, 5) and y.shape == (96, 3)
    np.testing.assert_array_equal(spk, es.speaker)


# --- households ----------------------------------------------------------------------------------

def _check_households(shards, lo_s=1, hi_s=6, lo_u=5, hi_u=60) -> None:  # noqa: ANN001
    for s in shards:
        assert lo_s <= s.num_speakers <= hi_s
        assert np.array_equal(np.unique(s.speaker), np.arange(s.num_speakers))  # local ids 0..k-1
        counts = np.bincount(s.speaker)
        assert counts.min() >= lo_u and counts.max() <= hi_u


def test_households_use_each_speaker_once() -> None:
    es = D.load_real("real-dev+speed")
    train, _ = D.split_by_voice(es, n_test_voices=10, seed=0)
    shards = D.make_households(train, "campp", "resemblyzer", seed=4)
    _check_households(shards)
    assert sum(s.num_speakers for s in shards) == train.num_speakers
    assert sum(s.n for s in shards) == train.n  # <= 60 utterances each: all used
    assert shards[0].enroll_model == es.model_ids["campp"] and shards[0].d_x == 192 and shards[0].d_y == 256
    plans = D.plan_households(train, seed=4)
    used = np.concatenate([p.speakers for p in plans])
    assert np.unique(used).size == used.size == train.num_speakers
    again = D.make_households(train, "campp", "resemblyzer", seed=4)
    assert all(np.array_equal(a.enroll, b.enroll) for a, b in zip(shards, again))


def test_households_with_a_device_count() -> None:
    es = D.load_real("real-dev")
    shards = D.make_households(es, "campp", "vfl_dvec", seed=0, num_devices=20, utts_per_speaker=(5, 12),
                               vary_utterances=True)
    assert len(shards) == 20
    _check_households(shards, hi_u=12)
    assert sum(s.num_speakers for s in shards) <= 50
    with pytest.raises(ValueError, match="reuse_speakers=True"):
        D.make_households(es, "campp", "vfl_dvec", num_devices=60, speakers_per_device=(1, 6))
    reused = D.plan_households(es, seed=1, num_devices=60, reuse_speakers=True)
    assert len(reused) == 60
    counts = np.bincount(np.concatenate([p.speakers for p in reused]), minlength=75)[es.speakers]
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1  # least-used first keeps use balanced
    assert all(np.unique(p.speakers).size == p.speakers.size for p in reused)


def test_households_skip_speakers_with_too_few_utterances() -> None:
    es = _toy(utts=8)
    short = es.subset(~((es.speaker == 0) & (es.utterance >= 3)))
    plans = D.plan_households(short, seed=0, utts_per_speaker=(5, 60))
    assert 0 not in np.concatenate([p.speakers for p in plans])
    with pytest.raises(ValueError, match="minimum of 9 utterances"):
        D.plan_households(es, utts_per_speaker=(9, 60))


def test_write_devices(tmp_path) -> None:  # noqa: ANN001
    es = D.load_real("real-dev")
    shards = D.make_households(es, "resemblyzer", "vfl_dvec", seed=0)
    paths = D.write_devices(shards, tmp_path / "fleet", extra={"source": "real-dev"})
    assert [p.name for p in paths] == [f"device-{i:05d}.shard.safetensors" for i in range(len(shards))]
    assert shard_paths(tmp_path / "fleet") == paths
    back = load_shard(paths[3], expect_dx=256, expect_dy=256)
    np.testing.assert_array_equal(back.enroll, shards[3].enroll)
    manifest = json.loads((tmp_path / "fleet" / "manifest.json").read_text())
    assert manifest["num_devices"] == len(shards) and manifest["total_pairs"] == 1500
    assert manifest["devices"][3] == {"file": paths[3].name, "n": shards[3].n, "speakers": shards[3].num_speakers}
    assert manifest["source"] == "real-dev" and "embeddings" not in json.dumps(manifest)
    with pytest.raises(ValueError, match="already holds"):
        D.write_devices(shards[:2], tmp_path / "fleet")
    D.write_devices(shards[:2], tmp_path / "fleet", overwrite=True)
    assert len(shard_paths(tmp_path / "fleet")) == 2
