"""``fed-nessa synth``: write a synthetic fleet (one shard per device) and the server's evaluation set.

The folder it writes is a complete ``data-source`` for a federated run:
``device-NNNNN.shard.safetensors`` (one per device), ``eval.safetensors`` (the evaluation
speakers as an :class:`~fed_nessa.data.datasets.EmbeddingSet`, both models), ``eval.npz`` (the same
speakers in the server's evaluation-file layout, see ``fed_nessa/data/population.py``) and ``manifest.json``
(counts, dims, model ids and the generator config; no embeddings).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fed_nessa.arguments import path_arg, seed_arg
from fed_nessa.data.datasets import write_devices
from fed_nessa.data.shards import SHARD_SUFFIX, make_shard
from fed_nessa.data.synthetic import SCENARIOS, generate_population
from fed_nessa.outputs import check_output

EVAL_SET_FILE = "eval.safetensors"
SERVER_EVAL_FILE = "eval.npz"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate a synthetic fleet of device shards + an evaluation set",
                       description="Generate the synthetic population (households of 1-6 speakers, 5-60 "
                                   "utterances each, two non-linear models) from a seed and write one shard "
                                   "per device, the evaluation set of other speakers and a manifest.")
    p.add_argument("--devices", type=int, required=True, help="number of devices (households)")
    p.add_argument("--seed", type=seed_arg, default=0, help="population seed (the two models come from the world seed)")
    p.add_argument("--out", type=path_arg, required=True, help="output folder (must not hold shards already)")
    p.add_argument("--scenario", choices=SCENARIOS, default="runtime-upgrade",
                   help="runtime-upgrade: enroll=old 256-d, runtime=new 192-d; enrollment-upgrade: the reverse")
    p.add_argument("--eval-speakers", type=int, default=200, help="speakers in the evaluation set")
    p.add_argument("--eval-utterances", type=int, default=30, help="utterances per evaluation speaker")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}")
    if args.eval_speakers < 2 or args.eval_utterances < 11:
        raise ValueError("the evaluation set needs >= 2 speakers with >= 11 utterances each "
                         "(10 enrollment utterances plus tests)")
    out: Path = check_output(args.out, "--out", "folder")
    if out.is_dir() and any(out.glob(f"*{SHARD_SUFFIX}")) and not args.overwrite:
        raise ValueError(f"{out}: already holds shard files; choose an empty folder or pass --overwrite")
    t0 = time.perf_counter()
    pop = generate_population(args.devices, args.seed, args.scenario, eval_speakers=args.eval_speakers,
                              eval_utterances=args.eval_utterances, progress=True)
    t_gen = time.perf_counter() - t0
    extra = {"generator": "fed_nessa.data.synthetic", "scenario": args.scenario,
             "enroll_model_name": pop.enroll_model, "runtime_model_name": pop.runtime_model,
             "eval_set": EVAL_SET_FILE, "eval_speakers": pop.eval.num_speakers, "eval_pairs": pop.eval.n,
             "config": pop.config.to_dict()}
    write_devices(pop.devices, out, extra=extra, overwrite=args.overwrite, progress=True)
    pop.eval.save(out / EVAL_SET_FILE)
    _write_server_eval(pop, out / SERVER_EVAL_FILE)
    ids = pop.model_ids
    print(f"wrote {len(pop.devices)} device shards ({pop.train.n} pairs, {pop.train.num_speakers} speakers), "
          f"{EVAL_SET_FILE} + {SERVER_EVAL_FILE} ({pop.eval.num_speakers} speakers x {args.eval_utterances}) "
          f"and manifest.json to {out} in {time.perf_counter() - t0:.1f} s (generation {t_gen:.1f} s)")
    print(f"enroll  = {pop.enroll_model} ({ids[pop.enroll_model]})")
    print(f"runtime = {pop.runtime_model} ({ids[pop.runtime_model]})")
    return 0


def _write_server_eval(pop, path: Path) -> Path:  # noqa: ANN001 - SyntheticPopulation
    """The evaluation speakers in the server's ``eval.npz`` layout (enrollment side = profiles)."""
    from fed_nessa.data.extract.evalset import write_eval_set

    ev = pop.eval
    shard = make_shard(ev.emb(pop.enroll_model), ev.emb(pop.runtime_model), ev.speaker,
                       ev.model_ids[pop.enroll_model], ev.model_ids[pop.runtime_model])
    return write_eval_set(shard, path)
