"""Build a device shard from a folder of audio: both models on every utterance, resumable, in parallel.

Layout read: ``AUDIO_DIR/<speaker>/<utterance>.wav|flac`` (utterances may sit
in sub-folders of a speaker folder; dot-files are ignored). Every utterance is
embedded by the enrollment model AND the runtime model; the pair becomes one
shard row with a device-local speaker id.

Why it is built this way:

* **Resumable.** Each embedding is cached, as soon as it arrives, in a side
  folder next to the output (``<name>.extract-cache/<model id>/<file sha256>.npy``).
  A re-run (after a crash, or with more audio) only computes what is missing;
  keying by the file's *content* hash and the model id means an edited file or
  new weights are recomputed, never mixed up.
* **One process per core, one thread each**: speaker models on short
  utterances scale far better across processes than across threads.
* **Nothing dropped silently**: every unusable file (unreadable, shorter than
  0.5 s, silent, no speech after a model's VAD, not audio, not in a speaker
  folder) is skipped, printed and listed in ``<name>.extract-report.json``.
* The speaker names never enter the shard; they stay on the device in
  ``<name>.speakers.json`` (local id -> folder name, and the file of every row).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from fed_nessa.atomic import atomic_write_text as _atomic_write_text
from fed_nessa.data.extract import MODEL_NAMES, get_backend
from fed_nessa.data.extract.audio import AudioError, is_audio_file, load_audio
from fed_nessa.data.extract.backend import Backend, MissingExtraError
from fed_nessa.data.shards import SHARD_SUFFIX, make_shard, write_shard

CACHE_SUFFIX = ".extract-cache"
# A worker process pays a start-up of several seconds (imports + model loads) against ~0.1-0.3 s per
# file, so by default a folder gets no more workers than it has batches of this many files to embed.
FILES_PER_WORKER = 24
REPORT_SUFFIX = ".extract-report.json"
SPEAKERS_SUFFIX = ".speakers.json"


@dataclass(frozen=True)
class Utterance:
    """One audio file of one speaker folder."""

    speaker: str
    path: Path
    rel: str  # path relative to the audio folder, '/'-separated (stable across machines)


@dataclass(frozen=True)
class Skipped:
    """A file that was not embedded, and why."""

    file: str
    reason: str


@dataclass(frozen=True)
class SidePaths:
    """The files written next to a shard."""

    shard: Path
    cache: Path
    report: Path
    speakers: Path

    @classmethod
    def for_shard(cls, out: str | os.PathLike[str]) -> SidePaths:
        out = Path(out)
        if not out.name.endswith(SHARD_SUFFIX) or out.name == SHARD_SUFFIX:
            raise ValueError(f"{out}: the output shard's name must end with '{SHARD_SUFFIX}'")
        base = out.name[: -len(SHARD_SUFFIX)]
        return cls(
            shard=out,
            cache=out.with_name(base + CACHE_SUFFIX),
            report=out.with_name(base + REPORT_SUFFIX),
            speakers=out.with_name(base + SPEAKERS_SUFFIX),
        )


@dataclass
class ExtractionResult:
    """What one extraction run did (also written as the report file)."""

    audio_dir: str
    shard: str
    enroll_model: str
    runtime_model: str
    files_found: int = 0
    embedded: int = 0
    speakers: int = 0
    from_cache: int = 0
    computed: int = 0
    workers: int = 1
    seconds: float = 0.0
    skipped: list[Skipped] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# ---------------------------------------------------------------- scanning


def scan_audio_dir(audio_dir: str | os.PathLike[str]) -> tuple[list[Utterance], list[Skipped]]:
    """The utterances of ``AUDIO_DIR/<speaker>/...``, sorted, plus the files that cannot be used."""
    root = Path(audio_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: audio folder not found")
    utterances: list[Utterance] = []
    skipped: list[Skipped] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            skipped.append(Skipped(entry.name, "not inside a speaker folder (layout: AUDIO_DIR/<speaker>/<file>)"))
            continue
        for path in sorted(p for p in entry.rglob("*") if p.is_file()):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if is_audio_file(path):
                utterances.append(Utterance(entry.name, path, rel.as_posix()))
            else:
                skipped.append(Skipped(rel.as_posix(), f"not a .wav/.flac file ('{path.suffix}')"))
    if not utterances:
        raise ValueError(f"{root}: no .wav/.flac files found in speaker folders (layout: AUDIO_DIR/<speaker>/<file>)")
    return utterances, skipped


# ---------------------------------------------------------------- cache


def content_hash(path: Path) -> str:
    """SHA-256 of a file's bytes: the cache key (a renamed file still hits, an edited one misses)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class EmbeddingCache:
    """Per-file outcomes on disk, keyed by (model id, file content hash); atomic writes.

    An outcome is an embedding (``<key>.npy``) or, for a file the model could
    not use, the reason (``<key>.skip``): a resumed run lists the same bad
    files again without loading any model for them.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, model: str, key: str) -> Path:
        return self.folder / model.replace(":", "-") / f"{key}.npy"

    def get(self, model: str, key: str, dim: int) -> np.ndarray | None:
        """The cached embedding, or None if absent or damaged (then it is recomputed)."""
        path = self._path(model, key)
        try:
            vec = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        ok = vec.shape == (dim,) and vec.dtype == np.float32 and np.isfinite(vec).all()
        return vec if ok and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-3 else None

    def put(self, model: str, key: str, vec: np.ndarray) -> None:
        path = self._path(model, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".npy.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.asarray(vec, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_skip(self, model: str, key: str) -> str | None:
        """Why ``model`` could not use the file, if a previous run found out."""
        try:
            return self._path(model, key).with_suffix(".skip").read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def put_skip(self, model: str, key: str, reason: str) -> None:
        _atomic_write_text(self._path(model, key).with_suffix(".skip"), reason)


# ---------------------------------------------------------------- workers

_WORKER_BACKENDS: dict[str, Backend] = {}


def _init_worker(model_names: Sequence[str]) -> None:
    """Per process: one thread for every math library, models loaded once."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)
    for name in model_names:
        if name not in _WORKER_BACKENDS:
            _WORKER_BACKENDS[name] = get_backend(name).load()


