"""The synthetic population: the embedded default data, generated from a seed, never downloaded.

Two random, non-linear "speaker models" embed the same utterances (see ``docs/synthetic.md`` for
the equations and measured figures):

* a speaker has a latent identity ``z_s ~ N(0, I_64)``; an utterance has a session/channel
  vector ``c_u ~ N(0, I_16)`` that both models see (same recording);
* model ``m`` maps them to ``e = normalise(S_m(z_s) + C_m(c_u) + noise_m)`` where
  ``S_m(z) = G_m tanh(a_m A_m z) + E_m logcosh(R_m z)`` (speaker path),
  ``C_m(c) = K_m tanh(B_m c)`` (channel path) and ``noise_m`` is model-specific (a low-rank
  plus an isotropic Gaussian part, fresh per utterance);
* "synth-old" (256-d) has a strong low-rank *even* speaker component (``logcosh``) and much more
  model-specific noise; "synth-new" (192-d) has only the odd ``tanh`` path and little noise.

Why this shape: the new model is (nearly) odd in ``z``, the old model's even part is orthogonal to
every odd function of a symmetric latent, so no linear map from new to old can predict it, while
a small MLP can (it is a smooth function of an 8-dimensional projection of ``z``). The even part is
a function of the speaker only, so missing it costs speaker discrimination, not just MSE. Keeping
the channel path separate keeps the cross terms of speaker and channel out of the identity.

The two models come from a *world* seed, the speakers and utterances from a population seed, so
any number of populations and evaluation sets share the same two models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from fed_nessa.data.datasets import EmbeddingSet
from fed_nessa.data.shards import Shard, make_shard

OLD = "synth-old"
NEW = "synth-new"
SCENARIOS = ("runtime-upgrade", "enrollment-upgrade")
Scenario = Literal["runtime-upgrade", "enrollment-upgrade"]
#: Evaluation speakers get ids from here on, so they never collide with device speakers.
EVAL_SPEAKER_OFFSET = 1_000_000_000
DEFAULT_WORLD_SEED = 20240122
_CHUNK = 65536
#: ``a @ w`` for a (rows, k) float32 array; the lazy population passes one that multiplies device by device.
Matmul = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ModelSpec:
    """One synthetic speaker model (all gains are relative to unit-variance inputs)."""

    name: str
    dim: int
    speaker_alpha: float  # pre-activation scale of the tanh speaker path (non-linearity)
    speaker_gain: float  # output gain of the tanh speaker path
    even_gain: float  # output gain of the low-rank logcosh path (0: none)
    even_alpha: float  # pre-activation scale of the logcosh path
    channel_gain: float  # output gain of the channel path
    noise_lowrank: float  # norm of the model-specific low-rank noise (relative to a unit embedding)
    noise_iso: float  # norm of the model-specific isotropic noise


@dataclass(frozen=True)
class WorldConfig:
    """The two models; identical configs and seeds give bit-identical model weights."""

    world_seed: int = DEFAULT_WORLD_SEED
    latent_dim: int = 64
    channel_dim: int = 16
    speaker_hidden: int = 256
    even_hidden: int = 64
    even_rank: int = 8
    channel_hidden: int = 64
    noise_rank: int = 32
    old: ModelSpec = ModelSpec(OLD, 256, speaker_alpha=1.5, speaker_gain=1.0, even_gain=1.1, even_alpha=1.5,
                               channel_gain=1.0, noise_lowrank=1.6, noise_iso=0.8)
    new: ModelSpec = ModelSpec(NEW, 192, speaker_alpha=1.0, speaker_gain=1.0, even_gain=0.0, even_alpha=1.5,
                               channel_gain=1.6, noise_lowrank=0.2, noise_iso=0.1)


def _logcosh(t: np.ndarray) -> np.ndarray:
    return np.logaddexp(t, -t) - np.float32(np.log(2.0))


class SyntheticModel:
    """A random two-layer network standing in for a speaker encoder (weights from the world seed)."""

    def __init__(self, spec: ModelSpec, world: WorldConfig, stream: int) -> None:
        rng = np.random.default_rng([world.world_seed, stream])
        dz, dc, d = world.latent_dim, world.channel_dim, spec.dim

        def gauss(*shape: int) -> np.ndarray:
            return rng.standard_normal(shape)

        self.spec = spec
        self.model_id = model_id(spec, world)
        self._a = (gauss(dz, world.speaker_hidden) * (spec.speaker_alpha / np.sqrt(dz))).astype(np.float32)
        self._g = (gauss(world.speaker_hidden, d)
                   * (spec.speaker_gain / np.sqrt(world.speaker_hidden))).astype(np.float32)
        low = gauss(dz, world.even_rank) / np.sqrt(dz)
        self._r = (low @ gauss(world.even_rank, world.even_hidden)
                   * (spec.even_alpha / np.sqrt(world.even_rank))).astype(np.float32)
        self._e = (gauss(world.even_hidden, d) * (spec.even_gain / np.sqrt(world.even_hidden))).astype(np.float32)
        self._b = (gauss(dc, world.channel_hidden) / np.sqrt(dc)).astype(np.float32)
        self._k = (gauss(world.channel_hidden, d)
                   * (spec.channel_gain / np.sqrt(world.channel_hidden))).astype(np.float32)
        self._n = (gauss(world.noise_rank, d) * (spec.noise_lowrank / np.sqrt(world.noise_rank * d))).astype(np.float32)
        self._iso = np.float32(spec.noise_iso / np.sqrt(d))

    @property
    def dim(self) -> int:
        return self.spec.dim

    def speaker_part(self, z: np.ndarray, mm: Matmul = np.matmul) -> np.ndarray:
        """S_m(z): the identity's contribution (computed once per speaker).

        ``mm`` does the matrix products: BLAS rounds a row differently by where it sits in the
        product, so a caller that needs a row to be independent of its neighbours passes its own.
        """
        z = z.astype(np.float32, copy=False)
        out = mm(np.tanh(mm(z, self._a)), self._g)
        if self.spec.even_gain:
            out += mm(_logcosh(mm(z, self._r)), self._e)
        return out

    def channel_part(self, c: np.ndarray, mm: Matmul = np.matmul) -> np.ndarray:
        return mm(np.tanh(mm(c.astype(np.float32, copy=False), self._b)), self._k)

    def embed(self, spk_part: np.ndarray, c: np.ndarray, lowrank: np.ndarray | None = None,
              iso: np.ndarray | None = None, mm: Matmul = np.matmul) -> np.ndarray:
        """normalise(normalise(S(z) + C(c)) + noise); pass no noise for the clean embedding.

        The noise is added to the unit-length clean embedding, so ``noise_lowrank`` and
        ``noise_iso`` are norms relative to the signal, whatever the paths' raw scale.
        """
        out = spk_part + self.channel_part(c, mm)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        if lowrank is not None:
            out += mm(lowrank.astype(np.float32, copy=False), self._n)
        if iso is not None:
            out += iso.astype(np.float32, copy=False) * self._iso
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out.astype(np.float32, copy=False)


def model_id(spec: ModelSpec, world: WorldConfig) -> str:
    """An identifier that changes whenever anything that shapes the model's weights changes."""
    shared = {k: v for k, v in asdict(world).items() if k not in ("old", "new")}
    blob = json.dumps({"spec": asdict(spec), "world": shared}, sort_keys=True).encode()
    return f"{spec.name}:world={world.world_seed}:d={spec.dim}:{hashlib.sha256(blob).hexdigest()[:12]}"


