"""The Flower ServerApp (thin): load the operator's config and run the federation."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from xrayfed.common.config import FederationConfig, load_config
from xrayfed.common.logs import configure_logging

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from xrayfed.server.federation import run_federation

    configure_logging()
    cfg = load_config(FederationConfig, str(context.run_config["config-path"]))
    run_federation(grid, cfg, flwr_run_id=str(context.run_id))
