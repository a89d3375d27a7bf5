"""Canaries inside a federation: plant them into the devices of a real run, score the aligner it released.

The centralised audit (:mod:`.empirical`) trains one function; this module audits a whole
federated run (``fed-nessa simulate``, either engine) without re-implementing any of it:

* **Planting** (before round 1): ``m`` canary pairs from :func:`.empirical.make_canaries`
  (random unit ``x_c``, random unit ``y_c``, inclusion by an independent fair coin, all
  from ``seed``). Canary ``j`` is *assigned* to device ``j mod fleet`` whatever its coin
  says, so the assignment carries no information about the coin; an included canary is
  appended to that device's pairs (one new local speaker each), an excluded one is never
  seen by anyone. The devices then run the protocol as usual: clipping, noise shares,
  ledgers, SecAgg+ sums.
* **The auditor's secret** (seed, m, assignment, inclusion bits, ``x_c``, ``y_c``) is written
  to ``<run-dir>.canaries.npz`` *beside* the run folder (like the key store
  ``<run-dir>.keys/``), never into the run folder or a ledger: a run folder is what gets
  published, and the bits are what the attack must guess.
* **Scoring** (after the run): the attack sees only the released aligner
  (``<run-dir>/aligner/``) and scores each canary by ``cos(map_runtime(y_c),
  map_enroll(x_c))`` minus a baseline that does not depend on any canary (see
  :func:`canary_scores`).
* **The claim**: the largest example-level epsilon (RDP and PLD) among the devices that
  were assigned a canary, re-derived from their signed ledgers (verified against the public
  key beside each ledger) by :mod:`fed_nessa.privacy.accounting` (memoised per history), never
  taken from the config. One canary is one pair: the claim's unit.

Planting must keep the run's privacy analysis valid for every canary: devices must stay well
below ``max-pairs-per-device`` (a device over it declines the statistics round, a decision that
depends on its data), and a config with DP-SGD rounds should use a fleet-wide ``sample-rate``
(with ``q = 1/ceil(n/B)`` a device's rate, recorded in its ledger, depends on its pair count).
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fed_nessa.atomic import atomic_write_bytes
from fed_nessa.canary.empirical import CLAIM_ACCOUNTANTS, INTEGER_CLAIM_ACCOUNTANTS, make_canaries
from fed_nessa.data.datasets import device_filename
from fed_nessa.data.population import Population
from fed_nessa.data.shards import SHARD_SUFFIX, Shard, load_shard, make_shard, write_shard
from fed_nessa.errors import FedNessaError
from fed_nessa.federated.rounds import ALIGNER_DIR
from fed_nessa.model.aligners.base import Aligner, load_aligner
from fed_nessa.model.artifacts import CARD_FILE
from fed_nessa.privacy.accountants import create_accountant
from fed_nessa.privacy.accounting import EpsilonMemo
from fed_nessa.privacy.chain import HEADER, read_chain
from fed_nessa.privacy.events import SKELLAM, DPEvent
from fed_nessa.privacy.ledger import DEVICE_LEDGER_NAME, DEVICE_PUB_NAME
from fed_nessa.privacy.signing import load_public_key

#: The auditor's file beside a run folder: ``<run-dir>.canaries.npz``.
SPEC_SUFFIX = ".canaries.npz"
#: Where a run keeps device ledgers (``<run-dir>/devices/<id>/``); the wire contract's name.
DEVICES_DIR = "devices"
#: The one-run analysis needs at least this many canaries to have any grid to guess on.
MIN_CANARIES = 10
#: Most canaries one audit plants (each a pair of embeddings in memory; beyond this the bound gains nothing).
MAX_CANARIES = 100_000
#: How canaries are spread over the devices (stated in the spec file and the report).
ASSIGNMENT_RULE = "canary j is assigned to device j mod fleet; appended to its pairs only if included"

Planter = Callable[[Population], Population]


class CanaryError(FedNessaError, ValueError):
    """A canary audit that cannot be set up or scored; the message names the file or value."""


@dataclass(frozen=True)
class CanarySpec:
    """Everything the auditor keeps secret and needs afterwards (one file beside the run folder)."""

    seed: int
    x: np.ndarray  # (m, d_x) unit enrollment-side canaries
    y: np.ndarray  # (m, d_y) unit runtime-side canaries
    included: np.ndarray  # (m,) bool: the fair coins
    device: np.ndarray  # (m,) int: the device each canary is assigned to (included or not)
    fleet: int

    @property
    def m(self) -> int:
        return int(len(self.included))

    def device_ids(self) -> list[str]:
        """The pseudonyms of the assigned devices (both engines name device i the same way)."""
        return [device_id(int(i)) for i in np.unique(self.device)]

    def save(self, path: Path) -> Path:
        """One ``.npz`` (no pickles), written atomically: a crash leaves the old secret or the new one."""
        buf = io.BytesIO()
        np.savez(buf, seed=np.int64(self.seed), x=self.x, y=self.y, included=self.included, device=self.device,
                 fleet=np.int64(self.fleet), rule=np.str_(ASSIGNMENT_RULE))
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> CanarySpec:
        """Read a spec back; a missing or foreign file is one error naming it."""
        if not path.is_file():
            raise FileNotFoundError(f"{path}: canary spec not found (written beside the run folder when the "
                                    "canaries were planted)")
        try:
            with np.load(path, allow_pickle=False) as z:
                spec = cls(int(z["seed"]), z["x"], z["y"], z["included"].astype(bool), z["device"].astype(np.int64),
                           int(z["fleet"]))
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise CanaryError(f"{path}: not a canary spec, or a truncated one ({type(exc).__name__}: {exc})") from None
        m = spec.m
        if (spec.x.ndim != 2 or spec.y.ndim != 2 or len(spec.x) != m or len(spec.y) != m or spec.device.shape != (m,)
                or not (np.isfinite(spec.x).all() and np.isfinite(spec.y).all())
                or (m and not 0 <= spec.device.min() <= spec.device.max() < spec.fleet)):
            raise CanaryError(f"{path}: corrupt canary spec (x {spec.x.shape}, y {spec.y.shape}, {m} coins, devices "
                              f"{spec.device.shape} over a fleet of {spec.fleet}; values must be finite)")
        return spec


def device_id(index: int) -> str:
    """Device ``index``'s pseudonym: its shard file's stem (the fleet engine uses the same)."""
    return device_filename(index)[: -len(SHARD_SUFFIX)]


def spec_path(run_dir: Path | str) -> Path:
    """``<run-dir>.canaries.npz``: beside the run folder, never inside it."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{run_dir.name}{SPEC_SUFFIX}"


