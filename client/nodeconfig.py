"""The hospital's own config as its SuperNode names it (torch-free: every ClientApp process,
the SecAgg+ key-exchange stages included, reads it without loading torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from xrayfed.common.config import HospitalConfig, load_config
from xrayfed.common.errors import UserError

#: Set by ``xrayfed simulate`` for its Simulation Engine workers: the folder of the simulated
#: hospitals' configs (``hospital-NNN.toml`` by ``partition-id``). Never read when the node
#: names its own config (every real SuperNode started by ``xrayfed client`` does).
SIM_HOSPITALS_ENV = "XRAYFED_SIM_HOSPITALS"


def hospital_config_from_node(node_config: dict[str, Any]) -> HospitalConfig:
    """The hospital's own config, named by the hospital when it started its SuperNode; in a
    simulation (no ``config``, a ``partition-id`` from Flower's Simulation Engine), the simulated
    hospital's config that ``xrayfed simulate`` wrote."""
    path = node_config.get("config")
    if not path and "partition-id" in node_config and os.environ.get(SIM_HOSPITALS_ENV):
        path = Path(os.environ[SIM_HOSPITALS_ENV]) / f"hospital-{int(node_config['partition-id']):03d}.toml"
    if not path:
        raise UserError("node config: no 'config' path (start the client with `xrayfed client`)")
    return load_config(HospitalConfig, str(path))
