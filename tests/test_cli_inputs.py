"""Issue 12, part 7: every bad input an operator or auditor hands to any command fails in one clear line.

Each case: ``fed_nessa.cli.main`` returns 2, stderr is ONE line naming the file or argument and
the fault (no traceback), and nothing is written (no half-written run folder, report or output).
An audit that runs and finds faults still exits 1 with its findings. Before this change the aligner cases raised a
torch/numpy traceback (or a numpy error naming no file) and an unknown model name in ``evaluate``
raised a KeyError traceback after creating the output folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fed_nessa.cli import main
from fed_nessa.model.aligners import AlignerInfo, NessaAligner, NessaConfig, RidgeAligner, load_aligner
from fed_nessa.model.artifacts import CARD_FILE, WEIGHTS_FILE, AlignerFileError


def _one_error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"fed-nessa {command}: error: ") and "Traceback" not in captured.err
    return lines[0]


def _input(tmp_path: Path, d: int) -> Path:
    path = tmp_path / "runtime.npy"
    np.save(path, np.random.default_rng(0).standard_normal((4, d)).astype(np.float32))
    return path


def _edit_card(folder: Path, **changes: object) -> None:
    card = json.loads((folder / CARD_FILE).read_text())
    card.update(changes)
    (folder / CARD_FILE).write_text(json.dumps(card))


@pytest.mark.parametrize("method", ["ridge", "nessa"])
def test_apply_with_a_card_that_disagrees_with_its_weights(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           method: str) -> None:
    """Weights for d_y 256 -> d_x 100, card says d_y 192: one line naming the weights and the card."""
    info = AlignerInfo(d_x=100, d_y=256)
    aligner = RidgeAligner(info) if method == "ridge" else NessaAligner(info, NessaConfig(hidden=8, depth=1))
    folder = aligner.save(tmp_path / "al")
    _edit_card(folder, d_y=192)
    out = tmp_path / "out" / "aligned.npy"
    assert main(["apply", "--aligner", str(folder), "--input", str(_input(tmp_path, 192)),
                 "--output", str(out)]) == 2
    line = _one_error_line(capsys, "apply")
    assert f"{folder / WEIGHTS_FILE}: weights (" in line and f"do not match {folder / CARD_FILE}" in line
    assert "d_y 192" in line
    if method == "ridge":
        assert "W 100x256" in line
    assert not out.exists() and not out.parent.exists()


def test_apply_with_weights_of_a_narrower_map_or_a_broken_card(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    folder = RidgeAligner(AlignerInfo(d_x=6, d_y=5)).save(tmp_path / "al")
    save_file({"W": np.zeros((6, 5), np.float32), "b": np.zeros(4, np.float32)}, str(folder / WEIGHTS_FILE))
    with pytest.raises(AlignerFileError, match="b 4"):
        load_aligner(folder)
    for change, fault in (({"d_x": "six"}, "d_x must be a positive integer, got 'six'"),
                          ({"d_y": 0}, "d_y must be a positive integer, got 0"),
                          ({"method": "magic"}, "unknown aligner method 'magic'")):
        RidgeAligner(AlignerInfo(d_x=6, d_y=5)).save(folder)
        _edit_card(folder, **change)
        assert main(["apply", "--aligner", str(folder), "--input", str(_input(tmp_path, 5)),
                     "--output", str(tmp_path / "o.npy")]) == 2
        assert _one_error_line(capsys, "apply").endswith(f"{folder / CARD_FILE}: {fault}")
    (folder / CARD_FILE).write_text("[1, 2]")
    assert main(["apply", "--aligner", str(folder), "--input", str(_input(tmp_path, 5)),
                 "--output", str(tmp_path / "o.npy")]) == 2
    assert "corrupt aligner card" in _one_error_line(capsys, "apply")
    assert not (tmp_path / "o.npy").exists()


def test_apply_with_a_consistent_aligner_still_works(tmp_path: Path) -> None:
    folder = RidgeAligner(AlignerInfo(d_x=6, d_y=5)).save(tmp_path / "al")
    assert main(["apply", "--aligner", str(folder), "--input", str(_input(tmp_path, 5)),
                 "--output", str(tmp_path / "o.npy")]) == 0
    assert np.load(tmp_path / "o.npy").shape == (4, 6)


@pytest.mark.parametrize("flag", ["--old-model", "--new-model"])
def test_evaluate_real_dev_with_an_unknown_model_name(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      flag: str) -> None:
    models = {"--old-model": "resemblyzer", "--new-model": "campp"}
    models[flag] = "nope"
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", "real-dev", "--old-model", models["--old-model"], "--new-model",
                 models["--new-model"], "--methods", "ridge", "--max-folds", "1", "--out", str(out)]) == 2
    line = _one_error_line(capsys, "evaluate")
    assert f"{flag} 'nope': no such model in --data real-dev" in line and "campp" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- issue 12 part 7: the sweep
# Every case below ran the real CLI on the code before this change and printed a traceback, exited with
# another status, named no file, or left a half-written output; each comment says which.
EMB = "synth-old:world=20240122:d=256:bffbdaa132b1"  # the synthetic fleet's model ids (shard folders use ids)
RUN = "synth-new:world=20240122:d=192:97dc29673f11"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic fleet written by `fed-nessa synth` (6 devices, ~900 pairs, 27 speakers)."""
    out = tmp_path_factory.mktemp("fleet") / "fleet"
    assert main(["synth", "--devices", "6", "--out", str(out), "--eval-speakers", "3",
                 "--eval-utterances", "12"]) == 0
    return out


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rewrite_shard(path: Path, **arrays: np.ndarray) -> None:
    """Write a shard file with ``arrays`` in place of its own (bypassing the writer's validation)."""
    from fed_nessa.data.shards import load_shard

    s = load_shard(path)
    tensors = {"enroll": s.enroll, "runtime": s.runtime, "speaker": s.speaker, **arrays}
    save_file(tensors, str(path), metadata={"schema_version": "1", "format": "fed-nessa device shard",
                                            "enroll_model": s.enroll_model, "runtime_model": s.runtime_model})


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


