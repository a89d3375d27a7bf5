"""``fed-nessa extract``: build a device shard from a folder of audio with two real speaker models.

The heavy model packages are imported only when the command runs, so the CLI
(and ``fed-nessa --help``) works without the ``extract`` extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fed_nessa.arguments import path_arg

MODEL_CHOICES = ("campp", "resemblyzer", "vfl_dvec")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract",
        help="embed AUDIO_DIR/<speaker>/<utterance>.wav|flac with two models into a device shard",
        description=(
            "Run the enrollment and the runtime speaker model on every utterance of AUDIO_DIR "
            "(layout AUDIO_DIR/<speaker>/<utterance>.wav|flac, any sample rate, mixed to mono and "
            "resampled to 16 kHz) and write the paired embeddings as a device shard. Resumable: "
            "embeddings are cached next to the output and reused. Unusable files (unreadable, "
            "< 0.5 s, silent, no speech) are skipped, printed and listed in the report file. "
            "Needs the 'extract' extra (see docs/extraction.md)."
        ),
    )
    p.add_argument("audio_dir", type=path_arg, metavar="AUDIO_DIR")
    p.add_argument("--enroll-model", required=True, choices=MODEL_CHOICES, help="enrollment model X")
    p.add_argument("--runtime-model", required=True, choices=MODEL_CHOICES, help="runtime model Y")
    p.add_argument("--out", required=True, type=path_arg, metavar="SHARD",
                   help="output shard, NAME.shard.safetensors (side files: NAME.speakers.json, "
                        "NAME.extract-report.json, NAME.extract-cache/)")
    p.add_argument("--eval-set", type=path_arg, default=None, metavar="EVAL_NPZ",
                   help="also write the shard as a server evaluation set (AUDIO_DIR must then hold HELD-OUT "
                        "speakers only, > 10 utterances each); put it in the device-shard folder as eval.npz")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes, one thread each (default: one per available core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (skipped files are still printed)")
    p.set_defaults(func=run)


def _check_device_id(out: Path) -> None:
    """A shard's name (less ``.shard.safetensors``) is its device's id: refuse one that is no safe folder name."""
    from fed_nessa.data.shards import SHARD_SUFFIX
    from fed_nessa.federated.protocol import device_id_of
    from fed_nessa.privacy.ledger import device_id_problem

    problem = device_id_problem(device_id_of(out)) if out.name.endswith(SHARD_SUFFIX) else None
    if problem:
        raise ValueError(f"--out {out}: {problem} (a shard's name gives its device id)")


def run(args: argparse.Namespace) -> int:
    from fed_nessa.cli import CliError
    from fed_nessa.data.extract import MODEL_NAMES, MissingExtraError
    from fed_nessa.outputs import check_output

    assert set(MODEL_CHOICES) == set(MODEL_NAMES)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    # Before any audio is read: the shard, its side files (cache folder, report) and the evaluation set.
    check_output(args.out, "--out", "file")
    _check_device_id(args.out)
    if args.eval_set is not None:
        check_output(args.eval_set, "--eval-set", "file")
        if args.eval_set.suffix != ".npz":
            raise ValueError(f"{args.eval_set}: the evaluation set file must end with '.npz'")
        if args.enroll_model == args.runtime_model:
            raise ValueError("--eval-set needs two different models (nothing to align otherwise)")
    try:
        from fed_nessa.data.extract.builder import build_shard

        result = build_shard(args.audio_dir, args.enroll_model, args.runtime_model, args.out,
                             workers=args.workers, progress=not args.no_progress)
    except MissingExtraError as exc:
        raise CliError(str(exc)) from None
    print(
        f"wrote {args.out}: {result.embedded} utterance pairs, {result.speakers} speakers "
        f"({result.enroll_model} -> {result.runtime_model}); {result.computed} embedded now, "
        f"{result.from_cache} from cache, {len(result.skipped)} skipped, {result.seconds:.1f} s"
    )
    if result.skipped:
        from fed_nessa.data.extract.builder import SidePaths

        print(f"skipped files are listed in {SidePaths.for_shard(args.out).report}")
    if args.eval_set is not None:
        from fed_nessa.data.extract.evalset import write_eval_set
        from fed_nessa.data.shards import load_shard

        print(f"wrote evaluation set {write_eval_set(load_shard(args.out), args.eval_set)}")
    return 0