@dataclass(frozen=True)
class SyntheticWorld:
    """The pair of models every population and evaluation set of one world shares."""

    config: WorldConfig
    old: SyntheticModel
    new: SyntheticModel

    @classmethod
    def build(cls, config: WorldConfig | None = None) -> SyntheticWorld:
        config = config or WorldConfig()
        return cls(config, SyntheticModel(config.old, config, 0), SyntheticModel(config.new, config, 1))

    @property
    def models(self) -> dict[str, SyntheticModel]:
        return {OLD: self.old, NEW: self.new}


@dataclass(frozen=True)
class PopulationConfig:
    """Everything that determines a population (recorded in the manifest and the eval file)."""

    num_devices: int
    seed: int = 0
    scenario: Scenario = "runtime-upgrade"
    eval_speakers: int = 200
    eval_utterances: int = 30
    speakers_per_device: tuple[int, int] = (1, 6)
    utts_per_speaker: tuple[int, int] = (5, 60)
    world: WorldConfig = field(default_factory=WorldConfig)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class SyntheticPopulation:
    """A fleet of devices plus a server-side evaluation set of *other* speakers, same two models."""

    config: PopulationConfig
    train: EmbeddingSet  # every device speaker, both models
    train_device: np.ndarray  # (train.n,) device index of each train row
    devices: list[Shard]
    eval: EmbeddingSet  # other speakers, both models
    enroll_model: str  # model name on the shards' enrollment side
    runtime_model: str
    validation: EmbeddingSet | None = None  # the server's own validation speakers (disjoint draws)

    @property
    def model_ids(self) -> dict[str, str]:
        return dict(self.train.model_ids)