# -- apply --------------------------------------------------------------------------------------------
def test_apply_refuses_non_finite_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: exit 0 and an output of NaN rows."""
    folder = RidgeAligner(AlignerInfo(d_x=6, d_y=5)).save(tmp_path / "al")
    save_file({"W": np.full((6, 5), np.nan, np.float32), "b": np.zeros(6, np.float32)}, str(folder / WEIGHTS_FILE))
    out = tmp_path / "o.npy"
    assert main(["apply", "--aligner", str(folder), "--input", str(_input(tmp_path, 5)), "--output", str(out)]) == 2
    line = _one_error_line(capsys, "apply")
    assert f"{folder / WEIGHTS_FILE}: corrupt aligner weights: non-finite values" in line and "W" in line
    assert not out.exists()


def test_apply_with_an_npz_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: AttributeError traceback ('NpzFile' object has no attribute 'ndim')."""
    folder = RidgeAligner(AlignerInfo(d_x=6, d_y=5)).save(tmp_path / "al")
    np.savez(tmp_path / "in.npz", a=np.zeros((4, 5), np.float32))
    assert main(["apply", "--aligner", str(folder), "--input", str(tmp_path / "in.npz"),
                 "--output", str(tmp_path / "o.npy")]) == 2
    assert f"{tmp_path / 'in.npz'}: an .npz archive" in _one_error_line(capsys, "apply")
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_apply_with_an_output_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture, where: str) -> None:
    """Before: IsADirectoryError / FileExistsError tracebacks, and a temp .npy left beside the output."""
    folder = RidgeAligner(AlignerInfo(d_x=6, d_y=5)).save(tmp_path / "al")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" if where == "folder" else _a_file(tmp_path) / "o.npy"
    assert main(["apply", "--aligner", str(folder), "--input", str(_input(tmp_path, 5)), "--output", str(out)]) == 2
    line = _one_error_line(capsys, "apply")
    assert line.endswith(f"--output {out}: is a folder, expected a file path" if where == "folder"
                         else f"--output {out}: {out.parent} is a file, not a folder")
    assert not list((tmp_path / "out").iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["al", "out", "runtime.npy", *(["a-file"] if where != "folder" else [])])


# -- audit ---------------------------------------------------------------------------------------------
def test_audit_with_a_summary_that_is_not_an_object(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: AttributeError traceback ('list' object has no attribute 'get')."""
    (tmp_path / "summary.json").write_text("[1, 2]")
    assert main(["audit", str(tmp_path)]) == 2
    assert f"{tmp_path / 'summary.json'}: not a run summary (a JSON list" in _one_error_line(capsys, "audit")
    assert not (tmp_path / "audit").exists()


def test_audit_with_a_federation_ledger_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: IsADirectoryError traceback."""
    (tmp_path / "federation-ledger.jsonl").mkdir()
    assert main(["audit", str(tmp_path)]) == 2
    assert _one_error_line(capsys, "audit").endswith(f"{tmp_path / 'federation-ledger.jsonl'}: is a folder, "
                                                      "expected a file")
    assert not (tmp_path / "audit").exists()


@pytest.mark.parametrize("where", ["a-file", "under-a-file", "default-is-a-file"])
def test_audit_with_a_report_folder_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     where: str) -> None:
    """Before: FileExistsError / NotADirectoryError tracebacks after the whole audit ran."""
    ledger = tmp_path / "privacy-ledger.jsonl"
    ledger.write_text("not a ledger\n")  # readable: the audit would run and find faults (exit 1)
    blocker = _a_file(tmp_path)
    out = {"a-file": blocker, "under-a-file": blocker / "audit", "default-is-a-file": tmp_path / "audit"}[where]
    if where == "default-is-a-file":
        out.write_text("x")
    assert main(["audit", str(ledger), *(["--out", str(out)] if where != "default-is-a-file" else [])]) == 2
    line = _one_error_line(capsys, "audit")
    assert f"--out {out}: " in line and ("is not a folder" in line or "is a file, not a folder" in line)


def test_audit_that_runs_and_finds_faults_still_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ledger = tmp_path / "privacy-ledger.jsonl"
    ledger.write_text("not a ledger\n")
    assert main(["audit", str(ledger)]) == 1
    assert "FAIL" in capsys.readouterr().out and (tmp_path / "audit" / "report.md").is_file()


# -- audit-empirical -----------------------------------------------------------------------------------
def _pairs_npz(path: Path, enroll: np.ndarray, runtime: np.ndarray) -> Path:
    np.savez(path, resemblyzer=enroll, campp=runtime)
    return path


def _bad_base_pairs(tmp_path: Path, case: str) -> tuple[Path, str]:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 8)).astype(np.float32), rng.standard_normal((60, 6)).astype(np.float32)
    path = tmp_path / f"{case}.npz"
    if case == "empty":
        path.write_bytes(b"")
        return path, "EOFError"
    if case == "truncated":
        _pairs_npz(path, x, y)
        _truncate(path)
        return path, "BadZipFile"
    if case == "nan":
        x[7, 1] = np.nan
        return _pairs_npz(path, x, y), "'resemblyzer' has 1 non-finite row(s), first at row 7"
    if case == "rows-differ":
        return _pairs_npz(path, x, y[:50]), "row counts differ: resemblyzer 60, campp 50"
    if case == "one-dimensional":
        return _pairs_npz(path, x[:, 0], y[:, 0]), "'resemblyzer' must be a 2-D float array"
    return _pairs_npz(path, x[:0], y[:0]), "no pairs (0 rows)"