@dataclass
class FileOutcome:
    """What a worker made of one file: the embeddings it got, or why the file is unusable."""

    rel: str
    embeddings: dict[str, np.ndarray]
    reason: str | None = None
    failed_model: str | None = None  # None with a reason: the audio itself is bad (all models)


def _embed_file(path: str, rel: str, model_names: Sequence[str]) -> FileOutcome:
    """Embed one file with the named models, in order, stopping at the first rejection."""
    out = FileOutcome(rel, {})
    try:
        wav = load_audio(path)
    except AudioError as exc:
        out.reason = exc.problem
        return out
    for name in model_names:
        try:
            out.embeddings[name] = _WORKER_BACKENDS[name].embed(wav, rel)
        except AudioError as exc:
            out.reason, out.failed_model = exc.problem, name
            break
    return out


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _run_tasks(
    tasks: list[tuple[str, str, tuple[str, ...]]],
    model_names: Sequence[str],
    workers: int,
    on_result: Callable[[FileOutcome], None],
) -> None:
    """Run embedding tasks in-process (1 worker) or in a spawn-based pool, reporting each result."""
    if not tasks:
        return
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(model_names)
        for path, rel, names in tasks:
            on_result(_embed_file(path, rel, names))
        return
    # spawn: forking a process that already holds torch/onnxruntime thread pools can deadlock.
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(tuple(model_names),)
    ) as pool:
        futures: list[Future] = [pool.submit(_embed_file, *task) for task in tasks]
        try:
            for fut in as_completed(futures):
                on_result(fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


# ---------------------------------------------------------------- the run


@dataclass
class _Plan:
    """What a run still has to compute, after the cache was consulted."""

    embeddings: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # rel -> model -> vector
    keys: dict[str, str] = field(default_factory=dict)  # rel -> content hash
    failures: dict[str, str] = field(default_factory=dict)  # rel -> reason (known before any work)
    tasks: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)  # (path, rel, models)
    from_cache: int = 0