def scenario_models(scenario: str) -> tuple[str, str]:
    """(enrollment model, runtime model) of an update scenario (see design.md section 2)."""
    if scenario == "runtime-upgrade":
        return OLD, NEW
    if scenario == "enrollment-upgrade":
        return NEW, OLD
    raise ValueError(f"unknown scenario '{scenario}' (choose {' or '.join(SCENARIOS)})")


@dataclass
class Draws:
    """The random draws of a group of speakers (a household, or an evaluation set)."""

    z: np.ndarray  # (S, dz) speaker latents
    counts: np.ndarray  # (S,) utterances per speaker
    c: np.ndarray  # (N, dc)
    noise: dict[str, tuple[np.ndarray, np.ndarray]]  # model -> (lowrank (N, r), iso (N, d))


def draw_speakers(rng: np.random.Generator, counts: np.ndarray, world: SyntheticWorld) -> Draws:
    """Latents and both models' noise for ``counts.size`` speakers, in this order, from ``rng``."""
    cfg = world.config
    n = int(counts.sum())
    z = rng.standard_normal((counts.size, cfg.latent_dim), dtype=np.float32)
    c = rng.standard_normal((n, cfg.channel_dim), dtype=np.float32)
    noise = {name: (rng.standard_normal((n, cfg.noise_rank), dtype=np.float32),
                    rng.standard_normal((n, m.dim), dtype=np.float32))
             for name, m in world.models.items()}
    return Draws(z, counts, c, noise)


def household_counts(seed: int, device: int, speakers_per_device: tuple[int, int],
                     utts_per_speaker: tuple[int, int]) -> tuple[np.random.Generator, np.ndarray]:
    """Device ``device``'s stream ``(seed, 0, device)`` and its utterances per speaker (its first draws).

    Household size uniform in ``speakers_per_device``, utterances per speaker uniform in
    ``utts_per_speaker``; the stream continues with the latents and noise (:func:`draw_household`).
    """
    rng = np.random.default_rng([seed, 0, device])
    k = int(rng.integers(speakers_per_device[0], speakers_per_device[1] + 1))
    return rng, rng.integers(utts_per_speaker[0], utts_per_speaker[1] + 1, size=k).astype(np.int64)


def draw_household(seed: int, device: int, speakers_per_device: tuple[int, int],
                   utts_per_speaker: tuple[int, int], world: SyntheticWorld) -> Draws:
    """Device ``device``'s draws, from its own stream ``(seed, 0, device)`` and nothing else.

    The counts (:func:`household_counts`), then the latents and both models' noise (the order of
    :func:`draw_speakers`). The eager and the lazy population draw this way, so their draws are the same numbers.
    """
    return draw_speakers(*household_counts(seed, device, speakers_per_device, utts_per_speaker), world)