@pytest.mark.parametrize("case", ["empty", "truncated", "nan", "rows-differ", "one-dimensional", "no-rows"])
def test_audit_empirical_with_unusable_base_pairs(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    """Before: EOFError / BadZipFile / IndexError tracebacks, or numpy's 'scores must be finite', 'matmul: ...',
    'Singular matrix' naming no file."""
    path, fault = _bad_base_pairs(tmp_path, case)
    out = tmp_path / "out"
    assert main(["audit-empirical", "--data", str(path), "--out", str(out), "--epochs", "1", "--canaries", "10",
                 "--hidden", "4"]) == 2
    line = _one_error_line(capsys, "audit-empirical")
    assert f"{path}: " in line and fault in line
    assert not out.exists()


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_audit_empirical_with_a_limit_below_one(tmp_path: Path, capsys: pytest.CaptureFixture, limit: str) -> None:
    """Before: 'Singular matrix' (0), or -5 silently dropped the last five pairs and ran."""
    rng = np.random.default_rng(0)
    path = _pairs_npz(tmp_path / "p.npz", rng.standard_normal((30, 8)).astype(np.float32),
                      rng.standard_normal((30, 6)).astype(np.float32))
    out = tmp_path / "out"
    assert main(["audit-empirical", "--data", str(path), "--limit", limit, "--out", str(out), "--epochs", "1",
                 "--canaries", "10", "--hidden", "4"]) == 2
    assert _one_error_line(capsys, "audit-empirical").endswith(f"--limit must be >= 1, got {limit}")
    assert not out.exists()


def test_audit_empirical_with_an_output_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: FileExistsError traceback after both trainings."""
    rng = np.random.default_rng(0)
    path = _pairs_npz(tmp_path / "p.npz", rng.standard_normal((30, 8)).astype(np.float32),
                      rng.standard_normal((30, 6)).astype(np.float32))
    out = _a_file(tmp_path)
    assert main(["audit-empirical", "--data", str(path), "--out", str(out), "--epochs", "1", "--canaries", "10",
                 "--hidden", "4"]) == 2
    assert _one_error_line(capsys, "audit-empirical").endswith(f"--out {out}: exists and is not a folder")


@pytest.mark.parametrize("case", ["empty", "truncated"])
def test_audit_empirical_run_with_a_corrupt_secret(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    """Before: EOFError / BadZipFile tracebacks."""
    from fed_nessa.canary.federated import make_spec, spec_path

    run = tmp_path / "run"
    run.mkdir()
    secret = make_spec(12, 6, 5, fleet=3, seed=0).save(spec_path(run))
    secret.write_bytes(b"") if case == "empty" else _truncate(secret)
    assert main(["audit-empirical", "--run", str(run), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys, "audit-empirical")
    assert f"{secret}: not a canary spec, or a truncated one" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("summary", ["[]", "{}"])
def test_audit_empirical_run_with_a_summary_without_config(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          summary: str) -> None:
    """Before: KeyError 'config' traceback."""
    from fed_nessa.canary.federated import make_spec, spec_path

    run = tmp_path / "run"
    RidgeAligner(AlignerInfo(d_x=6, d_y=5)).save(run / "aligner")
    make_spec(12, 6, 5, fleet=3, seed=0).save(spec_path(run))
    (run / "summary.json").write_text(summary)
    assert main(["audit-empirical", "--run", str(run), "--out", str(tmp_path / "out")]) == 2
    assert _one_error_line(capsys, "audit-empirical").endswith(
        f"{run / 'summary.json'}: not a run summary (no 'config' object)")
    assert not (tmp_path / "out").exists()


# -- evaluate ------------------------------------------------------------------------------------------
def _evaluate(fleet: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--data", str(fleet), "--old-model", RUN, "--new-model", EMB, "--methods", "ridge",
            "--max-folds", "1", "--scenarios", "runtime-upgrade", "--out", str(out), *extra]


@pytest.mark.parametrize(("extra", "fault"), [
    (["--max-folds", "0"], "--max-folds must be >= 1, got 0"),  # before: 0 meant every fold, and ran
    (["--max-folds", "-1"], "--max-folds must be >= 1, got -1"),  # before: all folds but the last, and ran
    (["--dp-epsilons", "-1"], "--dp-epsilons must be finite numbers > 0, got -1"),  # before: failed after mkdir
    (["--dp-epsilons", "3", "--delta", "0"], "--delta must be in (0, 1), got 0"),  # before: failed after mkdir
    (["--hunger", "0"], "--hunger needs voice counts >= 1, got 0"),  # before: 'empty set' after the tables
    (["--hunger", "5", "--pseudo", "nope"], "--pseudo 'nope' is neither a data folder"),  # before: after the tables
    (["--dp-epsilons", "a"], "argument --dp-epsilons: expected comma-separated numbers, got 'a'"),  # before: usage
])
def test_evaluate_with_bad_numbers_fails_before_any_output(fleet: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture, extra: list[str],
                                                           fault: str) -> None:
    out = tmp_path / "eval"
    code: object
    try:
        code = main(_evaluate(fleet, out, *extra))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert fault in _one_error_line(capsys, "evaluate")
    assert not out.exists()


@pytest.mark.parametrize("command", ["evaluate", "train"])
@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_evaluate_and_train_with_an_output_folder_they_cannot_write(fleet: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture, command: str,
                                                                    where: str) -> None:
    """Before: FileExistsError / NotADirectoryError tracebacks after all the fitting."""
    out = _a_file(tmp_path) if where == "a-file" else _a_file(tmp_path) / "out"
    argv = (_evaluate(fleet, out) if command == "evaluate" else
            ["train", "--data", str(fleet), "--enroll-model", EMB, "--runtime-model", RUN, "--method", "ridge",
             "--out", str(out)])
    assert main(argv) == 2
    line = _one_error_line(capsys, command)
    assert line.endswith(f"--out {out}: exists and is not a folder" if where == "a-file"
                         else f"--out {out}: {out.parent} is a file, not a folder")


def test_train_refuses_a_zero_clip_norm_with_dp(fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: exit 0, a 'DP' aligner trained on noise alone (every gradient clipped to 0)."""
    out = tmp_path / "al"
    assert main(["train", "--data", str(fleet), "--enroll-model", EMB, "--runtime-model", RUN, "--method", "ridge",
                 "--epsilon", "3", "--clip-norm", "0", "--out", str(out)]) == 2
    assert "--clip-norm must be a finite number > 0, got 0" in _one_error_line(capsys, "train")
    assert not out.exists()


# -- synth, extract ------------------------------------------------------------------------------------
def test_synth_with_an_output_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: NotADirectoryError traceback after generating the population (and a progress bar)."""
    out = _a_file(tmp_path) / "fleet"
    assert main(["synth", "--devices", "2", "--out", str(out)]) == 2
    assert _one_error_line(capsys, "synth").endswith(f"--out {out}: {out.parent} is a file, not a folder")


@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_extract_with_an_output_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture, where: str) -> None:
    """Before: the extraction ran (or the missing extra was reported) and failed at the end, a NotADirectoryError
    traceback for the cache under a file; the cache and report were left beside the output."""
    (tmp_path / "audio" / "s1").mkdir(parents=True)
    (tmp_path / "audio" / "s1" / "u.wav").write_bytes(b"not audio")
    if where == "folder":
        out = tmp_path / "dev.shard.safetensors"
        out.mkdir()
    else:
        out = _a_file(tmp_path) / "dev.shard.safetensors"
    assert main(["extract", str(tmp_path / "audio"), "--enroll-model", "resemblyzer", "--runtime-model", "campp",
                 "--out", str(out), "--no-progress"]) == 2
    line = _one_error_line(capsys, "extract")
    assert line.endswith(f"--out {out}: is a folder, expected a file path" if where == "folder"
                         else f"--out {out}: {out.parent} is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["audio", out.name if where == "folder" else "a-file"])


# -- simulate ------------------------------------------------------------------------------------------
def _simulate(run_dir: Path, *extra: str) -> list[str]:
    return ["simulate", "--config", "smoke", "--quiet", "--run-dir", str(run_dir), *extra]


def _broken_fleet(fleet: Path, to: Path, case: str) -> tuple[Path, str]:
    data = _copy(fleet, to)
    shard = data / "device-00001.shard.safetensors"
    if case == "truncated":
        _truncate(shard)
        return shard, "unreadable or truncated shard"
    if case == "empty-file":
        shard.write_bytes(b"")
        return shard, "unreadable or truncated shard"
    from fed_nessa.data.shards import load_shard

    s = load_shard(shard)
    if case == "nan":
        enroll = s.enroll.copy()
        enroll[3, 2] = np.nan
        _rewrite_shard(shard, enroll=enroll)
        return shard, "'enroll' has 1 non-finite row(s), first at row 3"
    if case == "no-pairs":
        _rewrite_shard(shard, enroll=s.enroll[:0], runtime=s.runtime[:0], speaker=s.speaker[:0])
        return shard, "empty device: no pairs"
    if case == "wrong-dimension":
        _rewrite_shard(shard, enroll=np.ascontiguousarray(s.enroll[:, :100]))
        return shard, "wrong enrollment dimension: 100 (expected 256)"
    _truncate(data / "eval.npz")
    return data / "eval.npz", "unreadable or truncated evaluation set"


@pytest.mark.parametrize("case", ["truncated", "empty-file", "nan", "no-pairs", "wrong-dimension", "eval-truncated"])
def test_simulate_checks_every_shard_of_a_data_source_folder_first(fleet: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture, case: str) -> None:
    """Before: the run started, the broken device failed every round (exit 1, a warning per round, a run folder
    with a summary), numpy's concatenate error naming no file (wrong dimension), or BadZipFile (eval.npz)."""
    path, fault = _broken_fleet(fleet, tmp_path / "data", case)
    run = tmp_path / "run"
    assert main(_simulate(run, "--set", f'data-source="{tmp_path / "data"}"')) == 2
    assert f"{path}: {fault}" in _one_error_line(capsys, "simulate")
    assert not run.exists()


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_simulate_with_a_run_folder_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    where: str) -> None:
    """Before: NotADirectoryError tracebacks (after generating the population)."""
    run = _a_file(tmp_path) if where == "a-file" else _a_file(tmp_path) / "run"
    assert main(_simulate(run)) == 2
    assert _one_error_line(capsys, "simulate").endswith(
        f"run-dir {run}: exists and is not a folder" if where == "a-file"
        else f"run-dir {run}: {run.parent} is a file, not a folder")


