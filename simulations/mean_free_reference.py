"""Non-DP NESSA with the plain cosine loss and with the loss about the mean, on a fleet population's pooled pairs.

Why: a DP run that takes its loss about the mean (``loss-centre = enrollment-mean``) is compared with the fleet
study's non-DP NESSA reference, which was trained with the plain loss; if the loss about the mean also helps without
DP, the share of that reference overstates what DP keeps. This trains both references exactly as the fleet engine's
``pooled_references`` trains its one (the same sample of pairs, step budget, optimiser and seed), the second with
the loss about the pooled pairs' mean unit enrollment embedding, and prints their held-out EER and gap closure.

    python -m simulations.mean_free_reference --devices 10000 [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fed_nessa.config import FederationConfig, from_run_config
from fed_nessa.data.registry import load_federation_data
from fed_nessa.evaluation.protocol import evaluate_held_out, summary_row
from fed_nessa.model.aligners import AlignerInfo, NessaAligner, NessaConfig
from fed_nessa.model.aligners.base import l2_normalize
from fed_nessa.model.aligners.nessa import NessaNet
from fed_nessa.model.centre import about_centre, centred_targets
from fed_nessa.model.training import TrainConfig, train_local
from fed_nessa.sim.fleet import reference_rows_of, reference_train_config


def mean_free_nessa(info: AlignerInfo, arch: NessaConfig, x: np.ndarray, y: np.ndarray, train: TrainConfig,
                    centre: np.ndarray | None = None) -> tuple[NessaAligner, np.ndarray]:
    """NESSA from the ridge start, trained on the loss about ``centre`` (default: the pairs' mean unit enrollment
    embedding): the moved net on the centred targets (fed_nessa/model/centre.py), then moved back, so it serves as
    any NESSA aligner."""
    aligner = NessaAligner(info, arch)
    x, y = l2_normalize(x), l2_normalize(y)
    aligner.init_linear(x, y)
    centre = x.mean(0).astype(np.float64) if centre is None else np.asarray(centre, np.float64)
    moved = about_centre(aligner.net, centre)
    train_local(moved, centred_targets(x, centre), y, train)
    assert isinstance(moved, NessaNet)
    with torch.no_grad():
        moved.linear.bias.add_(torch.as_tensor(centre, dtype=torch.float32))
    aligner.net = moved
    return aligner, centre


def references(cfg: FederationConfig) -> dict[str, dict[str, Any]]:
    """Both references' held-out rows (EER, minDCF, SID top-1, gap closure) on the population of ``cfg``."""
    data = load_federation_data(cfg, None)
    x = np.concatenate([d.enroll for d in data.devices])
    y = np.concatenate([d.runtime for d in data.devices])
    rows = reference_rows_of(cfg, len(x))
    x, y = x[rows], y[rows]
    info = AlignerInfo(d_x=data.d_x, d_y=data.d_y, enroll_model=data.enroll_model, runtime_model=data.runtime_model)
    arch, train = NessaConfig(hidden=cfg.hidden, depth=cfg.depth), reference_train_config(cfg, len(x))
    plain = NessaAligner(info, arch).fit(x, y, train_cfg=train)
    mean_free, _ = mean_free_nessa(info, arch, x, y, train)
    report = evaluate_held_out(*data.evaluation(), {"plain": plain, "mean_free": mean_free})
    return {name: summary_row(report, f"asym_{name}") for name in ("plain", "mean_free")} | {
        "sym_before": summary_row(report, "sym_before")}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.mean_free_reference", description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0, help="population seed (0: the fleet study's reported one)")
    args = p.parse_args(argv)
    # SecAgg+'s range plays no part here; a small one keeps the config valid at any fleet size
    cfg = from_run_config({"num-devices": args.devices, "seed": args.seed, "secagg-quantization-range": 1 << 16})
    rows = references(cfg)
    print(f"{args.devices} devices, population seed {args.seed}, held-out speakers (non-DP NESSA, the fleet "
          "reference's sample, steps and seed):")
    for name, label in (("sym_before", "not updating"), ("plain", "plain cosine loss"),
                        ("mean_free", "loss about the mean")):
        r = rows[name]
        print(f"  {label}: EER {100 * r['eer']:.2f} %, gap closure {r['gap_closure']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
