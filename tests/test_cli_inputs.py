"""Issue 12, part 7: inputs an operator hands to ``apply`` and ``evaluate`` fail in one clear line.

Each case: ``fed_nessa.cli.main`` returns 2, stderr is ONE line naming the file or argument and
the fault (no traceback), and nothing is written. Before this change the aligner cases raised a
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
