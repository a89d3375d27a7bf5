"""Artifacts: ONNX export matches PyTorch; the apply command maps and validates stored embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fed_nessa.cli import main
from fed_nessa.model.aligners import AlignerInfo, NessaAligner, NessaConfig
from fed_nessa.model.aligners.base import l2_normalize
from fed_nessa.model.artifacts import ONNX_FILE, check_onnx_matches, export_onnx
from fed_nessa.model.training import TrainConfig


@pytest.fixture(scope="module")
def aligner(tmp_path_factory: pytest.TempPathFactory) -> tuple[NessaAligner, Path]:
    rng = np.random.default_rng(0)
    y = l2_normalize(rng.standard_normal((200, 6)))
    x = l2_normalize(np.tanh(y @ rng.standard_normal((6, 5))))
    a = NessaAligner(AlignerInfo(5, 6, "X:1", "Y:2"), NessaConfig(hidden=16, depth=2)).fit(
        x, y, train_cfg=TrainConfig(epochs=5, batch_size=32))
    folder = tmp_path_factory.mktemp("aligner")
    a.save(folder)
    return a, folder


def test_onnx_matches_pytorch(aligner: tuple[NessaAligner, Path], tmp_path: Path) -> None:
    a, _ = aligner
    path = export_onnx(a.head(), 6, tmp_path / ONNX_FILE)
    assert check_onnx_matches(a.head(), path, 6, atol=1e-5) <= 1e-5
    import onnxruntime as ort

    y = l2_normalize(np.random.default_rng(3).standard_normal((7, 6)))
    out = ort.InferenceSession(str(path)).run(None, {"runtime_embedding": y})[0]
    np.testing.assert_allclose(out, a.map_runtime(y), atol=1e-5)  # same function as the library path


def test_onnx_export_uses_the_current_exporter(aligner: tuple[NessaAligner, Path], tmp_path: Path) -> None:
    """torch.export-based (dynamo) exporter: no legacy TorchScript warning, the batch axis dynamic (1 row too)."""
    import warnings

    import onnx
    import onnxruntime as ort

    from fed_nessa.model.artifacts import ONNX_OPSET

    a, _ = aligner
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(a.head(), 6, tmp_path / ONNX_FILE)
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "TorchScript" in m or "legacy" in m or "deprecated" in m], said
    assert sorted(p.name for p in tmp_path.iterdir()) == [ONNX_FILE]  # one self-contained file, no .data beside it
    model = onnx.load(str(path))
    assert model.opset_import[0].version == ONNX_OPSET
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch, not a fixed 2
    for rows in (1, 5):
        y = l2_normalize(np.random.default_rng(rows).standard_normal((rows, 6))).astype(np.float32)
        out = ort.InferenceSession(str(path)).run(None, {"runtime_embedding": y})[0]
        np.testing.assert_allclose(out, a.map_runtime(y), atol=1e-5)


def test_apply_command(aligner: tuple[NessaAligner, Path], tmp_path: Path) -> None:
    a, folder = aligner
    y = l2_normalize(np.random.default_rng(1).standard_normal((9, 6)))
    np.save(tmp_path / "in.npy", y)
    assert main(["apply", "--aligner", str(folder), "--input", str(tmp_path / "in.npy"),
                 "--output", str(tmp_path / "out.npy")]) == 0
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == np.float32 and out.shape == (9, 5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out, a.map_runtime(y), atol=1e-6)


@pytest.mark.parametrize("content,msg", [
    (np.zeros((3, 4), np.float32), r"expected an \(n, 6\) array"),
    (np.array([[np.nan] * 6, [0.1] * 6], np.float32), "1 non-finite row"),
])
def test_apply_bad_input(aligner: tuple[NessaAligner, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                         content: np.ndarray, msg: str) -> None:
    _, folder = aligner
    np.save(tmp_path / "bad.npy", content)
    assert main(["apply", "--aligner", str(folder), "--input", str(tmp_path / "bad.npy"),
                 "--output", str(tmp_path / "o.npy")]) == 2
    err = capsys.readouterr().err
    assert "bad.npy" in err and __import__("re").search(msg, err)
    assert not (tmp_path / "o.npy").exists()


def test_apply_missing_files(aligner: tuple[NessaAligner, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    _, folder = aligner
    assert main(["apply", "--aligner", str(folder), "--input", str(tmp_path / "none.npy"),
                 "--output", str(tmp_path / "o.npy")]) == 2
    assert "none.npy: input file not found" in capsys.readouterr().err
    assert main(["apply", "--aligner", str(tmp_path / "noaligner"), "--input", str(tmp_path / "none.npy"),
                 "--output", str(tmp_path / "o.npy")]) == 2
    assert "aligner file not found" in capsys.readouterr().err
