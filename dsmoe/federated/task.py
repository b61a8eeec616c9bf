"""What the server, the clients and the centralised baseline share: the data, the partition and the model."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dsmoe.data.cache import stable_hash
from dsmoe.models import MoEEncoderForSequenceClassification
from dsmoe.training.config import ConfigError

from .config import FederatedRunConfig
from .data import ClassificationData, load_classification_data
from .partition import partition_indices


def cache_root(cfg: FederatedRunConfig) -> Path:
    if cfg.data.cache_dir is not None:
        return Path(cfg.data.cache_dir).expanduser().resolve()
    return (Path(cfg.train.output_dir).expanduser() / "data_cache").resolve()


def prepare_data(cfg: FederatedRunConfig) -> ClassificationData:
    """The encoded BBC splits (built and cached on first use)."""
    try:
        return load_classification_data(cfg.data, cfg.train.seed, cache_root(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def partitions(cfg: FederatedRunConfig, data: ClassificationData) -> list[list[int]]:
    """Training-set indices of every client, deterministic by ``train.seed``."""
    try:
        return partition_indices(data.train_y.tolist(), cfg.federation.num_clients, cfg.data.partition,
                                 cfg.data.alpha, cfg.train.seed, cfg.data.min_partition_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_model(cfg: FederatedRunConfig, data: ClassificationData) -> MoEEncoderForSequenceClassification:
    """The encoder classifier for this data, initialised from ``train.seed``."""
    mcfg = cfg.encoder_config(input_dim=data.input_dim, vocab_size=data.vocab_size, num_classes=data.num_classes)
    torch.manual_seed(cfg.train.seed)
    return MoEEncoderForSequenceClassification(mcfg)


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of one client's shuffling and dropout in one round (independent of which process runs it)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**31


def fingerprint(cfg: FederatedRunConfig) -> str:
    """What a resumed run must share with the run that wrote the checkpoints (num_rounds may grow)."""
    d = cfg.to_dict()
    d["federation"] = {k: v for k, v in d["federation"].items()
                       if k not in ("num_rounds", "num_cpus", "num_cpus_per_client", "timeout_s")}
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("output_dir", "plots", "threads_per_client")}
    d["data"] = {k: v for k, v in d["data"].items() if k != "cache_dir"}
    return stable_hash(d, 16)


def with_output_dir(cfg: FederatedRunConfig, output_dir: str | Path) -> FederatedRunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(output_dir)))
