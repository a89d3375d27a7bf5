"""resemblyzer (GE2E) backend: the package's own recipe, and no-speech audio rejected with a clear error."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from fed_nessa.data.extract.audio import AudioError
from fed_nessa.data.extract.ge2e import GE2EBackend


@pytest.fixture(scope="module")
def ge2e() -> GE2EBackend:
    reason = GE2EBackend().missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the extraction tests: {reason}")
        pytest.skip(reason)
    import torch

    torch.set_num_threads(1)
    return GE2EBackend().load()


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    from fed_nessa.data.extract.audio import load_audio
    from fed_nessa.data.extract.tts import Voice, require_engine, synthesise

    try:
        require_engine("espeak-ng")
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    path = synthesise("The juice of lemons makes fine punch.", tmp_path_factory.mktemp("ge2e") / "u.wav",
                      Voice("espeak-ng", "en-us+m3"))
    return load_audio(path)  # espeak-ng writes 22.05 kHz: this also exercises resampling


def test_equals_the_packages_own_pipeline(ge2e: GE2EBackend, speech: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from resemblyzer import VoiceEncoder, preprocess_wav

        reference = VoiceEncoder(device="cpu", verbose=False).embed_utterance(preprocess_wav(speech))
    np.testing.assert_allclose(ge2e.embed(speech), reference, atol=1e-6)


def test_embeddings_are_non_negative(ge2e: GE2EBackend, speech: np.ndarray) -> None:
    """GE2E ends with a ReLU, like the data set's `resemblyzer` column."""
    assert ge2e.embed(speech).min() >= 0.0


def test_noise_without_speech_is_an_audio_error(ge2e: GE2EBackend) -> None:
    noise = (0.03 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    with pytest.raises(AudioError, match=r"dev/noise\.wav: no speech found by resemblyzer's voice activity "
                                         r"detector \(0 samples left\) \[resemblyzer\]"):
        ge2e.embed(noise, "dev/noise.wav")


def test_weights_are_the_bundled_file(ge2e: GE2EBackend) -> None:
    assert ge2e.weight_file().name == "pretrained.pt"
    assert Path(ge2e.weight_file()).parent.name == "resemblyzer"
