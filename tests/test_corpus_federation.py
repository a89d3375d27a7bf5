"""kokoro-voices as a federated source: one device per training voice, the server's validation voices
withheld from every device, the corpus's parent-disjoint held-out voices as the evaluation set.

Everything runs on a tiny corpus written here (``FED_NESSA_DATA``), not the committed one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fed_nessa.config import CORPUS_NAME, FEDERATION_NAMES, DevicePolicy, FederationConfig, from_run_config
from fed_nessa.data.corpus import store
from fed_nessa.data.corpus.voices import HELDOUT, TRAIN, Voice
from fed_nessa.data.population import CORPUS_VOICES_PER_DEVICE, corpus_device_count
from fed_nessa.data.registry import load_federation_data
from fed_nessa.evaluation.protocol import evaluate_held_out

TRAIN_VOICES, HELDOUT_VOICES, UTTERANCES = 14, 5, 6
DIMS = {"campp": 192, "resemblyzer": 256, "vfl_dvec": 256}


def _voices() -> list[Voice]:
    """Training voices blend packs af_*, held-out ones bf_* (no parent shared, as the store demands)."""
    train = [Voice(i, ("af_a", "af_b"), (0.5, 0.5), 1.0, TRAIN) for i in range(TRAIN_VOICES)]
    held = [Voice(100 + i, ("bf_c", "bf_d"), (0.3, 0.7), 1.0, HELDOUT) for i in range(HELDOUT_VOICES)]
    return train + held


def _write(data: Path, utterances: dict[int, int] | None = None) -> Path:
    """The tiny corpus under ``data`` (``utterances``: voice id -> a count other than UTTERANCES)."""
    rng = np.random.default_rng(0)
    per_voice = {}
    for v in _voices():
        n = (utterances or {}).get(v.voice_id, UTTERANCES)
        arrays = {m: rng.standard_normal((n, d)) for m, d in DIMS.items()}
        per_voice[v.voice_id] = {m: a / np.linalg.norm(a, axis=1, keepdims=True) for m, a in arrays.items()}
        per_voice[v.voice_id]["sentence"] = np.arange(n)
    return store.write_corpus(data / CORPUS_NAME, _voices(), per_voice)


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FED_NESSA_DATA", str(tmp_path / "data"))
    return _write(tmp_path / "data")


def test_the_device_count_leaves_out_voices_too_short_for_a_device(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FED_NESSA_DATA", str(tmp_path / "data"))
    _write(tmp_path / "data", {0: 3})  # one training voice with fewer utterances than a household speaker needs
    assert corpus_device_count(0) == TRAIN_VOICES - 1
    assert len(load_federation_data(_cfg(validation_speakers=0, num_devices=TRAIN_VOICES - 1), None).devices) == 13


def _cfg(**over: object) -> FederationConfig:
    base = dict(data_source=CORPUS_NAME, num_devices=TRAIN_VOICES - 4, validation_speakers=4,
                enroll_model="vfl_dvec", runtime_model="resemblyzer", seed=1)
    base.update(over)
    return FederationConfig(**base)  # type: ignore[arg-type]


def _global_voices(corpus: Path, emb: np.ndarray, model: str) -> set[int]:
    """The corpus voices whose rows ``emb`` holds (matched by their embedding of ``model``)."""
    with np.load(corpus / store.EMBEDDINGS) as z:
        rows = z[model].astype(np.float32)
        voice = z["voice"]
    index = {r.tobytes(): int(v) for r, v in zip(rows, voice)}
    return {index[np.asarray(e, np.float32).tobytes()] for e in emb}


def test_kokoro_voices_is_a_federated_source() -> None:
    assert CORPUS_NAME in FEDERATION_NAMES
    assert from_run_config({"data-source": CORPUS_NAME}).data_source == CORPUS_NAME


def test_devices_validation_and_held_out_voices_are_disjoint(corpus: Path) -> None:
    fd = load_federation_data(_cfg(), None)
    assert CORPUS_VOICES_PER_DEVICE == (1, 1) and len(fd.devices) == TRAIN_VOICES - 4
    device_voices = [_global_voices(corpus, d.enroll, "vfl_dvec") for d in fd.devices]
    assert all(len(v) == 1 for v in device_voices)  # one voice per device, all its utterances
    assert all(d.n == UTTERANCES and d.num_speakers == 1 for d in fd.devices)
    devices = set().union(*device_voices)
    assert fd.validation is not None
    validation = set(np.unique(fd.validation.speaker).tolist())
    held_out = set(np.unique(fd.held_out.speaker).tolist())
    assert len(devices) == TRAIN_VOICES - 4 and len(validation) == 4 and devices | validation == set(range(14))
    assert not devices & validation
    assert held_out == set(range(100, 100 + HELDOUT_VOICES))  # every held-out voice, and only those
    # the pairs are (runtime-model, enrollment-model) embeddings of the same utterances
    first = fd.devices[0]
    assert (first.d_x, first.d_y) == (256, 256) and first.enroll_model.startswith("vfl_dvec")
    assert _global_voices(corpus, first.runtime, "resemblyzer") == device_voices[0]
    assert (fd.scenario.old_model, fd.scenario.new_model) == ("vfl_dvec", "resemblyzer")
    assert _global_voices(corpus, fd.held_out.emb("vfl_dvec"), "vfl_dvec") == held_out


def test_the_split_is_seeded_and_counted(corpus: Path) -> None:
    a, b = load_federation_data(_cfg(), None), load_federation_data(_cfg(), None)
    assert a.validation is not None and b.validation is not None
    assert np.array_equal(a.validation.speaker, b.validation.speaker)
    other = load_federation_data(_cfg(seed=2), None)
    assert other.validation is not None
    assert set(other.validation.speaker.tolist()) != set(a.validation.speaker.tolist())
    assert corpus_device_count(4) == TRAIN_VOICES - 4 and corpus_device_count(0) == TRAIN_VOICES
    none = load_federation_data(_cfg(validation_speakers=0, num_devices=TRAIN_VOICES), None)
    assert none.validation is None and len(none.devices) == TRAIN_VOICES


def test_the_flower_engine_gets_shard_files(corpus: Path, tmp_path: Path) -> None:
    fd = load_federation_data(_cfg(), tmp_path / "shards")
    assert len(fd.shards) == TRAIN_VOICES - 4 and all(p.is_file() for p in fd.shards) and not fd.devices
    enroll, runtime = fd.pooled()
    assert enroll.shape == runtime.shape == ((TRAIN_VOICES - 4) * UTTERANCES, 256)


@pytest.mark.parametrize(("over", "message"), [
    ({"num_devices": 12}, r"num-devices = 12: data-source kokoro-voices makes 10 devices \(one per training voice, "
                          r"validation-speakers = 4 withheld for the server's gate\); set num-devices = 10"),
    ({"enroll_model": "ecapa"}, r"kokoro-voices: enroll-model = 'ecapa': the corpus has no such model "
                                r"\(models: campp, resemblyzer, vfl_dvec\)"),
    ({"runtime_model": "synthetic-y-old"}, r"kokoro-voices: runtime-model = 'synthetic-y-old': the corpus has no"),
    ({"validation_speakers": 14}, r"kokoro-voices: validation-speakers = 14: validation voices must be between 1 "
                                  r"and 13"),
])
def test_bad_input_is_one_clear_error(corpus: Path, over: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        load_federation_data(_cfg(**over), None)
    assert "\n" not in str(err.value)


def test_a_missing_corpus_folder_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fed_nessa.data import datasets

    monkeypatch.setenv("FED_NESSA_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(datasets, "repo_root", lambda: tmp_path / "repo")
    with pytest.raises(FileNotFoundError, match=r"real data folder 'kokoro-voices' not found \(tried: "):
        load_federation_data(_cfg(), None)
    (tmp_path / "nowhere" / CORPUS_NAME).mkdir(parents=True)  # a folder without the corpus files
    with pytest.raises(FileNotFoundError, match=r"kokoro-voices/embeddings.npz: file not found"):
        load_federation_data(_cfg(), None)


def test_a_fleet_run_evaluates_on_the_held_out_voices_and_gates_on_validation_voices(
        corpus: Path, tmp_path: Path) -> None:
    from fed_nessa.sim.fleet import run_fleet

    cfg = from_run_config({
        "data-source": CORPUS_NAME, "num-devices": TRAIN_VOICES - 4, "validation-speakers": 4,
        "enroll-model": "vfl_dvec", "runtime-model": "resemblyzer", "num-server-rounds": 1, "aligner": "linear",
        "min-arrivals": 8, "secagg-num-shares": 5, "secagg-reconstruction-threshold": 3,
        "suffstats-noise-multiplier": 1.0, "run-dir": str(tmp_path / "run")})
    summary = run_fleet(cfg, DevicePolicy(guaranteed_arrivals=8))
    final = summary["final"]
    assert summary["engine"]["devices"] == TRAIN_VOICES - 4
    assert summary["engine"]["pairs"] == (TRAIN_VOICES - 4) * UTTERANCES
    # not updating, scored on the held-out voices (the reported figures) and on the validation voices (the gate's)
    fd = load_federation_data(cfg, None)
    assert fd.validation is not None
    held_out, validation = (evaluate_held_out(ev, fd.scenario, {}).row("sym_before").metrics.eer
                            for ev in (fd.held_out, fd.validation))
    assert final["sym_before"]["eer"] == pytest.approx(held_out)
    assert final["gate"]["validation_eer"]["none"] == pytest.approx(validation) != pytest.approx(held_out)


@pytest.mark.parametrize("engine", ["flower", "fleet"])
@pytest.mark.parametrize(("sets", "message"), [
    (["num-devices=30"], "num-devices = 30: data-source kokoro-voices makes 10 devices"),
    (["num-devices=10", "runtime-model=ecapa"], "runtime-model = 'ecapa': the corpus has no such model"),
])
def test_simulate_refuses_bad_input_in_one_line_before_writing(corpus: Path, tmp_path: Path, engine: str,
                                                               sets: list[str], message: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from fed_nessa.cli import main

    run = tmp_path / "run"
    argv = ["simulate", "--config", "smoke", "--quiet", "--run-dir", str(run), "--engine", engine,
            "--set", f"data-source={CORPUS_NAME}", "--set", "validation-speakers=4", "--set", "enroll-model=vfl_dvec",
            "--set", "runtime-model=resemblyzer", *(x for s in sets for x in ("--set", s))]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fed-nessa simulate: error: ") and message in lines[0]
    assert not (run / "shards").exists()
