"""The block engine before and after it moved behind the round loop: one device-level run, timed whole.

``before`` runs the block engine's own driver (``fed_nessa.sim.blocks.driver.BlockEngine``, removed
by issue 21's refactor: run it with ``PYTHONPATH`` at a checkout of e31d876); ``after`` runs
``fed_nessa.sim.blocks.engine.BlockEngine`` through :func:`fed_nessa.federated.protocol_loop.run_protocol`.
The same run: ``--fleet`` devices of 8 pairs each, held by one in-process worker per block
(``--cache``), ``linear-start = none``, ``--rounds`` device-level FedSGD rounds (fast numerics, secure
noise), no pooled references, evaluation only in the last round (``eval-every = rounds``: the old
driver had none, so the loop's per-round evaluation is left out of the comparison). One JSON line
per run; alternate the two (A/B/A/B) on a shared machine.

    PYTHONPATH=$OLD python benchmarks/block_engine_refactor.py before 10000 10000 3
    PYTHONPATH=$PWD python benchmarks/block_engine_refactor.py after 10000 10000 3
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fed_nessa.config import DevicePolicy, from_run_config
from fed_nessa.data.synthetic import population_config


def run(which: str, fleet: int, per_block: int, rounds: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"block-refactor-{which}-"))
    os.environ["FED_NESSA_KEY_STORE"] = str(work / "keys")
    torch.set_num_threads(1)
    cfg = from_run_config({"num-devices": fleet, "num-server-rounds": rounds, "clients-per-round": 0,
                           "privacy-unit": "device", "device-batch": 8, "delta": 0.1 / fleet, "fleet-numerics": "fast",
                           "linear-start": "none", "ledger-layout": "sqlite", "references": False,
                           "eval-every": rounds, "run-dir": str(work / "run"),
                           "secagg-quantization-range": min(4_194_304, (2**32 - 1) // fleet - 1)})
    policy = DevicePolicy(privacy_unit="device", delta=cfg.delta)
    pop = population_config(fleet, 0, speakers_per_device=(1, 1), utts_per_speaker=(8, 8))
    t0, c0 = time.perf_counter(), time.process_time()
    if which == "before":
        from fed_nessa.sim.blocks.driver import BlockEngine as Driver  # type: ignore[import-not-found]

        summary = Driver(cfg, policy, pop, devices_per_block=per_block, backend="in-process", cache=True).run()
    else:
        from fed_nessa.sim.blocks.engine import BlockEngine, BlockOptions

        summary = BlockEngine(cfg, policy, pop, BlockOptions(per_block, "in-process", None, True)).run()
    return {"which": which, "fleet": fleet, "rounds": rounds, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "round_seconds": [round(e["seconds"], 2) for e in summary["rounds"]],
            "statuses": [e["status"] for e in summary["rounds"]], "epsilon_max": summary["privacy"]["epsilon_max"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load": os.getloadavg()[0]}


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] not in ("before", "after"):
        sys.exit("usage: block_engine_refactor.py {before,after} FLEET DEVICES_PER_BLOCK ROUNDS")
    print(json.dumps(run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
