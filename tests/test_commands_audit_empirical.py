"""``fed-nessa audit-empirical``'s argument errors: one line, exit status 2, before any training."""

from __future__ import annotations

from pathlib import Path

import pytest

from fed_nessa.cli import main


def _error(capsys: pytest.CaptureFixture) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("argv,message", [
    (["--control", "ctl"], "fed-nessa audit-empirical: error: --control needs --run (the DP run folder it controls)"),
    (["--run", "dp", "--canaries", "20"], "fed-nessa audit-empirical: error: --canaries: a run folder's canaries were "
                                         "planted by `fed-nessa simulate --canaries M`; --run scores those"),
])
def test_inconsistent_flags_are_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                                message: str) -> None:
    argv = [str(tmp_path / a) if a in ("ctl", "dp") else a for a in argv]
    assert main(["audit-empirical", "--out", str(tmp_path / "out"), *argv]) == 2
    assert _error(capsys) == message
    assert not (tmp_path / "out").exists()


def test_federated_and_run_exclude_each_other(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["audit-empirical", "--federated", "--run", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "not allowed with argument --federated" in _error(capsys)


def test_an_output_path_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert main(["audit-empirical", "--out", str(taken)]) == 2
    assert _error(capsys).endswith(f"--out {taken}: exists and is not a folder")


def test_a_missing_run_folder_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-run"
    assert main(["audit-empirical", "--run", str(missing), "--out", str(tmp_path / "out")]) == 2
    line = _error(capsys)
    assert line.startswith("fed-nessa audit-empirical: error: ") and str(missing) in line
