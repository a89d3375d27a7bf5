"""The fed-nessa ServerApp (``app``): runs the configured federation on whatever Grid Flower provides.

``flwr run .`` (simulation engine or a SuperLink) calls :func:`main` with
Flower's Grid and the run config of ``[tool.flwr.app.config]``; the
config is validated before anything else happens (a bad value stops the run
with one clear error naming the key and its allowed range).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_nessa.config import from_run_config
from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = from_run_config(dict(context.run_config))
    run_federation(grid, context, cfg=cfg)