def _plan(utterances: list[Utterance], names: Sequence[str], ids: dict[str, str], dims: dict[str, int],
          cache: EmbeddingCache) -> _Plan:
    """Hash every file and sort it into: fully cached, known unusable, or a task for the missing models."""
    plan = _Plan()
    for utt in utterances:
        try:
            plan.keys[utt.rel] = key = content_hash(utt.path)
        except OSError as exc:
            plan.failures[utt.rel] = f"unreadable file ({exc.strerror or exc})"
            continue
        have = {n: v for n in names if (v := cache.get(ids[n], key, dims[n])) is not None}
        plan.embeddings[utt.rel] = have
        missing = tuple(n for n in names if n not in have)
        known_bad = [r for n in missing if (r := cache.get_skip(ids[n], key)) is not None]
        if known_bad:
            plan.failures[utt.rel] = known_bad[0]
        elif missing:
            plan.tasks.append((str(utt.path), utt.rel, missing))
        else:
            plan.from_cache += 1
    return plan


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="extract", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def build_shard(
    audio_dir: str | os.PathLike[str],
    enroll_model: str,
    runtime_model: str,
    out: str | os.PathLike[str],
    *,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ExtractionResult:
    """Extract paired embeddings for every utterance of ``audio_dir`` and write the device shard.

    Returns the run summary (also written to the report file). Raises
    ``ValueError``/``FileNotFoundError`` for user errors (bad folder, unknown
    model, wrong output name, no usable utterance at all), and
    :class:`~fed_nessa.data.extract.backend.MissingExtraError` if a model's package
    is not installed.
    """
    started = time.perf_counter()
    for name in (enroll_model, runtime_model):
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown speaker model {name!r} (choose from {', '.join(MODEL_NAMES)})")
    side = SidePaths.for_shard(out)
    utterances, skipped = scan_audio_dir(audio_dir)
    names = tuple(dict.fromkeys((enroll_model, runtime_model)))  # same model twice: embed once
    backends = {name: get_backend(name) for name in names}
    for backend in backends.values():
        if (reason := backend.missing()) is not None:
            raise MissingExtraError(reason)
    ids = {name: b.model_id for name, b in backends.items()}  # hashes the weights; no model load
    dims = {name: b.dim for name, b in backends.items()}
    cache = EmbeddingCache(side.cache)
    explicit_workers = workers is not None
    workers = max(1, int(workers or default_workers()))
    say = log or (lambda msg: print(msg, file=sys.stderr))

    result = ExtractionResult(
        audio_dir=str(audio_dir), shard=str(side.shard), enroll_model=ids[enroll_model],
        runtime_model=ids[runtime_model], files_found=len(utterances) + len(skipped), workers=workers,
    )
    plan = _plan(utterances, names, ids, dims, cache)
    embeddings, keys, failures = plan.embeddings, plan.keys, plan.failures
    result.from_cache = plan.from_cache
    bar = _progress(len(utterances), progress)
    bar.update(plan.from_cache + len(failures))

    def emit(msg: str) -> None:
        if progress and log is None:
            bar.write(msg, file=sys.stderr)  # keeps the progress bar intact
        else:
            say(msg)

    for item in skipped + [Skipped(rel, failures[rel]) for rel in sorted(failures)]:
        emit(f"skipped {item.file}: {item.reason}")

    def on_result(outcome: FileOutcome) -> None:
        rel = outcome.rel
        for name, vec in outcome.embeddings.items():
            cache.put(ids[name], keys[rel], vec)  # persisted at once: a crash loses nothing done
        embeddings[rel].update(outcome.embeddings)
        if outcome.reason is not None:
            failures[rel] = outcome.reason
            for name in [outcome.failed_model] if outcome.failed_model else names:
                cache.put_skip(ids[name], keys[rel], outcome.reason)
            emit(f"skipped {rel}: {outcome.reason}")
        else:
            result.computed += 1
        bar.update(1)

    use = min(workers, max(1, len(plan.tasks)))
    if not explicit_workers:
        use = min(use, max(1, -(-len(plan.tasks) // FILES_PER_WORKER)))
    result.workers = use
    try:
        _run_tasks(plan.tasks, names, use, on_result)
    finally:
        bar.close()

    skipped += [Skipped(rel, failures[rel]) for rel in sorted(failures)]
    result.skipped = skipped
    good = [u for u in utterances if u.rel not in failures]
    _write_outputs(side, result, good, embeddings, enroll_model, runtime_model, ids)
    result.seconds = round(time.perf_counter() - started, 3)
    _atomic_write_text(side.report, result.to_json())
    return result


def _write_outputs(
    side: SidePaths,
    result: ExtractionResult,
    good: list[Utterance],
    embeddings: dict[str, dict[str, np.ndarray]],
    enroll_model: str,
    runtime_model: str,
    ids: dict[str, str],
) -> None:
    """Shard + speaker map; with no usable utterance, only the report, then a clear error."""
    if not good:
        _atomic_write_text(side.report, result.to_json())
        raise ValueError(
            f"{result.audio_dir}: no usable utterance ({len(result.skipped)} skipped); see {side.report}"
        )
    speaker_names = sorted({u.speaker for u in good})
    local = {name: i for i, name in enumerate(speaker_names)}
    shard = make_shard(
        enroll=np.stack([embeddings[u.rel][enroll_model] for u in good]),
        runtime=np.stack([embeddings[u.rel][runtime_model] for u in good]),
        speaker=np.array([local[u.speaker] for u in good], dtype=np.int64),
        enroll_model=ids[enroll_model],
        runtime_model=ids[runtime_model],
    )
    write_shard(side.shard, shard)
    counts = {name: sum(u.speaker == name for u in good) for name in speaker_names}
    mapping = {
        "format": "fed-nessa speaker map",
        "shard": side.shard.name,
        "note": "device-local: speaker names and file names never leave the device",
        "speakers": [{"id": local[n], "name": n, "utterances": counts[n]} for n in speaker_names],
        "rows": [{"speaker": local[u.speaker], "file": u.rel} for u in good],
    }
    _atomic_write_text(side.speakers, json.dumps(mapping, indent=2))
    result.embedded = len(good)
    result.speakers = len(speaker_names)


def load_speaker_map(path: str | os.PathLike[str]) -> dict[int, str]:
    """Local speaker id -> speaker folder name, from a ``.speakers.json`` file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != "fed-nessa speaker map":
            raise ValueError("not a fed-nessa speaker map")
        return {int(s["id"]): str(s["name"]) for s in data["speakers"]}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: speaker map not found") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: bad speaker map ({exc})") from None