#: Devices drawn and embedded together (bounds the generator's memory, not its output).
_DEVICE_BLOCK = 512


def _embed_all(world: SyntheticWorld, draws: Iterable[Draws]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Embeddings of every utterance by both models, plus the row -> speaker index map."""
    draws = list(draws)
    z = np.concatenate([d.z for d in draws])
    counts = np.concatenate([d.counts for d in draws])
    c = np.concatenate([d.c for d in draws])
    rows = np.repeat(np.arange(counts.size), counts)
    out = {}
    for name, model in world.models.items():
        spk = model.speaker_part(z)
        low = np.concatenate([d.noise[name][0] for d in draws])
        iso = np.concatenate([d.noise[name][1] for d in draws])
        emb = np.empty((c.shape[0], model.dim), dtype=np.float32)
        for i in range(0, c.shape[0], _CHUNK):
            sl = slice(i, i + _CHUNK)
            emb[sl] = model.embed(spk[rows[sl]], c[sl], low[sl], iso[sl])
        out[name] = emb
    return out, rows


def _utterance_index(counts: np.ndarray) -> np.ndarray:
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(int(counts.sum())) - starts


def generate_eval(world: SyntheticWorld, seed: int, speakers: int = 200, utterances: int = 30,
                  meta: dict[str, str] | None = None, stream: int = 1) -> EmbeddingSet:
    """An evaluation set of ``speakers`` new speakers x ``utterances``, from its own seed stream.

    Stream 1 is the reported test set; stream 2 the server's validation set (the promotion
    gate's), so choosing an aligner never looks at the speakers it is reported on.
    """
    if speakers < 2 or utterances < 2:
        raise ValueError("an evaluation set needs >= 2 speakers and >= 2 utterances each, "
                         f"got {speakers} x {utterances}")
    rng = np.random.default_rng([seed, stream])
    counts = np.full(speakers, utterances, dtype=np.int64)
    emb, rows = _embed_all(world, [draw_speakers(rng, counts, world)])
    ids = EVAL_SPEAKER_OFFSET * stream + rows
    return EmbeddingSet(emb, speaker=ids, voice=ids, utterance=_utterance_index(counts),
                        model_ids={k: m.model_id for k, m in world.models.items()},
                        name=f"synthetic-eval(seed={seed}, stream={stream})", meta=meta or {})


def embedding_dims(config: PopulationConfig) -> tuple[int, int]:
    """``(d_x, d_y)``: the population's enrollment and runtime models' dimensions, known before any draw."""
    specs = {OLD: config.world.old, NEW: config.world.new}
    enroll, runtime = scenario_models(config.scenario)
    return specs[enroll].dim, specs[runtime].dim


def population_config(
    num_devices: int, seed: int = 0, scenario: Scenario = "runtime-upgrade", *, eval_speakers: int = 200,
    eval_utterances: int = 30, speakers_per_device: tuple[int, int] = (1, 6),
    utts_per_speaker: tuple[int, int] = (5, 60), world: WorldConfig | None = None,
) -> PopulationConfig:
    """A checked population config (the eager and the lazy population share it)."""
    if int(num_devices) < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    s_lo, s_hi = (int(v) for v in speakers_per_device)
    u_lo, u_hi = (int(v) for v in utts_per_speaker)
    if not (1 <= s_lo <= s_hi and 1 <= u_lo <= u_hi):
        raise ValueError(f"bad household ranges: speakers {speakers_per_device}, utterances {utts_per_speaker}")
    scenario_models(scenario)
    return PopulationConfig(int(num_devices), int(seed), scenario, int(eval_speakers), int(eval_utterances),
                            (s_lo, s_hi), (u_lo, u_hi), world or WorldConfig())


def generate_population(
    num_devices: int, seed: int = 0, scenario: Scenario = "runtime-upgrade", *, eval_speakers: int = 200,
    eval_utterances: int = 30, speakers_per_device: tuple[int, int] = (1, 6),
    utts_per_speaker: tuple[int, int] = (5, 60), world: WorldConfig | None = None, progress: bool = False,
    validation_speakers: int = 0,
) -> SyntheticPopulation:
    """Generate ``num_devices`` households and an evaluation set; deterministic from ``seed``.

    Device ``d`` draws from its own stream ``(seed, 0, d)``: household size uniform in
    ``speakers_per_device``, utterances per speaker uniform in ``utts_per_speaker``. The
    evaluation set draws from ``(seed, 1)``, so it does not depend on ``num_devices``.
    """
    config = population_config(num_devices, seed, scenario, eval_speakers=eval_speakers,
                               eval_utterances=eval_utterances, speakers_per_device=speakers_per_device,
                               utts_per_speaker=utts_per_speaker, world=world)
    enroll, runtime = scenario_models(scenario)
    w = SyntheticWorld.build(config.world)
    device_ids = range(config.num_devices)
    if progress:
        from tqdm import tqdm

        device_ids = tqdm(device_ids, desc="drawing households", unit="device")
    # Devices are drawn and embedded a block at a time: a draw holds every model's noise for every
    # utterance (several times the embeddings' size), so 10^4-10^5 devices would not fit at once.
    # Each device has its own stream and embedding is row-wise, so the result does not depend on it
    # beyond float32 rounding (BLAS rounds a row by its place in the product; the lazy population does not).
    parts: dict[str, list[np.ndarray]] = {name: [] for name in w.models}
    rows_parts: list[np.ndarray] = []
    count_parts: list[np.ndarray] = []
    speakers_per: list[int] = []
    block: list[Draws] = []

    def flush() -> None:
        if not block:
            return
        part, part_rows = _embed_all(w, block)
        for name, arr in part.items():
            parts[name].append(arr)
        rows_parts.append(part_rows + sum(speakers_per[:-len(block)]))
        count_parts.extend(d.counts for d in block)
        block.clear()

    for d in device_ids:
        block.append(draw_household(config.seed, d, config.speakers_per_device, config.utts_per_speaker, w))
        speakers_per.append(int(block[-1].counts.size))
        if len(block) == _DEVICE_BLOCK:
            flush()
    flush()
    emb = {name: np.concatenate(arrs) for name, arrs in parts.items()}
    rows = np.concatenate(rows_parts)
    counts = np.concatenate(count_parts)
    spk_device = np.repeat(np.arange(config.num_devices), speakers_per)
    meta = {"generator": "fed_nessa.data.synthetic", "config": json.dumps(config.to_dict(), sort_keys=True)}
    ids = {k: m.model_id for k, m in w.models.items()}
    train = EmbeddingSet(emb, speaker=rows, voice=rows, utterance=_utterance_index(counts), model_ids=ids,
                         name=f"synthetic-train(seed={config.seed},devices={config.num_devices})", meta=meta)
    row_device = spk_device[rows]
    first_speaker = np.cumsum([0] + speakers_per)
    bounds = np.searchsorted(row_device, np.arange(config.num_devices + 1))
    devices = [
        make_shard(emb[enroll][bounds[d]:bounds[d + 1]], emb[runtime][bounds[d]:bounds[d + 1]],
                   rows[bounds[d]:bounds[d + 1]] - first_speaker[d], ids[enroll], ids[runtime])
        for d in range(config.num_devices)
    ]
    eval_set = generate_eval(w, config.seed, config.eval_speakers, config.eval_utterances, meta=meta)
    validation = (generate_eval(w, config.seed, validation_speakers, config.eval_utterances, meta=meta, stream=2)
                  if validation_speakers else None)
    return SyntheticPopulation(config, train, row_device, devices, eval_set, enroll, runtime, validation)


def with_world(config: WorldConfig, **changes: Any) -> WorldConfig:
    """A copy of a world config with some fields changed (e.g. another world seed)."""
    return replace(config, **changes)
