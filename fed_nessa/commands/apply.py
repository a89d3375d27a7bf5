"""``fed-nessa apply``: map stored runtime embeddings into the enrollment space with an aligner."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from fed_nessa.arguments import path_arg
from fed_nessa.atomic import atomic_write_bytes
from fed_nessa.data.shards import row_fault
from fed_nessa.evaluation.gate import unshipped_reason
from fed_nessa.model.aligners import load_aligner
from fed_nessa.outputs import check_output


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="map runtime embeddings (.npy) into the enrollment space",
                       description="Map a float32 (n, d_Y) array of runtime embeddings into the aligner's "
                                   "scoring space (L2-normalised rows), for re-scoring stored embeddings.")
    p.add_argument("--aligner", required=True, type=path_arg, help="aligner folder (card.json + aligner.safetensors)")
    p.add_argument("--input", required=True, type=path_arg, help="runtime embeddings, .npy, float32 (n, d_Y)")
    p.add_argument("--output", required=True, type=path_arg, help="where to write the aligned .npy")
    p.set_defaults(func=run)


def _load_input(path: Path, d_y: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive loads as a mapping of arrays
        arr.close()
        raise ValueError(f"{path}: an .npz archive, expected one .npy array (n, {d_y})")
    if arr.ndim != 2 or arr.shape[1] != d_y:
        raise ValueError(f"{path}: expected an (n, {d_y}) array for this aligner, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{path}: expected float embeddings, got dtype {arr.dtype}")
    fault = row_fault(arr)  # non-finite or all-zero rows: the one check every embedding loader shares
    if fault:
        raise ValueError(f"{path}: {fault}")
    return arr.astype(np.float32, copy=False)


def run(args: argparse.Namespace) -> int:
    check_output(args.output, "--output", "file")
    aligner = load_aligner(args.aligner)
    unshipped = unshipped_reason(aligner.info.training)
    if unshipped is not None:  # the run's gate kept the current runtime model: this aligner is not for use
        raise ValueError(f"{args.aligner}: not shipped by its run's promotion gate, keep the current runtime model "
                         f"({unshipped})")
    runtime = _load_input(args.input, aligner.info.d_y)
    aligned = aligner.transform(runtime).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, aligned)
    atomic_write_bytes(args.output, buffer.getvalue())  # no temp file survives a failed write
    print(f"wrote {args.output}: {aligned.shape[0]} rows, d={aligned.shape[1]} "
          f"({aligner.method}: {aligner.info.runtime_model} -> {aligner.info.enroll_model})")
    return 0