@pytest.mark.parametrize("engine", ["flower", "fleet"])
def test_simulate_refuses_a_run_folder_that_holds_an_earlier_run(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 engine: str) -> None:
    """Before: the run appended to the earlier run's ledgers (its devices' spending counted again, the audit saw
    two runs' rounds interleaved and failed) and overwrote its summary."""
    run = tmp_path / "run"
    (run / "devices").mkdir(parents=True)
    (run / "summary.json").write_text('{"earlier": true}')
    assert main(_simulate(run, "--engine", engine)) == 2
    line = _one_error_line(capsys, "simulate")
    assert f"run-dir {run}: holds an earlier run (summary.json, devices)" in line
    assert json.loads((run / "summary.json").read_text()) == {"earlier": True}
    assert sorted(p.name for p in run.iterdir()) == ["devices", "summary.json"]


@pytest.mark.parametrize(("device", "fault"), [("bogus", "not a torch device"),
                                               ("cuda", "this machine has no CUDA device")])
def test_simulate_fleet_with_an_unusable_torch_device(tmp_path: Path, capsys: pytest.CaptureFixture, device: str,
                                                      fault: str) -> None:
    """Before: RuntimeError / AssertionError ('Torch not compiled with CUDA enabled') tracebacks."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = tmp_path / "run"
    assert main(_simulate(run, "--engine", "fleet", "--device", device)) == 2
    assert f"--device '{device}': {fault}" in _one_error_line(capsys, "simulate")
    assert not run.exists()


def test_simulate_fleet_with_a_folder_data_source(fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: 'a folder data source needs its shard folder', naming neither the folder nor what to do."""
    assert main(_simulate(tmp_path / "run", "--engine", "fleet", "--set", f'data-source="{fleet}"')) == 2
    line = _one_error_line(capsys, "simulate")
    assert f"data-source {fleet}: the fleet engine builds its devices in memory" in line and "--engine flower" in line


