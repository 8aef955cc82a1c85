"""The Flower ServerApp (thin): load the operator's config and run the federation."""

from __future__ import annotations

import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from xrayfed.common.config import FederationConfig, load_config
from xrayfed.common.logs import configure_flower_logging, configure_logging
from xrayfed.server.federation import run_federation
from xrayfed.server.polling import PromptGrid, prompt_log_flush, prompt_object_pulls

SIM_FEDERATION_ENV = "XRAYFED_SIM_FEDERATION"
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    configure_flower_logging()
    # `xrayfed server` passes the path as run config; `xrayfed simulate` (Flower's Simulation
    # Engine runs this app in its own process with an empty run config) through the environment.
    path = context.run_config.get("config-path") or os.environ.get(SIM_FEDERATION_ENV)
    cfg = load_config(FederationConfig, str(path))
    prompt_log_flush()  # its last lines reach the operator without Flower's fixed 1 s wait at the end
    prompt_object_pulls()  # a reply's late parts are asked for again within 0.05 s, not Flower's 1 s
    # Replies are asked for every 0.2 s instead of Flower's 3 s (xrayfed.server.polling).
    run_federation(PromptGrid(grid), cfg, flwr_run_id=str(context.run_id),
                   simulated=not context.run_config.get("config-path"))
