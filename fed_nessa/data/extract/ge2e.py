"""GE2E d-vector (resemblyzer 0.1.4's LSTM), 256-d, weights ``resemblyzer/pretrained.pt``.

The recipe is the package's own: ``embed_utterance(preprocess_wav(wav))``,
i.e. volume normalisation to -30 dBFS (increase only), webrtcvad trimming of
long silences, 1.6 s partials at 1.3 per second, mean of the partial
embeddings, L2. Because the VAD can remove everything from an utterance that
carries no speech (noise, a tone), that case is reported as an
:class:`~fed_nessa.data.extract.audio.AudioError`, not as a crash.

Install quirks (see docs/extraction.md): webrtcvad imports ``pkg_resources``,
so setuptools must stay < 81; resemblyzer declares a dependency on the old
``typing`` backport, which must be uninstalled afterwards.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from fed_nessa.data.extract.audio import TARGET_SR, AudioError
from fed_nessa.data.extract.backend import Backend, MissingExtraError, package_file

# resemblyzer needs at least one 10 ms mel frame of voiced audio after its VAD.
MIN_VOICED_S = 0.1


class GE2EBackend(Backend):
    """resemblyzer GE2E speaker embeddings (256-d) on one CPU thread."""

    name = "resemblyzer"
    dim = 256
    requires = ("torch", "resemblyzer", "webrtcvad", "librosa")

    def weight_file(self) -> Path:
        return package_file("resemblyzer", "pretrained.pt")

    def _load(self) -> None:
        with warnings.catch_warnings():
            # webrtcvad: pkg_resources deprecation; resemblyzer: scipy.ndimage.morphology.
            warnings.simplefilter("ignore")
            try:
                import webrtcvad  # noqa: F401
                from resemblyzer import VoiceEncoder, preprocess_wav
            except ImportError as exc:
                raise MissingExtraError(
                    f"resemblyzer backend unavailable ({exc}); it needs resemblyzer==0.1.4 with setuptools<81"
                ) from None
            self._encoder = VoiceEncoder(device="cpu", verbose=False, weights_fpath=self.weight_file())
        self._encoder.eval()
        self._preprocess = preprocess_wav

    def _embed(self, wav: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            voiced = self._preprocess(wav)  # already 16 kHz: no resampling inside
        if voiced.size < MIN_VOICED_S * TARGET_SR:
            raise AudioError(
                "<waveform>", f"no speech found by resemblyzer's voice activity detector ({voiced.size} samples left)"
            )
        return self._encoder.embed_utterance(voiced.astype(np.float32))
