"""The synthetic population generated lazily: device j is a pure function of (seed, world, j).

:func:`fed_nessa.data.synthetic.generate_population` holds every pair of every device (15 GiB at
30k devices); a 10^6-device fleet (~200 GB of float32) must instead be generated block by block
and forgotten. Here nothing is stored per device: device ``j``'s household size, utterance counts,
latent identities, sessions and both models' noise are drawn as
:func:`~fed_nessa.data.synthetic.draw_household` draws them, from the counter-keyed stream ``(seed, 0, j)``
(the eager generator's own streams, so the draws are the same numbers), and embedded by the same
two models with the same equations.

The one difference is rounding: BLAS rounds a row of a matrix product by its place in the
product, so the eager generator's embeddings depend (in the last bits) on which devices were
embedded with it. Here every matrix product is taken device by device (as fast as one product
over the chunk, measured), and every other operation is row-wise, so device ``j`` is bit-identical
whether generated alone or inside any block, and agrees with the eager fleet's device ``j`` to
float32 rounding. See docs/synthetic.md "The lazy population".
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fed_nessa.data.blocks import DeviceBlock, block_ranges
from fed_nessa.data.datasets import EmbeddingSet
from fed_nessa.data.shards import Shard
from fed_nessa.data.synthetic import (
    EVAL_SPEAKER_OFFSET,
    Draws,
    Matmul,
    PopulationConfig,
    Scenario,
    SyntheticWorld,
    WorldConfig,
    draw_speakers,
    generate_eval,
    household_counts,
    population_config,
    scenario_models,
)

#: Devices drawn and embedded together inside a block (bounds the draws' memory: ~2 KB per pair).
CHUNK_DEVICES = 256


def per_device_matmul(starts: np.ndarray) -> Matmul:
    """``a @ w`` taken segment by segment (rows ``starts[i]:starts[i + 1]``), one product per device.

    A row's value then depends only on its own device's rows, never on the devices around it.
    """
    bounds = [int(v) for v in starts]

    def mm(a: np.ndarray, w: np.ndarray) -> np.ndarray:
        out = np.empty((a.shape[0], w.shape[1]), dtype=np.result_type(a, w))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            np.matmul(a[lo:hi], w, out=out[lo:hi])
        return out

    return mm


class LazyPopulation:
    """A synthetic fleet of ``config.num_devices`` devices that is never held: blocks on demand."""

    def __init__(self, config: PopulationConfig, chunk_devices: int = CHUNK_DEVICES) -> None:
        most = config.speakers_per_device[1]
        if config.num_devices * most > EVAL_SPEAKER_OFFSET:
            raise ValueError(f"{config.num_devices} devices x up to {most} speakers do not fit below the "
                             f"evaluation speakers' ids ({EVAL_SPEAKER_OFFSET})")
        if chunk_devices < 1:
            raise ValueError(f"chunk_devices must be >= 1, got {chunk_devices}")
        self.config = config
        self.chunk_devices = int(chunk_devices)
        self.world = SyntheticWorld.build(config.world)
        self.enroll_model, self.runtime_model = scenario_models(config.scenario)

    @classmethod
    def create(cls, num_devices: int, seed: int = 0, scenario: Scenario = "runtime-upgrade", *,
               eval_speakers: int = 200, eval_utterances: int = 30, speakers_per_device: tuple[int, int] = (1, 6),
               utts_per_speaker: tuple[int, int] = (5, 60), world: WorldConfig | None = None,
               chunk_devices: int = CHUNK_DEVICES) -> LazyPopulation:
        """The lazy twin of :func:`~fed_nessa.data.synthetic.generate_population` (same arguments)."""
        config = population_config(num_devices, seed, scenario, eval_speakers=eval_speakers,
                                   eval_utterances=eval_utterances, speakers_per_device=speakers_per_device,
                                   utts_per_speaker=utts_per_speaker, world=world)
        return cls(config, chunk_devices)

    @property
    def num_devices(self) -> int:
        return self.config.num_devices

    @property
    def model_ids(self) -> dict[str, str]:
        return {name: m.model_id for name, m in self.world.models.items()}

    def device(self, j: int) -> Shard:
        """Device ``j`` alone, as a shard (bit-identical to its rows in any block)."""
        return self.block(j, j + 1).shard(j)

    def block(self, start: int, stop: int) -> DeviceBlock:
        """Devices ``start .. stop - 1`` in the fleet engine's layout, generated chunk by chunk.

        The household sizes are drawn first for the whole block (each stream is kept open), so
        the block's arrays are allocated once and each chunk embeds straight into them.
        """
        if not 0 <= start < stop <= self.num_devices:
            raise IndexError(f"block {start}..{stop} is outside the fleet's devices 0..{self.num_devices - 1}")
        cfg = self.config
        streams = [household_counts(cfg.seed, j, cfg.speakers_per_device, cfg.utts_per_speaker)
                   for j in range(start, stop)]
        n = np.array([int(counts.sum()) for _, counts in streams], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        models = self.world.models
        x = np.empty((int(starts[-1]), models[self.enroll_model].dim), dtype=np.float32)
        y = np.empty((int(starts[-1]), models[self.runtime_model].dim), dtype=np.float32)
        speaker = np.empty(int(starts[-1]), dtype=np.int64)
        for a, b in block_ranges(stop - start, self.chunk_devices):
            rows = slice(int(starts[a]), int(starts[b]))
            x[rows], y[rows], speaker[rows] = self._embed([draw_speakers(rng, counts, self.world)
                                                          for rng, counts in streams[a:b]])
        return DeviceBlock(start, x, y, starts, speaker, self.model_ids[self.enroll_model],
                           self.model_ids[self.runtime_model])

    def blocks(self, devices_per_block: int) -> Iterator[DeviceBlock]:
        """Consecutive blocks tiling the fleet; only the block being used is held."""
        for start, stop in block_ranges(self.num_devices, devices_per_block):
            yield self.block(start, stop)

    def speaker_ids(self, block: DeviceBlock) -> np.ndarray:
        """Fleet-wide speaker ids of a block's rows: ``j * max household + local id``.

        A pure function of (j, local id), unlike the eager fleet's ids (numbered in device order),
        and below :data:`~fed_nessa.data.synthetic.EVAL_SPEAKER_OFFSET` (checked at construction),
        so they never collide with the evaluation or validation speakers.
        """
        return block.device_of_row() * self.config.speakers_per_device[1] + block.speaker

    def eval_set(self) -> EmbeddingSet:
        """The evaluation speakers: stream ``(seed, 1)``, the eager population's ``eval``, identical."""
        return generate_eval(self.world, self.config.seed, self.config.eval_speakers, self.config.eval_utterances)

    def validation_set(self, speakers: int) -> EmbeddingSet:
        """The server's validation speakers: stream ``(seed, 2)``, identical to the eager population's."""
        return generate_eval(self.world, self.config.seed, speakers, self.config.eval_utterances, stream=2)

    def _embed(self, draws: list[Draws]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Consecutive devices' draws embedded by both models: x, y and local speaker ids.

        Every matrix product is taken device by device; everything else is row-wise.
        """
        k = np.array([d.counts.size for d in draws], dtype=np.int64)
        counts = np.concatenate([d.counts for d in draws])
        n = np.array([int(d.counts.sum()) for d in draws], dtype=np.int64)
        spk_starts = np.concatenate([[0], np.cumsum(k)])
        pair_starts = np.concatenate([[0], np.cumsum(n)])
        rows = np.repeat(np.arange(counts.size), counts)  # the chunk's speaker of each pair
        z = np.concatenate([d.z for d in draws])
        c = np.concatenate([d.c for d in draws])
        emb = {}
        for name, model in self.world.models.items():
            spk = model.speaker_part(z, per_device_matmul(spk_starts))
            low = np.concatenate([d.noise[name][0] for d in draws])
            iso = np.concatenate([d.noise[name][1] for d in draws])
            emb[name] = model.embed(spk[rows], c, low, iso, per_device_matmul(pair_starts))
        return emb[self.enroll_model], emb[self.runtime_model], rows - np.repeat(spk_starts[:-1], n)
