"""Aligner artifacts: safetensors weights, a JSON card, and an ONNX export.

The runtime that consumes an aligner needs no fed-nessa code: the ONNX graph
takes runtime embeddings and returns L2-normalised enrollment-space rows, and
the card names the two models it aligns.

This module owns the on-disk format (file names, card schema version, card
serialisation) and imports nothing from :mod:`fed_nessa.model.aligners`:
aligners depend on artifacts, never the reverse, so there is no import cycle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fed_nessa.atomic import atomic_write_bytes as _atomic_write
from fed_nessa.errors import FedNessaError

WEIGHTS_FILE = "aligner.safetensors"
CARD_FILE = "card.json"
CARD_SCHEMA_VERSION = 1
ONNX_FILE = "aligner.onnx"


class AlignerFileError(FedNessaError, ValueError):
    """An aligner folder that cannot be used: a missing, corrupt or self-contradicting card or weights file.

    The message names the file and the fault in one line (the CLI prints it and exits 2).
    """


def shapes_text(tensors: dict[str, np.ndarray]) -> str:
    """``W 256x100, b 100``: the weights' shapes, for an error line."""
    return ", ".join(f"{k} {'x'.join(str(d) for d in np.shape(v)) or 'scalar'}" for k, v in sorted(tensors.items()))


def card_json(card: dict[str, Any]) -> str:
    """Stable card text (sorted keys) so identical aligners give byte-identical cards."""
    return json.dumps(card, indent=2, sort_keys=True, default=str)


def write_weights_and_card(out_dir: Path, tensors: dict[str, np.ndarray], card: dict[str, Any]) -> Path:
    """Write ``aligner.safetensors`` then ``card.json`` (each atomically); return the folder."""
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                metadata={"method": str(card.get("method", ""))})
    _atomic_write(out_dir / WEIGHTS_FILE, blob)
    _atomic_write(out_dir / CARD_FILE, card_json(card).encode())
    return out_dir


def read_weights_and_card(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an aligner folder; clear errors naming the file for missing or corrupt parts."""
    from safetensors.numpy import load_file

    card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
    for p in (card_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: aligner file not found")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AlignerFileError(f"{card_path}: corrupt aligner card ({exc})") from None
    if not isinstance(card, dict):
        raise AlignerFileError(f"{card_path}: corrupt aligner card (a JSON {type(card).__name__}, not an object)")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:
        raise AlignerFileError(f"{weights_path}: unreadable aligner weights ({type(exc).__name__}: {exc})") from None
    bad = sorted(k for k, v in tensors.items() if not np.isfinite(v).all())
    if bad:
        raise AlignerFileError(f"{weights_path}: corrupt aligner weights: non-finite values (NaN/Inf) in "
                               f"{', '.join(bad)}")
    return tensors, card


#: The ONNX opset of exported aligners (the torch.export-based exporter's own default and lowest well-supported).
ONNX_OPSET = 18
#: What the torch.export-based exporter logs or warns about that does not concern an aligner: its registry
#: skipping torchvision's operators (not installed), and torch's own internal pytree deprecation.
_EXPORTER_LOGGER = "torch.onnx._internal.exporter._registration"
_EXPORTER_NOISE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def export_onnx(module: Any, d_y: int, path: Path, opset: int = ONNX_OPSET) -> Path:
    """Export a torch module ``y -> normalize(g(y))`` to ONNX with a dynamic batch axis.

    Uses the ``torch.export``-based exporter (``dynamo=True``, which needs onnxscript): the
    TorchScript one is deprecated since PyTorch 2.9. :func:`check_onnx_matches` holds the
    graph to the PyTorch model.
    """
    import importlib.util
    import logging
    import warnings

    import torch

    if importlib.util.find_spec("onnxscript") is None:
        raise FedNessaError(f"{path}: the ONNX export needs onnxscript, a dependency of fed-nessa "
                            "(bash scripts/setup.sh installs it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = torch.zeros(2, d_y, dtype=torch.float32)
    registry_log = logging.getLogger(_EXPORTER_LOGGER)
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EXPORTER_NOISE, category=FutureWarning)
            torch.onnx.export(
                module, (example,), str(path), input_names=["runtime_embedding"],
                output_names=["aligned_embedding"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset, dynamo=True, verbose=False,
                external_data=False,  # one self-contained file for the runtime (the aligner is small)
            )
    finally:
        registry_log.setLevel(level)
    return path


def check_onnx_matches(module: Any, path: Path, d_y: int, atol: float = 1e-5, n: int = 64,
                       seed: int = 0) -> float:
    """Max |ONNX - PyTorch| on random unit inputs; raises if above ``atol``."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(seed)
    y = rng.standard_normal((n, d_y)).astype(np.float32)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    with torch.no_grad():
        ref = module.eval()(torch.from_numpy(y)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"runtime_embedding": y})[0]
    err = float(np.abs(out - ref).max())
    if err > atol:
        raise ValueError(f"{path}: ONNX output differs from PyTorch by {err:.2e} (> {atol:.0e})")
    return err
