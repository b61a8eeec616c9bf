"""The federated run configuration: sections model, data, federation, train (one YAML + dotted overrides).

Every error is a :class:`dsmoe.training.config.ConfigError` whose message is one line naming the key, the value
and the fix; ``launch/train_federated.py`` prints it as ``dsmoe: error: ...`` and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


from dsmoe.models.configuration_moe_encoder import MoEEncoderConfig
from dsmoe.training.config import ConfigError, build_section, read_config_tree

INPUTS = ("tokens", "minilm")
PARTITIONS = ("iid", "dirichlet")
AGGREGATIONS = ("fedavg", "expert_fedavg")


def _bad(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{key}={value!r}: {why}")


@dataclass
class FederatedDataConfig:
    """The BBC News classification data (5 categories), its inputs and how it is split over clients."""

    inputs: str = "tokens"
    """"tokens": token ids of a tokenizer (see ``tokenizer``); "minilm": frozen all-MiniLM-L6-v2 token embeddings
    (float features, input_dim 384)."""
    tokenizer: str = "bpe"
    """inputs=tokens: "bpe" (a byte-level BPE trained on the training split, cached) or "gpt2" (the packaged
    GPT-2 BPE)."""
    vocab_size: int = 4096
    """Vocabulary of the trained "bpe" tokenizer."""
    max_length: int = 128
    """Tokens kept per article (the start of the article; shorter ones are padded and masked)."""
    test_fraction: float = 0.2
    """Fraction of the articles held out as the global test set (deterministic by article id and seed)."""
    max_docs_per_class: int | None = None
    """Keep at most this many articles per category (evenly spaced); None = all. For tests and demos."""
    partition: str = "dirichlet"
    """How the training split is divided over clients: "iid" (uniform at random) or "dirichlet" (label skew:
    each category is spread over the clients by proportions drawn from Dirichlet(alpha))."""
    alpha: float = 0.3
    """Dirichlet concentration (partition="dirichlet"): small = each client sees few categories."""
    min_partition_size: int = 2
    """Every client gets at least this many articles (the Dirichlet draw is repeated until it holds)."""
    cache_dir: str | None = None
    """Folder for the encoded data set and tokenizer (reused by every run that encodes the same way);
    None = ``<train.output_dir>/data_cache``."""

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise _bad("data.inputs", self.inputs, f"must be one of {INPUTS}")
        if self.tokenizer not in ("bpe", "gpt2"):
            raise _bad("data.tokenizer", self.tokenizer, "must be bpe or gpt2")
        for name, low in (("vocab_size", 256), ("max_length", 1), ("min_partition_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise _bad(f"data.{name}", v, f"must be an integer >= {low}")
        if not 0 < self.test_fraction < 1:
            raise _bad("data.test_fraction", self.test_fraction, "must be in (0, 1)")
        if self.max_docs_per_class is not None and (not isinstance(self.max_docs_per_class, int)
                                                    or self.max_docs_per_class < 2):
            raise _bad("data.max_docs_per_class", self.max_docs_per_class, "must be an integer >= 2 or null")
        if self.partition not in PARTITIONS:
            raise _bad("data.partition", self.partition, f"must be one of {PARTITIONS}")
        if not self.alpha > 0:
            raise _bad("data.alpha", self.alpha, "must be > 0 (e.g. 0.3 for strong label skew, 100 for nearly IID)")


@dataclass
class FederationConfig:
    """Clients, rounds and the aggregation rule."""

    num_clients: int = 5
    """Number of clients (Flower SuperNodes); each holds one partition of the training split."""
    num_rounds: int = 5
    """Federated rounds; re-running continues from the last round's checkpoint up to this."""
    local_epochs: int = 1
    """Passes of each client over its own partition per round."""
    aggregation: str = "expert_fedavg"
    """"fedavg" (every weight averaged by example counts) or "expert_fedavg" (each expert averaged only over the
    clients that routed tokens to it, weighted by those token counts; the rest as FedAvg)."""
    proximal_mu: float = 0.0
    """FedProx: clients add mu/2 * ||w - w_global||^2 to their loss (0 = off)."""
    fraction_fit: float = 1.0
    """Fraction of the clients sampled to train each round."""
    min_fit_clients: int = 2
    """A round's aggregate needs at least this many successful clients; with fewer the global model is kept."""
    num_cpus_per_client: float = 1.0
    """CPU cores Flower's simulation reserves per client (clients run in parallel up to the machine's cores)."""
    num_cpus: int | None = None
    """CPU cores the simulation may use in all; None = all of this machine's."""
    timeout_s: float = 3600.0
    """How long the server waits for the clients of one round."""

    def __post_init__(self) -> None:
        for name in ("num_clients", "num_rounds", "local_epochs", "min_fit_clients"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(f"federation.{name}", v, "must be a positive integer")
        if self.min_fit_clients > self.num_clients:
            raise _bad("federation.min_fit_clients", self.min_fit_clients,
                       f"exceeds federation.num_clients={self.num_clients}")
        if self.aggregation not in AGGREGATIONS:
            raise _bad("federation.aggregation", self.aggregation, f"must be one of {AGGREGATIONS}")
        if not self.proximal_mu >= 0:
            raise _bad("federation.proximal_mu", self.proximal_mu, "must be >= 0")
        if not 0 < self.fraction_fit <= 1:
            raise _bad("federation.fraction_fit", self.fraction_fit, "must be in (0, 1]")
        if not self.num_cpus_per_client > 0:
            raise _bad("federation.num_cpus_per_client", self.num_cpus_per_client, "must be > 0")
        if self.num_cpus is not None and (not isinstance(self.num_cpus, int) or self.num_cpus < 1):
            raise _bad("federation.num_cpus", self.num_cpus, "must be a positive integer or null")


@dataclass
class FederatedTrainConfig:
    """Local optimisation, evaluation and output."""

    output_dir: str = "runs/federated_bbc"
    """Where checkpoints/round_XXXX, metrics.jsonl and the plots go; re-running resumes from it."""
    batch_size: int = 32
    """Articles per local optimizer step."""
    lr: float = 1e-3
    """Adam learning rate of the local training (a fresh optimizer each round)."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip of each local step (0 = off)."""
    eval_batch_size: int = 128
    """Articles per evaluation forward."""
    seed: int = 0
    """Seed of the model init, the test split, the partition and every client's shuffling and dropout."""
    plots: bool = True
    """Write accuracy.png and expert_usage.png at the end."""
    threads_per_client: int = 1
    """torch threads of each client's training (match federation.num_cpus_per_client)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "threads_per_client"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(f"train.{name}", v, "must be a positive integer")
        if not self.lr > 0:
            raise _bad("train.lr", self.lr, "must be > 0")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise _bad(f"train.{name}", getattr(self, name), "must be >= 0")


@dataclass
class FederatedRunConfig:
    model: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of :class:`dsmoe.models.MoEEncoderConfig` (input_dim / vocab_size / num_classes come from
    the data)."""
    data: FederatedDataConfig = field(default_factory=FederatedDataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: FederatedTrainConfig = field(default_factory=FederatedTrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "data": dataclasses.asdict(self.data),
                "federation": dataclasses.asdict(self.federation), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, tree: dict[str, Any]) -> "FederatedRunConfig":
        sections = {"model", "data", "federation", "train"}
        for k in tree:
            if k not in sections:
                raise ConfigError(f"{k}: unknown section (known: {', '.join(sorted(sections))})")
        model = tree.get("model") or {}
        if not isinstance(model, dict):
            raise ConfigError(f"model={model!r}: expected a mapping of MoEEncoderConfig keys")
        cfg = cls(model=dict(model),
                  data=build_section("data", FederatedDataConfig, tree.get("data") or {}),
                  federation=build_section("federation", FederationConfig, tree.get("federation") or {}),
                  train=build_section("train", FederatedTrainConfig, tree.get("train") or {}))
        cfg.encoder_config(input_dim=384, vocab_size=cfg.data.vocab_size, num_classes=5)   # checks model.*
        return cfg

    def encoder_config(self, input_dim: int | None, vocab_size: int | None, num_classes: int) -> MoEEncoderConfig:
        """The model's config for data of this shape (the data decides the input and class sizes)."""
        known = set(MoEEncoderConfig.__annotations__)
        for k in self.model:
            if k in ("input_dim", "vocab_size", "num_classes"):
                raise ConfigError(f"model.{k}: set by the data (data.inputs / data.vocab_size); remove it")
            if k not in known:
                raise ConfigError(f"model.{k}: unknown key (known: {', '.join(sorted(known))})")
        kwargs = {"max_seq_length": self.data.max_length + 1, **self.model}
        try:
            return MoEEncoderConfig(input_dim=input_dim if self.data.inputs == "minilm" else None,
                                    vocab_size=vocab_size if self.data.inputs == "tokens" else None,
                                    num_classes=num_classes, **kwargs)
        except TypeError as e:
            raise ConfigError(f"model: {e}") from None
        except ValueError as e:
            raise ConfigError("model." + str(e).split("MoEEncoderConfig.", 1)[-1]) from None


def load_federated_config(path: str | os.PathLike | None = None,
                          overrides: list[str] | None = None) -> FederatedRunConfig:
    """Read a YAML run config (or the defaults) and apply ``section.key=value`` overrides."""
    tree = read_config_tree(path, overrides, "model, data, federation, train")
    return FederatedRunConfig.from_dict(tree)
