"""Device shards: the on-device file of paired embeddings.

A shard holds, for one device, the enrollment-model and runtime-model
embeddings of the *same* utterances plus device-local speaker ids. It never
leaves the device; only aligner updates do. The file is a safetensors file
(three tensors + string metadata), so a truncated or corrupt file fails to
parse instead of yielding garbage.

Every fault found by :func:`load_shard` raises :class:`ShardError` naming the
file and the fault, because a device must never train on garbage silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fed_nessa.atomic import atomic_write_bytes
from fed_nessa.errors import FedNessaError

SCHEMA_VERSION = 1
SHARD_SUFFIX = ".shard.safetensors"


class ShardError(FedNessaError, ValueError):
    """A shard file is missing, unreadable or violates the schema."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class Shard:
    """Paired embeddings of one device (validated on construction)."""

    enroll: np.ndarray  # (n, d_X) float32
    runtime: np.ndarray  # (n, d_Y) float32
    speaker: np.ndarray  # (n,) int64 local ids >= 0
    enroll_model: str
    runtime_model: str
    schema_version: int = SCHEMA_VERSION

    @property
    def n(self) -> int:
        return int(self.enroll.shape[0])

    @property
    def d_x(self) -> int:
        return int(self.enroll.shape[1])

    @property
    def d_y(self) -> int:
        return int(self.runtime.shape[1])

    @property
    def num_speakers(self) -> int:
        return int(np.unique(self.speaker).size)


#: Rows with a smaller L2 norm are all zeros: no direction to align, and L2-normalising them divides by 0.
ZERO_NORM = 1e-12


def row_fault(arr: np.ndarray) -> str | None:
    """What is wrong with the rows of a 2-D embedding array: non-finite, else all-zero (None: nothing).

    One check for every loader of embeddings (device shards, embedding sets): a zero row is
    no embedding, and training on one silently would teach the aligner nothing but noise.
    """
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        return f"{int(bad.sum())} non-finite row(s), first at row {int(np.argmax(bad))}"
    zero = np.linalg.norm(arr, axis=1) < ZERO_NORM
    if zero.any():
        return f"{int(zero.sum())} all-zero row(s), first at row {int(np.argmax(zero))}"
    return None


def _problems(shard: Shard, expect_dx: int | None, expect_dy: int | None) -> list[str]:
    """All schema violations of a shard, in a stable order (empty when valid)."""
    out: list[str] = []
    if shard.schema_version != SCHEMA_VERSION:
        out.append(f"unknown schema version {shard.schema_version} (expected {SCHEMA_VERSION})")
    for name, arr in (("enroll", shard.enroll), ("runtime", shard.runtime)):
        if arr.ndim != 2:
            out.append(f"'{name}' must be 2-D, got shape {arr.shape}")
        elif arr.dtype != np.float32:
            out.append(f"'{name}' must be float32, got {arr.dtype}")
        elif arr.shape[1] < 1:
            out.append(f"'{name}' has no columns (dimension 0)")
    if out:
        return out
    if shard.speaker.ndim != 1 or not np.issubdtype(shard.speaker.dtype, np.integer):
        return [f"'speaker' must be a 1-D integer array, got {shard.speaker.dtype} {shard.speaker.shape}"]
    n = shard.enroll.shape[0]
    if n < 1:
        out.append("empty device: no pairs (n must be >= 1)")
    if shard.runtime.shape[0] != n or shard.speaker.shape[0] != n:
        out.append(
            f"row counts differ: enroll {n}, runtime {shard.runtime.shape[0]}, speaker {shard.speaker.shape[0]}"
        )
    if expect_dx is not None and shard.enroll.shape[1] != expect_dx:
        out.append(f"wrong enrollment dimension: {shard.enroll.shape[1]} (expected {expect_dx})")
    if expect_dy is not None and shard.runtime.shape[1] != expect_dy:
        out.append(f"wrong runtime dimension: {shard.runtime.shape[1]} (expected {expect_dy})")
    for name, arr in (("enroll", shard.enroll), ("runtime", shard.runtime)):
        fault = row_fault(arr)
        if fault:
            out.append(f"'{name}' has {fault}")
    if n and (shard.speaker < 0).any():
        out.append("negative speaker id(s)")
    if not shard.enroll_model or not shard.runtime_model:
        out.append("missing enrollment-model or runtime-model id")
    return out


