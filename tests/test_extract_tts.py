"""Test/demo speech synthesis: deterministic files in the layout the extractor reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fed_nessa.data.extract.tts import (
    FLITE_VOICES,
    Voice,
    make_demo_fleet,
    make_speaker_folders,
    require_engine,
    synthesise,
    voice_pool,
)


def _require_engines() -> None:
    try:
        require_engine("flite")
        require_engine("espeak-ng")
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the extraction tests: {exc}")
        pytest.skip(str(exc))


def test_synthesis_is_deterministic(tmp_path: Path) -> None:
    _require_engines()
    for voice in (Voice("flite", "rms"), Voice("espeak-ng", "en-us+f3")):
        a = synthesise("Four hours of steady work faced us.", tmp_path / "a.wav", voice, stretch=1.1, pitch=0.3)
        b = synthesise("Four hours of steady work faced us.", tmp_path / "b.wav", voice, stretch=1.1, pitch=0.3)
        assert a.read_bytes() == b.read_bytes() and a.stat().st_size > 10_000


def test_speaker_folders_layout(tmp_path: Path) -> None:
    _require_engines()
    files = make_speaker_folders(tmp_path, {"x": Voice("flite", "kal"), "y": Voice("espeak-ng", "en-us+m2")},
                                 {"x": 2, "y": 3}, seed=0)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in files) == [
        "x/u00.wav", "x/u01.wav", "y/u00.wav", "y/u01.wav", "y/u02.wav"]


def test_demo_fleet_is_reproducible_and_keeps_heldout_talkers_off_devices(tmp_path: Path) -> None:
    _require_engines()
    a = make_demo_fleet(tmp_path / "a", 3, heldout=2, seed=4, max_speakers=2, utterances=(2, 3),
                        heldout_utterances=2)
    b = make_demo_fleet(tmp_path / "b", 3, heldout=2, seed=4, max_speakers=2, utterances=(2, 3),
                        heldout_utterances=2)
    assert [p.relative_to(tmp_path / "a").as_posix() for p in a] == [
        "devices/device_000", "devices/device_001", "devices/device_002"]
    for da, db in zip(a, b):
        fa = sorted(p.relative_to(da) for p in da.rglob("*.wav"))
        assert fa == sorted(p.relative_to(db) for p in db.rglob("*.wav")) and fa
        assert all((da / f).read_bytes() == (db / f).read_bytes() for f in fa)
    heldout = {p.name for p in (tmp_path / "a" / "heldout").iterdir()}
    on_devices = {s.name for d in a for s in d.iterdir()}
    assert len(heldout) == 2 and not heldout & on_devices
    assert all(len(list((tmp_path / "a" / "heldout" / h).glob("*.wav"))) == 2 for h in heldout)
    with pytest.raises(ValueError, match="heldout must be in"):
        make_demo_fleet(tmp_path / "c", 1, heldout=len(voice_pool()))


def test_unknown_engine_and_missing_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown speech engine 'say'"):
        require_engine("say")
    monkeypatch.setattr("fed_nessa.data.extract.tts.shutil.which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"'flite' is not installed \(Debian: apt-get install flite\)"):
        require_engine("flite")


def test_voice_pool_starts_with_the_flite_voices() -> None:
    pool = voice_pool()
    assert [v.name for v in pool[:4]] == list(FLITE_VOICES) and len({(v.engine, v.name) for v in pool}) == len(pool)
