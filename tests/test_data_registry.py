"""The one data-source registry: one name list, one lookup, the same data bit for bit as before it."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from fed_nessa.config import FEDERATION_NAMES, SOURCE_NAMES, ConfigError, FederationConfig, from_run_config
from fed_nessa.data import registry
from fed_nessa.data.registry import load_federation_data, resolve


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _set(es) -> str:  # noqa: ANN001  (an EmbeddingSet)
    return _digest(es.speaker, es.utterance, *[es.embeddings[k] for k in sorted(es.embeddings)])


def _scored(es, fd) -> str:  # noqa: ANN001
    """What a federation's held-out (or validation) set is scored on: its scenario's two models, as the
    evaluation sets before the one population type held them (speaker, utterance, both models by name)."""
    models = sorted({fd.scenario.old_model, fd.scenario.new_model})
    return _digest(es.speaker, es.utterance, *[es.emb(m) for m in models])


def _devices(fd) -> str:  # noqa: ANN001
    return _digest(*[x for d in fd.devices for x in (d.enroll, d.runtime, d.speaker)])


# The synthetic generator's embeddings come out of BLAS products, whose last bits depend on the CPU's kernel and the
# thread count (the same commit gave three digests on two machines and two OMP settings). Its data are pinned by
# their integer labels exactly and their floats by moments to 1e-6 (1e-4 absolute; the kernels differ by ~1e-5 on
# these sums of 10^4-10^5 values): a changed draw moves the moments by far more.
_PATTERN_MOD = 7


def _moments(a: np.ndarray) -> tuple[float, float, float]:
    """Sum, sum of squares and a patterned sum (weights -3..3 cycling over the flat array) in float64."""
    x = np.asarray(a, np.float64).reshape(-1)
    pattern = (np.arange(x.size) % _PATTERN_MOD - 3).astype(np.float64)
    return float(x.sum()), float(x @ x), float(x @ pattern)


def _labels_and_moments(labels: list[np.ndarray], floats: list[np.ndarray]) -> tuple[str, list[float]]:
    return _digest(*labels), [m for a in floats for m in _moments(a)]


def _synthetic_set(es) -> tuple[str, list[float]]:  # noqa: ANN001  (an EmbeddingSet)
    return _labels_and_moments([es.speaker, es.utterance], [es.embeddings[k] for k in sorted(es.embeddings)])


def _synthetic_scored(es, fd) -> tuple[str, list[float]]:  # noqa: ANN001
    models = sorted({fd.scenario.old_model, fd.scenario.new_model})
    return _labels_and_moments([es.speaker, es.utterance], [es.emb(m) for m in models])


def _synthetic_devices(fd) -> tuple[str, list[float]]:  # noqa: ANN001
    return _labels_and_moments([d.speaker for d in fd.devices], [np.concatenate([d.enroll for d in fd.devices]),
                                                                 np.concatenate([d.runtime for d in fd.devices])])


def _same(got: tuple[str, list[float]], pinned: tuple[str, list[float]]) -> bool:
    return got[0] == pinned[0] and got[1] == pytest.approx(pinned[1], rel=1e-6, abs=1e-4)


# Pinned on the resolvers before the registry (commit 7492ce6): the same speakers held out, the same devices.
# The synthetic pins re-measured on e31d876 (the last commit with two population types; the 7492ce6 pins
# no longer held there): the one population type holds the same data bit for bit.
# The synthetic pins became labels and moments in session 16 (measured at commit ce0fe65), when a new machine's BLAS
# gave other last bits.
SYN_TRAIN = ("da5303b0a2a3130d", [-290.0895123167646, 2595.0000003465234, 86.35969720012844,
                                  -220.7760484155504, 2594.9999997073874, 130.5677988125042])
SYN_HELD_OUT = ("683ea1b9d82cb82d", [-256.1920279327199, 5999.999998885751, -264.3003806656281,
                                     -724.9391878844391, 5999.999993098772, 36.60530108603885])
FED_HELD_OUT = ("0f5b784eac1be8d7", [-125.89919343566591, 3000.0000025481067, -50.864767333854374,
                                     -300.6819760680529, 3000.000000018164, 98.42980668359388])
FED_DEVICES = ("6b1e2d27018b70cc", [-220.7760484155504, 2594.9999997073874, 130.5677988125042,
                                    -290.0895123167646, 2595.0000003465234, 86.35969720012844])
FED_VALIDATION = ("cae11174ab4cfc9f", [25.005630444102167, 2999.9999994592335, 115.31112579084777,
                                       -342.0010251613003, 2999.9999953642027, -55.70595065341923])


def test_centralised_sets_unchanged() -> None:
    s = resolve("synthetic", num_devices=20, seed=3)
    assert s.name == "synthetic(devices=20, seed=3)"
    assert _same(_synthetic_set(s.train), SYN_TRAIN) and _same(_synthetic_set(s.held_out), SYN_HELD_OUT)
    s = resolve("real-dev")
    assert (_set(s.train), s.held_out) == ("5cb62ff7b8bdec27", None)
    s = resolve("kokoro-voices")
    assert (_set(s.train), _set(s.held_out)) == ("1017b4cc75934ed2", "2f98d1e7ef7cff72")


def test_federations_unchanged() -> None:
    # 100 validation speakers: the default these fingerprints were taken under (400 since session 15; the
    # held-out set and the devices do not depend on it)
    cfg = FederationConfig(num_devices=20, seed=3, validation_speakers=100)
    fd = load_federation_data(cfg, None)
    assert fd.validation is not None
    assert _same(_synthetic_scored(fd.held_out, fd), FED_HELD_OUT) and _same(_synthetic_devices(fd), FED_DEVICES)
    assert _same(_synthetic_scored(fd.validation, fd), FED_VALIDATION)
    wide = load_federation_data(dataclasses.replace(cfg, validation_speakers=400), None)
    assert wide.validation is not None and wide.validation.num_voices == 400
    assert _same(_synthetic_scored(wide.held_out, wide), FED_HELD_OUT) and _same(_synthetic_devices(wide), FED_DEVICES)
    real = dataclasses.replace(cfg, data_source="real-dev", num_devices=12, enroll_model="campp",
                               runtime_model="resemblyzer")
    fd = load_federation_data(real, None)
    assert (_scored(fd.held_out, fd), _devices(fd)) == ("2ef1900ced7f668e", "70de4c92455bc56c")


def test_one_name_list() -> None:
    assert tuple(registry.SOURCES) == SOURCE_NAMES
    assert FEDERATION_NAMES == tuple(n for n, s in registry.SOURCES.items() if s.federated)
    for name in SOURCE_NAMES:
        assert name in registry.NAMES_HELP


def test_bad_name_lists_the_names(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(FileNotFoundError) as err:
        resolve(str(tmp_path / "nope"))
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in SOURCE_NAMES)


def test_simulate_refuses_a_centralised_only_name() -> None:
    with pytest.raises(ConfigError, match="real-speed-dev.*not a federated source.*synthetic, real-dev, kokoro-voices"):
        from_run_config({"data-source": "real-speed-dev"})
    with pytest.raises(ValueError, match="not a federated source"):
        load_federation_data(FederationConfig(data_source="real-speed-dev"), None)


def test_canary_audit_reads_registry_names() -> None:
    from fed_nessa.canary.empirical import load_base_pairs
    from fed_nessa.commands.audit_empirical import _DEFAULT_DATA

    enroll, runtime, what = load_base_pairs("real-dev", limit=50)
    bundled_enroll, bundled_runtime, _ = load_base_pairs(_DEFAULT_DATA, limit=50)
    assert what.startswith("real-dev:")
    assert np.array_equal(enroll, bundled_enroll) and np.array_equal(runtime, bundled_runtime)
    with pytest.raises(ValueError, match="--data synthetic: no resemblyzer or campp embeddings"):
        load_base_pairs("synthetic")
