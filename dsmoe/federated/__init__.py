"""Federated training of the encoder classifier on Flower: data partitioning, aggregation rules, apps, baseline.

Typical use::

    from dsmoe.federated import load_federated_config, run_federated_simulation
    cfg = load_federated_config("launch/configs/federated_bbc.yaml", ["federation.num_rounds=3"])
    rows = run_federated_simulation(cfg)            # one metrics row per round

    from dsmoe.federated import fedavg, expert_fedavg
    new_state = expert_fedavg(states, num_examples, expert_tokens)

The Flower apps of a deployment are ``dsmoe.federated.server:app`` and ``dsmoe.federated.client:app``.
"""
from .aggregation import expert_fedavg, fedavg
from .baseline import run_centralised
from .config import FederatedRunConfig, load_federated_config
from .partition import partition_indices
from .simulation import run_federated_simulation

__all__ = ["fedavg", "expert_fedavg", "FederatedRunConfig", "load_federated_config", "partition_indices",
           "run_federated_simulation", "run_centralised"]