@pytest.mark.parametrize(("text", "extra", "fault"), [
    ("num-devices = 20\nfoo-bar = 3\n", [], "invalid federation config: foo-bar: unknown key"),
    ("num-devices = -3\n", [], "num-devices = -3: allowed range"),
    ("num-devices = 20\ndevice = 3\n", [], "[device] must be a table of device-policy keys, got 3"),
    ("num-devices = 20\nmin-arrivals = 5\n", ["--set", "num-devices=abc"], "num-devices = 'abc': expected an integer"),
    ("num-devices = 20\nmin-arrivals = 5\n", ["--device-set", "nope=1"], "unknown device-policy key(s) nope"),
])
def test_simulate_config_faults_name_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture, text: str,
                                                     extra: list[str], fault: str) -> None:
    """Before: 'invalid federation config: ...' named the key but not the file it came from."""
    config = tmp_path / "study.toml"
    config.write_text(text)
    run = tmp_path / "run"
    assert main(["simulate", "--config", str(config), "--quiet", "--run-dir", str(run), *extra]) == 2
    line = _one_error_line(capsys, "simulate")
    assert line.startswith(f"fed-nessa simulate: error: {config}") and fault in line
    assert not run.exists()


def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture) -> None:
    """Before: argparse's usage block (several lines) above the error."""
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--old-model", "a"])
    assert exc.value.code == 2
    line = _one_error_line(capsys, "evaluate")
    assert "the following arguments are required: --new-model, --out" in line and "--help" in line


# ----------------------------------------------------------------------------- issue 17: device policy, key store,
# device ids, --replace, all-zero rows, settings that cannot apply to the data
#: The smoke config sized for the 6-shard `fleet` folder.
SIX = ("--set", "num-devices=6", "--set", "clients-per-round=6")


@pytest.mark.parametrize("engine", ["flower", "fleet"])
def test_reproducible_noise_trains_nothing_unless_the_devices_allow_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                       engine: str) -> None:
    """Issue 17 item 1. Before: every device joined, spending epsilon on noise the server could recompute."""
    run = tmp_path / "run"
    assert main(_simulate(run, "--engine", engine, "--set", "reproducible-noise=true")) == 1
    err = capsys.readouterr().err
    assert "nothing was trained" in err and "reproducible noise" in err and "allow-reproducible-noise" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["epsilon_max"] == 0.0
    assert {r["status"] for r in summary["rounds"]} == {"skipped"} and all(r["participants"] == 0
                                                                          for r in summary["rounds"])
    ok = tmp_path / "allowed"
    assert main(_simulate(ok, "--engine", engine, "--set", "reproducible-noise=true",
                          "--device-set", "allow-reproducible-noise=true")) == 0
    allowed = json.loads((ok / "summary.json").read_text())
    assert allowed["privacy"]["guarantee_holds"] is False and "REPRODUCIBLE NOISE" in allowed["privacy"]["noise_source"]
    assert allowed["privacy"]["epsilon_max"] > 0


@pytest.mark.parametrize("where", ["inside", "the-run-dir", "a-file", "default-is-a-file"])
def test_simulate_refuses_a_key_store_inside_the_run_folder_or_a_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    where: str) -> None:
    """Issue 17 items 3 and 9. Before: FED_NESSA_KEY_STORE=<run>/keys put every private key inside the run folder;
    a store that is a file failed (exit 2) only after the run folder was made."""
    run = tmp_path / "run"
    store = {"inside": run / "keys", "the-run-dir": run, "a-file": _a_file(tmp_path),
             "default-is-a-file": tmp_path / "run.keys"}[where]
    if where == "default-is-a-file":
        store.write_text("x")
    else:
        monkeypatch.setenv("FED_NESSA_KEY_STORE", str(store))
    assert main(_simulate(run)) == 2
    line = _one_error_line(capsys, "simulate")
    if where in ("inside", "the-run-dir"):
        assert f"FED_NESSA_KEY_STORE={store}: inside the run folder {run}" in line
    else:
        assert f"{store}: exists and is not a folder" in line and "key store" in line
    assert not run.exists()


