"""Run a federated training on one machine in Flower's simulation (Ray backend), CPU only.

The clients run as Ray actors, ``federation.num_cpus_per_client`` cores each, within ``federation.num_cpus``
(default: this machine's cores); Ray is shut down at the end, also after an error, so several simulations can
run one after another in one process. A client that raises is a logged event of its round (see
:class:`MoEFedStrategy`); an error of the server run is raised here.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from dsmoe.training.metrics import read_metrics

from .checkpoint import check_resumable, latest_round
from .client import build_client_app
from .config import FederatedRunConfig
from .server import build_server_app
from .task import fingerprint, partitions, prepare_data

log = logging.getLogger("dsmoe.federated")


def run_federated_simulation(cfg: FederatedRunConfig, client_mods: Sequence = (),
                             verbose: bool = False) -> list[dict]:
    """Train (or resume) ``cfg`` in Flower's simulation; returns the rows of metrics.jsonl."""
    import ray
    from flwr.simulation import run_simulation

    data = prepare_data(cfg)            # encode once here, so the clients read the cache
    partitions(cfg, data)               # an impossible split fails here with one line, not inside Ray
    latest = latest_round(cfg.train.output_dir)
    if latest is not None:              # so does a resume with another config
        check_resumable(latest[1], fingerprint(cfg))
    fed = cfg.federation
    num_cpus = fed.num_cpus or os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": min(fed.num_cpus_per_client, num_cpus), "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False, "log_to_driver": verbose,
                      "logging_level": logging.INFO if verbose else logging.ERROR},
    }
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")     # CPU clients: leave device vars alone
    errors: list[BaseException] = []
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    try:
        run_simulation(server_app=build_server_app(cfg, on_error=errors.append),
                       client_app=build_client_app(cfg, client_mods), num_supernodes=fed.num_clients,
                       backend_config=backend_config, verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(level)
        if ray.is_initialized():
            ray.shutdown()
    if errors:
        raise errors[0]
    return read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")
