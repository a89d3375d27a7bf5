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


# Pinned on the resolvers before the registry (commit 7492ce6): the same speakers held out, the same devices.
# The synthetic pins re-measured on e31d876 (the last commit with two population types; the 7492ce6 pins
# no longer held there): the one population type holds the same data bit for bit.
def test_centralised_sets_unchanged() -> None:
    s = resolve("synthetic", num_devices=20, seed=3)
    assert (s.name, _set(s.train), _set(s.held_out)) == (
        "synthetic(devices=20, seed=3)", "32e1ed407550e826", "956a7b5d105273ca")
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
    assert (_scored(fd.held_out, fd), _devices(fd), _scored(fd.validation, fd)) == (
        "bc089a85c11984ea", "92e707f2ab57ad46", "11d4c9e1f7ea544b")
    wide = load_federation_data(dataclasses.replace(cfg, validation_speakers=400), None)
    assert wide.validation is not None and wide.validation.num_voices == 400
    assert (_scored(wide.held_out, wide), _devices(wide)) == ("bc089a85c11984ea", "92e707f2ab57ad46")
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