def validate_shard(
    shard: Shard, path: str | os.PathLike[str] = "<memory>", *, expect_dx: int | None = None,
    expect_dy: int | None = None,
) -> Shard:
    """Raise :class:`ShardError` listing every problem of ``shard``; return it unchanged if valid."""
    problems = _problems(shard, expect_dx, expect_dy)
    if problems:
        raise ShardError(path, "; ".join(problems))
    return shard


def make_shard(
    enroll: np.ndarray, runtime: np.ndarray, speaker: np.ndarray, enroll_model: str, runtime_model: str
) -> Shard:
    """Build and validate a shard from arrays (casting to the on-disk dtypes)."""
    shard = Shard(
        enroll=np.ascontiguousarray(enroll, dtype=np.float32),
        runtime=np.ascontiguousarray(runtime, dtype=np.float32),
        speaker=np.ascontiguousarray(speaker, dtype=np.int64),
        enroll_model=str(enroll_model),
        runtime_model=str(runtime_model),
    )
    return validate_shard(shard)


def write_shard(path: str | os.PathLike[str], shard: Shard) -> Path:
    """Validate, then write atomically (temp file in the same folder + fsync + rename)."""
    from safetensors.numpy import save

    path = Path(path)
    validate_shard(shard, path)
    meta = {
        "schema_version": str(shard.schema_version),
        "enroll_model": shard.enroll_model,
        "runtime_model": shard.runtime_model,
        "d_x": str(shard.d_x),
        "d_y": str(shard.d_y),
        "n": str(shard.n),
        "format": "fed-nessa device shard",
    }
    blob = save(
        {"enroll": shard.enroll, "runtime": shard.runtime, "speaker": shard.speaker}, metadata=meta
    )
    atomic_write_bytes(path, blob)
    return path


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt headers/bodies
        raise ShardError(path, f"unreadable or truncated shard ({type(exc).__name__}: {exc})") from None
    return tensors, meta


def load_shard(
    path: str | os.PathLike[str], *, expect_dx: int | None = None, expect_dy: int | None = None
) -> Shard:
    """Load and validate one shard; any fault raises :class:`ShardError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise ShardError(path, "file not found")
    if not path.is_file():
        raise ShardError(path, "not a regular file")
    tensors, meta = _read(path)
    missing = [k for k in ("enroll", "runtime", "speaker") if k not in tensors]
    if missing:
        raise ShardError(path, f"missing tensor(s): {', '.join(missing)}")
    if meta.get("format") != "fed-nessa device shard":
        raise ShardError(path, "not a fed-nessa device shard (metadata 'format' missing)")
    try:
        version = int(meta.get("schema_version", "-1"))
    except ValueError:
        raise ShardError(path, f"bad schema version {meta.get('schema_version')!r}") from None
    shard = Shard(
        enroll=tensors["enroll"],
        runtime=tensors["runtime"],
        speaker=tensors["speaker"],
        enroll_model=meta.get("enroll_model", ""),
        runtime_model=meta.get("runtime_model", ""),
        schema_version=version,
    )
    return validate_shard(shard, path, expect_dx=expect_dx, expect_dy=expect_dy)


def shard_paths(folder: str | os.PathLike[str]) -> list[Path]:
    """The shard files of a folder, sorted by name (device order is the file order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(folder, "shard folder not found")
    return sorted(folder.glob(f"*{SHARD_SUFFIX}"))


def describe(shard: Shard) -> str:
    """One-line, data-free summary (safe to log: counts and dims only)."""
    return json.dumps(
        {"n": shard.n, "speakers": shard.num_speakers, "d_x": shard.d_x, "d_y": shard.d_y,
         "enroll_model": shard.enroll_model, "runtime_model": shard.runtime_model}
    )