def check_canaries(m: int) -> None:
    """Refuse too few canaries (the bound's grid needs >= 2% of m per side) or absurdly many, before anything runs."""
    if m < MIN_CANARIES:
        raise CanaryError(f"--canaries {m}: need at least {MIN_CANARIES} canaries for the one-run analysis")
    if m > MAX_CANARIES:
        raise CanaryError(f"--canaries {m}: at most {MAX_CANARIES} canaries (each is a planted pair held in memory)")


def make_spec(m: int, d_x: int, d_y: int, fleet: int, seed: int) -> CanarySpec:
    """Canaries and coins from ``seed`` (as the centralised audit), assigned round-robin over the fleet."""
    check_canaries(m)
    if fleet < 1:
        raise CanaryError("a federation with no device has nowhere to plant canaries")
    x, y, included = make_canaries(m, d_x, d_y, seed)
    return CanarySpec(seed, x, y, included, np.arange(m, dtype=np.int64) % fleet, fleet)


def _with_canaries(shard: Shard, x: np.ndarray, y: np.ndarray) -> Shard:
    """``shard`` plus the pairs ``(x, y)``, each under a new local speaker id."""
    if len(x) == 0:
        return shard
    first = int(shard.speaker.max()) + 1 if shard.n else 0
    speakers = np.arange(first, first + len(x), dtype=np.int64)
    return make_shard(np.vstack([shard.enroll, x]), np.vstack([shard.runtime, y]),
                      np.concatenate([shard.speaker, speakers]), shard.enroll_model, shard.runtime_model)


