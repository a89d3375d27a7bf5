"""The device-level round benchmark's worker mode sums exactly what the in-process round sums.

``--workers N`` is how the round figure on N cores is measured (as the engines run: one one-thread process
per core); a worker that skipped or repeated a chunk would make that figure a different round's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

# benchmarks/ is not a package: the script is loaded by its path
_spec = importlib.util.spec_from_file_location("bench_device_level_round",
                                               Path(__file__).parents[1] / "benchmarks" / "device_level_round.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize(("devices", "chunk", "workers"), [(10, 3, 2), (7, 7, 3), (9, 2, 4)])
def test_the_workers_share_every_chunk_exactly_once(devices: int, chunk: int, workers: int) -> None:
    shares = [bench._chunks(devices, chunk, (w, workers)) for w in range(workers)]
    starts = sorted(start for share in shares for _, start in share)
    assert starts == list(range(0, devices, chunk))


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_forked_workers_sum_the_in_process_round(algorithm: str) -> None:
    from fed_nessa.config import from_run_config
    from fed_nessa.federated.layout import build_net

    torch.manual_seed(0)
    devices, pairs, chunk = 12, 16, 4
    cfg = from_run_config({"hidden": 8, "num-devices": devices, "min-arrivals": 2,
                           "secagg-quantization-range": 2**8, "privacy-unit": "device", "delta": 0.1 / devices})
    net = build_net(cfg, bench.D_X, bench.D_Y)
    cpu = torch.device("cpu")

    def make(_: int):  # type: ignore[no-untyped-def]
        pool = bench.PairPool(2, chunk * pairs, cpu)
        if algorithm == "fedsgd":
            return lambda share: bench.fedsgd_round(net, devices, 8, chunk, 0.1, cpu, pool, share)
        return lambda share: bench.fedavg_round(net, devices, pairs, chunk, 0.1, cpu, 1, 0.01, 8, pool,
                                                share=share)

    one = make(0)
    expected = one((0, 2)) + one((1, 2))
    workers = bench.Workers(2, make, 0.1)
    try:
        got = workers.sums()
    finally:
        workers.close()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(one((0, 2)), torch.zeros_like(expected))  # each share sums devices of its own
