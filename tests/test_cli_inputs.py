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


def test_replace_removes_only_an_earlier_run_and_its_key_store(tmp_path: Path) -> None:
    """`--replace` (scripts/simulate.sh passes it for runs/latest) removes a folder holding a run and its
    key store, and never a folder that holds no run."""
    from fed_nessa.config import FederationConfig
    from fed_nessa.sim.runner import replace_run_dir

    run = tmp_path / "run"
    (run / "devices").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    keys = tmp_path / "run.keys"
    keys.mkdir()
    replace_run_dir(FederationConfig(run_dir=str(run)))
    assert not run.exists() and not keys.exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    replace_run_dir(FederationConfig(run_dir=str(other)))
    assert (other / "mine.txt").read_text() == "keep"
    (run / "devices").mkdir(parents=True)
    replace_run_dir(FederationConfig(run_dir=str(run), resume=True))
    assert (run / "devices").is_dir()
