"""Embeddings per second of each real speaker-model backend on ONE CPU core (one thread).

Speech is synthesised on the spot with flite (4 voices x N Harvard sentences,
seeded prosody), decoded and resampled once; then each backend embeds every
utterance ``--repeats`` times after a warm-up (resemblyzer's first call
compiles librosa/numba kernels). Reported per backend: model load time,
embeddings/s and ms per utterance in wall time and in this process's CPU
time (CPU time is the fairer figure on a shared machine), and the real-time
factor (seconds of audio per second of compute). ``--pipeline`` also times a
whole ``build_shard`` run (decode + both models + cache + shard) with 1 and
with 2 worker processes.

    .venv/bin/python benchmarks/extraction_throughput.py [--sentences 5] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def synthesise_corpus(root: Path, sentences: int) -> list[Path]:
    from fed_nessa.data.extract.tts import FLITE_VOICES, Voice, make_speaker_folders

    return make_speaker_folders(root, {v: Voice("flite", v) for v in FLITE_VOICES}, sentences, seed=0)


def bench_backend(name: str, wavs: list[np.ndarray], repeats: int) -> dict[str, float | str]:
    from fed_nessa.data.extract import get_backend

    backend = get_backend(name)
    t0 = time.perf_counter()
    backend.load()
    load_s = time.perf_counter() - t0
    for wav in wavs[:2]:
        backend.embed(wav)  # warm-up
    audio_s = sum(w.size for w in wavs) / 16000.0 * repeats
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for wav in wavs:
            backend.embed(wav)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n = len(wavs) * repeats
    return {
        "model": name, "model_id": backend.model_id, "dim": backend.dim, "load_s": round(load_s, 2),
        "embeddings": n, "emb_per_s_wall": round(n / wall, 1), "emb_per_s_cpu": round(n / cpu, 1),
        "ms_per_utt_wall": round(1000 * wall / n, 1), "ms_per_utt_cpu": round(1000 * cpu / n, 1),
        "realtime_x_cpu": round(audio_s / cpu, 1),
    }


def bench_pipeline(audio_root: Path, workers: int) -> dict[str, float | int]:
    from fed_nessa.data.extract.builder import build_shard

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = build_shard(audio_root, "campp", "vfl_dvec", Path(out) / "b.shard.safetensors",
                             workers=workers, progress=False, log=lambda _m: None)
        wall = time.perf_counter() - t0
    return {"workers": workers, "files": result.embedded, "wall_s": round(wall, 1),
            "files_per_s": round(result.embedded / wall, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=5, help="utterances per flite voice (4 voices)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["campp", "resemblyzer", "vfl_dvec"])
    parser.add_argument("--pipeline", action="store_true", help="also time build_shard with 1 and 2 workers")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from fed_nessa.data.extract.audio import load_audio

    with tempfile.TemporaryDirectory() as tmp:
        files = synthesise_corpus(Path(tmp), args.sentences)
        t0 = time.process_time()
        wavs = [load_audio(p) for p in files]
        decode_ms = 1000 * (time.process_time() - t0) / len(files)
        seconds = [w.size / 16000 for w in wavs]
        rows = [bench_backend(name, wavs, args.repeats) for name in args.models]
        pipeline = [bench_pipeline(Path(tmp), w) for w in (1, 2)] if args.pipeline else []

    info = {
        "cpu": _cpu_name(), "cores_visible": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(), "torch": torch.__version__, "threads": 1,
        "utterances": len(wavs), "mean_utt_s": round(float(np.mean(seconds)), 2),
        "decode_resample_ms_per_utt_cpu": round(decode_ms, 2),
    }
    print(f"# {info['cpu']}, load average {info['load_avg_1m']}, {len(wavs)} utterances of "
          f"{info['mean_utt_s']} s on average, 1 thread")
    print("| model | dim | load (s) | emb/s (CPU time) | emb/s (wall) | ms/utt (CPU) | x real time (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dim']} | {r['load_s']} | {r['emb_per_s_cpu']} | {r['emb_per_s_wall']} | "
              f"{r['ms_per_utt_cpu']} | {r['realtime_x_cpu']} |")
    for p in pipeline:
        print(f"build_shard campp+vfl_dvec, {p['workers']} worker(s): {p['files']} files in {p['wall_s']} s "
              f"= {p['files_per_s']} files/s (wall, incl. worker start-up)")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "backends": rows, "pipeline": pipeline}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