@pytest.mark.parametrize(("name", "shown"), [("...shard.safetensors", "'..'"), (".shard.safetensors", "''"),
                                              ("-x.shard.safetensors", "'-x'"),
                                              ("d\N{BULLET}1.shard.safetensors", "'d\N{BULLET}1'")])
def test_simulate_refuses_a_shard_whose_name_is_no_safe_device_id(fleet: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture, name: str,
                                                                  shown: str) -> None:
    """Issue 17 item 4. Before: `...shard.safetensors` gave device id `..`: its ledger landed in the run folder's
    root and its private key in the key store's root; an empty id was not caught up front."""
    data = _copy(fleet, tmp_path / "data")
    (data / "device-00005.shard.safetensors").rename(data / name)
    run = tmp_path / "run"
    assert main(_simulate(run, "--set", f'data-source="{data}"', *SIX)) == 2
    line = _one_error_line(capsys, "simulate")
    assert f"{data / name}: device id {shown} is not a safe folder name" in line
    assert not run.exists()


def test_simulate_refuses_device_ids_that_differ_only_in_case(fleet: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    data = _copy(fleet, tmp_path / "data")
    (data / "device-00005.shard.safetensors").rename(data / "DEVICE-00004.shard.safetensors")
    assert main(_simulate(tmp_path / "run", "--set", f'data-source="{data}"', *SIX)) == 2
    assert "device id 'device-00004' is also the id of DEVICE-00004.shard.safetensors" in _one_error_line(
        capsys, "simulate")


@pytest.mark.parametrize("device_id", ["..", "", "a/b", ".hidden", "x" * 129])
def test_deployment_and_ledgers_refuse_an_unsafe_device_id(tmp_path: Path, device_id: str) -> None:
    """Issue 17 item 4: the node config's `device-id` and DeviceLedger.open apply the same rule."""
    from fed_nessa.config import FederationConfig
    from fed_nessa.federated.protocol import locate
    from fed_nessa.privacy.ledger import DeviceLedger

    with pytest.raises(ValueError, match=r"node config 'device-id': device id .* is not a safe folder name"):
        locate({"shard-path": str(tmp_path / "x.shard.safetensors"), "state-dir": str(tmp_path / "state"),
                "device-id": device_id}, FederationConfig())
    with pytest.raises(ValueError, match=f"{tmp_path / 'led'}: device id .* is not a safe folder name"):
        DeviceLedger.open(tmp_path / "led", device_id, epsilon_budget=1.0, delta=1e-5)
    assert locate({"shard-path": str(tmp_path / "x.shard.safetensors"), "state-dir": str(tmp_path / "s"),
                   "device-id": "node-7.a_b"}, FederationConfig()).device_id == "node-7.a_b"


def test_simulate_refuses_num_devices_other_than_the_folders_shard_count(fleet: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """Sweep. Before: num-devices 30 (smoke) on a folder of 6 shards ran; the cohort and the SecAgg+ range
    checks were made for 30 devices, not the 6 that exist."""
    run = tmp_path / "run"
    assert main(_simulate(run, "--set", f'data-source="{fleet}"')) == 2
    line = _one_error_line(capsys, "simulate")
    assert f"num-devices = 30: the data-source folder {fleet} holds 6 shard(s)" in line and "num-devices = 6" in line
    assert not run.exists()


def test_simulate_refuses_a_shard_with_an_all_zero_row(fleet: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """Issue 17 item 9. Before: a shard of all-zero embeddings was trained on silently."""
    from fed_nessa.data.shards import load_shard

    data = _copy(fleet, tmp_path / "data")
    shard = data / "device-00002.shard.safetensors"
    runtime = load_shard(shard).runtime.copy()
    runtime[4] = 0.0
    _rewrite_shard(shard, runtime=runtime)
    run = tmp_path / "run"
    assert main(_simulate(run, "--set", f'data-source="{data}"', *SIX)) == 2
    assert f"{shard}: 'runtime' has 1 all-zero row(s), first at row 4" in _one_error_line(capsys, "simulate")
    assert not run.exists()


@pytest.mark.parametrize("run_dir", ['runs"quoted', "runs\\new", "runs with spaces"])
def test_simulate_takes_a_run_dir_with_odd_characters_literally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                run_dir: str) -> None:
    """Sweep. Before: --run-dir went through TOML: `runs\\new` became `runs<newline>ew` and a quote kept its quotes."""
    from fed_nessa.sim.runner import add_arguments, build_config_from_args

    monkeypatch.chdir(tmp_path)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg, _ = build_config_from_args(parser.parse_args(["--config", "smoke", "--run-dir", run_dir]))
    assert cfg.run_dir == str(tmp_path / run_dir)


# -- --replace -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real smoke run (run folder + its key store beside it) that each --replace test copies."""
    run = tmp_path_factory.mktemp("earlier") / "run"
    assert main(_simulate(run)) == 0
    return run


def _earlier_copy(earlier: Path, tmp_path: Path) -> Path:
    import shutil

    run = _copy(earlier, tmp_path / "run")
    shutil.copytree(earlier.parent / "run.keys", tmp_path / "run.keys")
    return run


def _tree(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def test_replace_replaces_an_earlier_run_and_its_key_store(earlier: Path, tmp_path: Path) -> None:
    """Also after `fed-nessa audit` wrote its report into the run folder (audit/ is a fed-nessa output)."""
    run = _earlier_copy(earlier, tmp_path)
    assert main(["audit", str(run)]) in (0, 1) and (run / "audit" / "report.md").is_file()
    old_key = (tmp_path / "run.keys" / "server" / "server-key.pem").read_bytes()
    assert main(_simulate(run, "--replace")) == 0
    assert (tmp_path / "run.keys" / "server" / "server-key.pem").read_bytes() != old_key
    assert (run / "summary.json").is_file()


def test_replace_with_a_refused_input_keeps_the_earlier_run(earlier: Path, fleet: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """Issue 17 item 7. Before: --replace deleted the run and its key store, then refused the shard (exit 2)."""
    run = _earlier_copy(earlier, tmp_path)
    before = _tree(run, tmp_path / "run.keys")
    path, fault = _broken_fleet(fleet, tmp_path / "data", "nan")
    assert main(_simulate(run, "--replace", "--set", f'data-source="{tmp_path / "data"}"',
                          *SIX)) == 2
    assert f"{path}: {fault}" in _one_error_line(capsys, "simulate")
    assert _tree(run, tmp_path / "run.keys") == before


@pytest.mark.parametrize("case", ["user-file-in-run", "notes-in-checkpoints", "foreign-file-in-store",
                                  "no-ledger", "tampered-ledger", "another-servers-store"])
def test_replace_removes_nothing_it_cannot_prove_is_its_own(earlier: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture, case: str) -> None:
    """Issue 17 item 8. Before: any folder with a `checkpoints/` subfolder was deleted (user files included), and
    a `<run>.keys` folder with files it never wrote."""
    run = _earlier_copy(earlier, tmp_path)
    store = tmp_path / "run.keys"
    if case == "user-file-in-run":
        (run / "thesis.tex").write_text("mine")
        named = run / "thesis.tex"
    elif case == "notes-in-checkpoints":
        run = named = tmp_path / "notes"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "ideas.txt").write_text("mine")
    elif case == "foreign-file-in-store":
        named = store / "devices" / "device-00003" / "backup.pem"
        named.write_text("mine")
    elif case == "no-ledger":
        (run / "federation-ledger.jsonl").unlink()
        named = run
    elif case == "tampered-ledger":
        ledger = run / "federation-ledger.jsonl"
        ledger.write_text(ledger.read_text().replace('"applied"', '"skipped"', 1))
        named = ledger
    else:
        (store / "server" / "server-key.pub.pem").write_text("another key")
        named = store
    before = _tree(tmp_path)
    assert main(_simulate(run, "--replace")) == 2
    line = _one_error_line(capsys, "simulate")
    assert "--replace: " in line and str(named) in line and "nothing removed" in line
    assert _tree(tmp_path) == before


def test_replace_leaves_a_folder_without_a_run_alone(tmp_path: Path) -> None:
    from fed_nessa.config import FederationConfig
    from fed_nessa.sim.runner import replace_run_dir

    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    replace_run_dir(FederationConfig(run_dir=str(other)))
    assert (other / "mine.txt").read_text() == "keep"
    run = tmp_path / "run"
    (run / "devices").mkdir(parents=True)
    replace_run_dir(FederationConfig(run_dir=str(run), resume=True))
    assert (run / "devices").is_dir()


# -- the sweep: empty, odd and absurd inputs of every command ----------------------------------------------
@pytest.mark.parametrize("argv", [
    ["synth", "--devices", "2", "--out", ""],  # before: wrote the shards into the current folder
    ["audit", ""],  # before: audited the current folder
    ["apply", "--aligner", "", "--input", "x.npy", "--output", "o.npy"],
    ["evaluate", "--old-model", "a", "--new-model", "b", "--out", " "],
    ["train", "--data", "synthetic", "--enroll-model", "a", "--runtime-model", "b", "--out", ""],
])
def test_an_empty_path_argument_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "empty path" in _one_error_line(capsys, argv[0])
    assert list(tmp_path.iterdir()) == []


def test_simulate_with_an_empty_config_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: `--config ""` silently ran the main job's config (1000 devices)."""
    assert main(["simulate", "--config", "", "--quiet", "--run-dir", str(tmp_path / "run")]) == 2
    assert "--config '': empty" in _one_error_line(capsys, "simulate")
    assert not (tmp_path / "run").exists()


def test_simulate_with_absurdly_many_canaries(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: a MemoryError traceback (191 GiB) after the run folder and its shards were written."""
    run = tmp_path / "run"
    assert main(_simulate(run, "--canaries", "100000000")) == 2
    assert "--canaries 100000000: at most 100000 canaries" in _one_error_line(capsys, "simulate")
    assert not run.exists()


def test_running_out_of_memory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a numpy _ArrayMemoryError traceback (e.g. --set eval-speakers=1000000: 28.6 GiB)."""
    import fed_nessa.data.registry as registry

    def too_big(*_: object, **__: object) -> None:
        raise MemoryError("Unable to allocate 28.6 GiB for an array")

    monkeypatch.setattr(registry, "load_federation_data", too_big)
    assert main(_simulate(tmp_path / "run")) == 2
    line = _one_error_line(capsys, "simulate")
    assert "out of memory (Unable to allocate 28.6 GiB for an array): a size given is too large" in line


@pytest.mark.parametrize(("extra", "fault"), [
    (["--methods", ""], "--methods '': names no method"),  # before: exit 0, a table of baselines only
    (["--methods", ","], "--methods ',': names no method"),
    (["--scenarios", ""], "--scenarios '': choose one or more of"),  # before: exit 0, no table at all
])
def test_evaluate_with_nothing_to_evaluate(fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           extra: list[str], fault: str) -> None:
    out = tmp_path / "eval"
    assert main([*_evaluate(fleet, out), *extra]) == 2
    assert fault in _one_error_line(capsys, "evaluate")
    assert not out.exists()


@pytest.mark.parametrize(("extra", "models", "fault"), [
    (["--epsilon", "inf"], (EMB, RUN), "--epsilon must be a finite number > 0, got inf"),  # before: exit 0
    ([], (EMB, EMB), f"--enroll-model and --runtime-model are the same ('{EMB}'): nothing to align"),
])
def test_train_with_settings_that_cannot_apply(fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               extra: list[str], models: tuple[str, str], fault: str) -> None:
    out = tmp_path / "al"
    assert main(["train", "--data", str(fleet), "--enroll-model", models[0], "--runtime-model", models[1],
                 "--method", "ridge", "--out", str(out), *extra]) == 2
    assert fault in _one_error_line(capsys, "train")
    assert not out.exists()


def test_apply_refuses_an_all_zero_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: exit 0, the aligner's bias written for a row that is no embedding (the shared row check)."""
    folder = RidgeAligner(AlignerInfo(d_x=6, d_y=5)).save(tmp_path / "al")
    path = tmp_path / "in.npy"
    rows = np.ones((4, 5), np.float32)
    rows[2] = 0.0
    np.save(path, rows)
    assert main(["apply", "--aligner", str(folder), "--input", str(path), "--output", str(tmp_path / "o.npy")]) == 2
    assert f"{path}: 1 all-zero row(s), first at row 2" in _one_error_line(capsys, "apply")
    assert not (tmp_path / "o.npy").exists()


def test_apply_of_no_rows_is_honoured_and_said(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = RidgeAligner(AlignerInfo(d_x=6, d_y=5)).save(tmp_path / "al")
    np.save(tmp_path / "in.npy", np.zeros((0, 5), np.float32))
    assert main(["apply", "--aligner", str(folder), "--input", str(tmp_path / "in.npy"),
                 "--output", str(tmp_path / "o.npy")]) == 0
    assert "0 rows, d=6" in capsys.readouterr().out and np.load(tmp_path / "o.npy").shape == (0, 6)


def test_replace_and_resume_together_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Sweep. Before: --resume silently won and --replace was ignored."""
    assert main(_simulate(tmp_path / "run", "--replace", "--resume")) == 2
    assert "--replace and --resume contradict each other" in _one_error_line(capsys, "simulate")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("engine", ["flower", "fleet"])
def test_simulate_real_dev_refuses_num_devices_other_than_its_households(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture,
                                                                        engine: str) -> None:
    """Sweep. Before: num-devices 30 on real-dev's 8 households ran, its cohort and SecAgg+ checks sized for 30."""
    run = tmp_path / "run"
    assert main(_simulate(run, "--engine", engine, "--set", "data-source=real-dev", "--set", "enroll-model=resemblyzer",
                          "--set", "runtime-model=campp")) == 2
    assert "num-devices = 30: data-source real-dev makes 8 households" in _one_error_line(capsys, "simulate")
    assert not run.exists()


def test_federated_canary_audit_of_a_run_that_trained_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Sweep. Before: with reproducible-noise and default policies every device declined, the DP run released
    nothing, and the audit scored an untrained aligner (a lower bound near 0 that proves nothing)."""
    out = tmp_path / "audit"
    assert main(["audit-empirical", "--federated", "--config", "smoke", "--canaries", "20", "--out", str(out),
                 "--set", "reproducible-noise=true", "--set", "num-server-rounds=2"]) == 2
    line = _one_error_line(capsys, "audit-empirical")
    assert "the dp run" in line and "released no aggregate" in line and "allow-reproducible-noise" in line
    assert not (out / "report.md").exists()


def test_extract_refuses_a_shard_name_that_gives_no_safe_device_id(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """Sweep (issue 17 item 4 at its source). Before: `...shard.safetensors` was extracted (device id `..`)."""
    (tmp_path / "audio" / "s1").mkdir(parents=True)
    out = tmp_path / "...shard.safetensors"
    assert main(["extract", str(tmp_path / "audio"), "--enroll-model", "resemblyzer", "--runtime-model", "campp",
                 "--out", str(out), "--no-progress"]) == 2
    assert f"--out {out}: device id '..' is not a safe folder name" in _one_error_line(capsys, "extract")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio"]


@pytest.mark.parametrize("argv", [
    ["simulate", "--config", "smoke", "--quiet", "--canaries", "20", "--canary-seed", "-1"],  # before: a run folder
    ["synth", "--devices", "2", "--seed", "-1"],  # left behind, and numpy's 'expected non-negative integer'
    ["evaluate", "--old-model", "a", "--new-model", "b", "--seed", "-1"],
    ["train", "--data", "synthetic", "--enroll-model", "a", "--runtime-model", "b", "--seed", "-1"],
    ["audit-empirical", "--seed", "-1"],
])
def test_a_negative_seed_is_refused_naming_the_argument(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        argv: list[str]) -> None:
    out = tmp_path / "out"
    where = ["--run-dir", str(out)] if argv[0] == "simulate" else ["--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, *where])
    assert exc.value.code == 2
    assert "seed: expected an integer >= 0, got -1" in _one_error_line(capsys, argv[0])
    assert list(tmp_path.iterdir()) == []