def _planted_rows(spec: CanarySpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.flatnonzero((spec.device == index) & spec.included)
    return spec.x[rows], spec.y[rows]


def plant_devices(devices: Sequence[Shard], spec: CanarySpec) -> tuple[Shard, ...]:
    """The devices with their included canaries appended (in memory: the fleet engine)."""
    _check_fleet(len(devices), spec)
    return tuple(_with_canaries(s, *_planted_rows(spec, i)) for i, s in enumerate(devices))


def plant_shard_files(paths: Sequence[Path], spec: CanarySpec) -> None:
    """Rewrite the shard files of devices that got an included canary (the Flower engine's devices)."""
    _check_fleet(len(paths), spec)
    for i, path in enumerate(paths):
        x, y = _planted_rows(spec, i)
        if len(x):
            write_shard(path, _with_canaries(load_shard(path), x, y))


def _check_fleet(n: int, spec: CanarySpec) -> None:
    if n != spec.fleet:
        raise CanaryError(f"the canaries were assigned over {spec.fleet} devices, the federation has {n}")


def plant(data: Population, spec: CanarySpec) -> Population:
    """The federation with the canaries in its devices (in memory, or rewritten shard files)."""
    if spec.x.shape[1] != data.d_x or spec.y.shape[1] != data.d_y:
        raise CanaryError(f"canaries of dims ({spec.x.shape[1]}, {spec.y.shape[1]}) do not fit a federation of "
                          f"dims ({data.d_x}, {data.d_y})")
    if data.devices:
        return dataclasses.replace(data, devices=plant_devices(data.devices, spec))
    if not data.shards:
        raise CanaryError("the federation holds no simulated device to plant canaries into")
    plant_shard_files(data.shards, spec)
    return data


def planter(m: int, seed: int, run_dir: Path | str) -> Planter:
    """A hook for the runner: make the spec for the federation it built, save it beside the run, plant.

    The spec is written *before* the run starts, so an interrupted run still has its secret.
    """
    check_canaries(m)
    target = spec_path(run_dir)
    if target.exists():
        raise CanaryError(f"{target} exists: it is an earlier run's secret; plant into a new run folder")

    def hook(data: Population) -> Population:
        fleet = len(data.devices) or len(data.shards)
        spec = make_spec(m, data.d_x, data.d_y, fleet, seed)
        spec.save(target)
        return plant(data, spec)

    return hook


# ----------------------------------------------------------------------------- scoring
def aligner_cosines(aligner: Aligner, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``cos(map_runtime(y_c), map_enroll(x_c))`` per canary: the scoring the deployed aligner serves."""
    mapped_y = np.asarray(aligner.map_runtime(y), np.float64)
    mapped_x = np.asarray(aligner.map_enroll(x), np.float64)
    return np.sum(mapped_y * mapped_x, axis=1)


def load_released(run_dir: Path | str) -> Aligner:
    """The aligner a run shipped (``<run-dir>/aligner/``); one clear error when there is none."""
    folder = Path(run_dir) / ALIGNER_DIR
    if not (folder / CARD_FILE).is_file():
        raise FileNotFoundError(f"{run_dir}: no released aligner ({folder / CARD_FILE} missing): did the run finish?")
    return load_aligner(folder)


def canary_scores(released: Aligner, spec: CanarySpec, baseline: np.ndarray | None = None) -> np.ndarray:
    """The attack's score per canary: released cosine minus a canary-independent ``baseline``.

    ``baseline`` must be computed without any canary (e.g. the run's initial network, built
    from the seed alone), or the one-run analysis is void. It helps only where that initial
    map survives into the released one (``linear-start = none``); after a statistics round
    the linear map is replaced by the private solve and the initial cosine is independent
    noise, so the audit passes ``None``.
    """
    scores = aligner_cosines(released, spec.x, spec.y)
    if baseline is not None:
        scores = scores - np.asarray(baseline, np.float64)
    return scores


# ----------------------------------------------------------------------------- the claim
@dataclass(frozen=True)
class Claim:
    """The largest epsilon the ledgers of the canaries' devices state, per accountant, at ``delta``."""

    epsilon: dict[str, float]
    delta: float
    devices: int
    worst_device: str


def ledger_events(run_dir: Path | str, dev: str) -> tuple[list[DPEvent], float]:
    """A device's reserved events and its delta, read as an auditor reads them (public key only)."""
    path = Path(run_dir) / DEVICES_DIR / dev / DEVICE_LEDGER_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: device ledger not found")
    pub = path.parent / DEVICE_PUB_NAME
    read = read_chain(path, load_public_key(pub) if pub.is_file() else None)
    if not read.ok:
        raise CanaryError(f"{path}: ledger does not verify ({read.faults[0].message()}); run `fed-nessa audit`")
    header = read.entries[0].get("payload", {}) if read.entries[0].get("kind") == HEADER else {}
    budget = header.get("budget") or {}
    if "delta" not in budget:
        raise CanaryError(f"{path}: the ledger's header states no delta")
    events = [DPEvent.from_dict(e["payload"]["event"]) for e in read.entries if e.get("kind") == "reserve"]
    return events, float(budget["delta"])


def claimed_epsilon(run_dir: Path | str, spec: CanarySpec, accountants: tuple[str, ...] | None = None) -> Claim:
    """The example-level claim covering every canary: the max over the devices they were assigned to.

    A device that reserved no DP event (the positive control's devices) claims nothing: inf.
    ``accountants``: by default :data:`CLAIM_ACCOUNTANTS`, or :data:`INTEGER_CLAIM_ACCOUNTANTS` where a
    canary device's ledger holds the integer mechanism (PLD has no Skellam mechanism).
    """
    histories = {dev: ledger_events(run_dir, dev) for dev in spec.device_ids()}
    if accountants is None:
        integer = any(ev.mechanism == SKELLAM for events, _ in histories.values() for ev in events)
        accountants = INTEGER_CLAIM_ACCOUNTANTS if integer else CLAIM_ACCOUNTANTS
    for acc in accountants:
        create_accountant(acc)  # an unknown name fails here, before any ledger is accounted
    per_device: dict[str, dict[str, float]] = {}
    deltas: set[float] = set()
    memo = EpsilonMemo()  # a fleet on one schedule has one history: account it once per accountant
    for dev, (events, delta) in histories.items():
        deltas.add(delta)
        spent = any(e.steps > 0 for e in events)
        per_device[dev] = {acc: memo.epsilon(events, delta, acc) if spent else float("inf") for acc in accountants}
    if len(deltas) != 1:
        raise CanaryError(f"{run_dir}: the canaries' devices state different deltas {sorted(deltas)}")
    worst_dev = max(per_device, key=lambda d: per_device[d][accountants[0]])
    worst = {acc: max(eps[acc] for eps in per_device.values()) for acc in accountants}
    return Claim(worst, deltas.pop(), len(per_device), worst_dev)
