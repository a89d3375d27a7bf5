"""``fed-nessa train``: fit one aligner centrally on all speakers of the given data."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from fed_nessa.arguments import path_arg, seed_arg
from fed_nessa.data.registry import NAMES_HELP
from fed_nessa.evaluation.centralised import CentralisedConfig, fit_dp_nessa, fit_method, fit_nessa, plan_dp
from fed_nessa.model.aligners import Aligner, NessaAligner, NessaConfig
from fed_nessa.model.training import TrainConfig

METHODS = ("nessa", "nessa-shared", "ridge", "procrustes", "speaker-logit")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an aligner centrally (plain or DP-SGD)",
                       description="Fit an aligner runtime-model -> enrollment-model on all speakers of --data "
                                   "and write it (safetensors + card.json; NESSA also aligner.onnx).")
    p.add_argument("--data", required=True, help=NAMES_HELP)
    p.add_argument("--enroll-model", required=True, help="model name on the enrollment (profile) side")
    p.add_argument("--runtime-model", required=True, help="model name on the runtime (test) side")
    p.add_argument("--method", choices=METHODS, default="nessa")
    p.add_argument("--out", required=True, type=path_arg)
    p.add_argument("--devices", type=int, default=1000, help="synthetic population size (data=synthetic)")
    p.add_argument("--seed", type=seed_arg, default=0)
    g = p.add_argument_group("NESSA training")
    g.add_argument("--epochs", type=int, default=40)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--hidden", type=int, default=512)
    g.add_argument("--depth", type=int, default=2)
    g.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of train-side voices held out to choose the number of epochs (then refit)")
    d = p.add_argument_group("differential privacy (example-level: one pair)")
    d.add_argument("--epsilon", type=float, default=None, help="train with DP at this epsilon (nessa, ridge)")
    d.add_argument("--delta", type=float, default=1e-5)
    d.add_argument("--clip-norm", type=float, default=1.0)
    d.add_argument("--dp-epochs", type=int, default=10)
    d.add_argument("--dp-batch-size", type=int, default=256)
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    problems = []
    for key in ("epochs", "batch_size", "hidden", "depth", "dp_epochs", "dp_batch_size", "devices"):
        if getattr(args, key) < 1:
            problems.append(f"--{key.replace('_', '-')} must be >= 1")
    if args.epsilon is not None and not 0 < args.epsilon < float("inf"):
        problems.append(f"--epsilon must be a finite number > 0, got {args.epsilon:g}")
    if args.enroll_model == args.runtime_model:
        problems.append(f"--enroll-model and --runtime-model are the same ({args.runtime_model!r}): nothing to align")
    if not 0 < args.delta < 1:
        problems.append("--delta must be in (0, 1)")
    if args.epsilon is not None and not (args.clip_norm > 0 and args.clip_norm < float("inf")):
        problems.append(f"--clip-norm must be a finite number > 0, got {args.clip_norm:g}")
    if not 0 <= args.val_fraction < 0.5:
        problems.append("--val-fraction must be in [0, 0.5)")
    if args.epsilon is not None and args.method not in ("nessa", "ridge"):
        problems.append(f"--epsilon: DP training is available for nessa and ridge, not {args.method}")
    if problems:
        raise ValueError("; ".join(problems))


def _progress(record: dict[str, Any]) -> None:
    parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()]
    print("  " + " ".join(parts), flush=True)


def run(args: argparse.Namespace) -> int:
    from fed_nessa.data.registry import resolve
    from fed_nessa.outputs import check_output

    check_output(args.out, "--out", "folder")
    _check(args)
    source = resolve(args.data, num_devices=args.devices, seed=args.seed)
    train = source.train_set()
    for m in (args.enroll_model, args.runtime_model):
        if m not in train.embeddings:
            raise ValueError(f"--data {args.data}: no model {m!r} (have: {sorted(train.embeddings)})")
    cfg = CentralisedConfig(
        methods=(args.method,), seed=args.seed, val_fraction=args.val_fraction,
        nessa=NessaConfig(hidden=args.hidden, depth=args.depth, ridge_alpha=0.1),
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=6, seed=args.seed))
    print(f"data: {source.name}: {len(train.speaker)} pairs, {len(set(train.speaker.tolist()))} speakers; "
          f"{args.method} {args.runtime_model} -> {args.enroll_model}", flush=True)
    aligner = _fit(args, cfg, train)
    aligner.info.training.setdefault("data", source.name)
    out = aligner.save(args.out)
    if isinstance(aligner, NessaAligner) and type(aligner) is NessaAligner:
        from fed_nessa.model.artifacts import ONNX_FILE, check_onnx_matches, export_onnx

        export_onnx(aligner.head(), aligner.info.d_y, out / ONNX_FILE)
        err = check_onnx_matches(aligner.head(), out / ONNX_FILE, aligner.info.d_y)
        print(f"ONNX export matches PyTorch (max abs diff {err:.1e})")
    print(f"wrote {out}")
    return 0


def _fit(args: argparse.Namespace, cfg: CentralisedConfig, train: Any) -> Aligner:
    if args.epsilon is None:
        if args.method.startswith("nessa"):
            return fit_nessa(args.method, _info(train, args), train, train.embeddings[args.enroll_model],
                                train.embeddings[args.runtime_model], cfg, on_epoch=_progress)
        return fit_method(args.method, train, args.enroll_model, args.runtime_model, cfg)
    dp_train = TrainConfig(epochs=args.dp_epochs, batch_size=args.dp_batch_size, lr=1e-3, seed=args.seed)
    plan = plan_dp(args.epsilon, args.delta, len(train.speaker), dp_train, args.clip_norm,
                   linear_share=1.0 if args.method == "ridge" else 0.3)
    print("DP plan: " + json.dumps({k: v for k, v in plan.to_dict().items() if k != "events"}), flush=True)
    ridge, nessa = fit_dp_nessa(train, args.enroll_model, args.runtime_model, plan, cfg,
                                dataclasses.replace(cfg.nessa, hidden=min(args.hidden, 64)), dp_train,
                                seed=args.seed)
    return ridge if args.method == "ridge" else nessa


def _info(train: Any, args: argparse.Namespace) -> Any:
    from fed_nessa.model.aligners import AlignerInfo

    x, y = train.embeddings[args.enroll_model], train.embeddings[args.runtime_model]
    info = AlignerInfo(d_x=x.shape[1], d_y=y.shape[1],
                       enroll_model=train.model_ids.get(args.enroll_model, args.enroll_model),
                       runtime_model=train.model_ids.get(args.runtime_model, args.runtime_model))
    info.training.update({"pairs": int(len(x)), "speakers": int(len(set(train.speaker.tolist())))})
    return info
