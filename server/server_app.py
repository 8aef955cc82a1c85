"""The Flower ServerApp (thin): load the operator's config and run the federation."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from xrayfed.common.config import FederationConfig, load_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from .federation import run_federation

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Flower HTTP request otherwise
    cfg = load_config(FederationConfig, str(context.run_config["config-path"]))
    run_federation(grid, cfg, flwr_run_id=str(context.run_id))
