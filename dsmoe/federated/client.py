"""The Flower ClientApp: local training on one partition, and evaluation of the global model on it.

Which partition a client holds comes from its node config (``partition-id``, ``num-partitions``): Flower's
simulation sets them; on a deployment start each SuperNode with ``--node-config "partition-id=0
num-partitions=3"``. The run config is given to :func:`build_client_app` (simulation) or read from the Flower
run config (deployment; see :func:`config_from_context`).
"""
from __future__ import annotations

import shlex
from collections.abc import Sequence

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .config import FederatedRunConfig, load_federated_config
from .local import evaluate, train_local
from .strategy import TOKENS_PREFIX
from .task import build_model, client_seed, partitions, prepare_data


def config_from_context(context: Context) -> FederatedRunConfig:
    """The run config named by the Flower run config keys ``config`` (a YAML path) and ``overrides``
    (space-separated ``section.key=value``), as ``flwr run`` passes them from the app's pyproject.toml."""
    rc = context.run_config
    return load_federated_config(str(rc.get("config", "launch/configs/federated_bbc.yaml")),
                                 shlex.split(str(rc.get("overrides", ""))))


def _partition(cfg: FederatedRunConfig, context: Context) -> int:
    pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    if num != cfg.federation.num_clients or not 0 <= pid < num:
        raise ValueError(f"node config partition-id={pid} num-partitions={num} does not match "
                         f"federation.num_clients={cfg.federation.num_clients}")
    return pid


def build_client_app(cfg: FederatedRunConfig | None = None, mods: Sequence = ()) -> ClientApp:
    """A ClientApp for ``cfg`` (None: read it from each message's run context). ``mods``: Flower client mods."""
    app = ClientApp(mods=list(mods))

    def setup(context: Context):
        run_cfg = cfg if cfg is not None else config_from_context(context)
        torch.set_num_threads(run_cfg.train.threads_per_client)
        data = prepare_data(run_cfg)
        pid = _partition(run_cfg, context)
        x, mask, y = data.train_subset(partitions(run_cfg, data)[pid])
        model = build_model(run_cfg, data)
        return run_cfg, pid, model, (x, mask, y)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg, pid, model, (x, mask, y) = setup(context)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        conf = msg.content["config"]
        res = train_local(model, x, mask, y, run_cfg.train, run_cfg.federation.local_epochs,
                          seed=client_seed(run_cfg.train.seed, int(conf["round"]), pid),
                          proximal_mu=float(conf.get("proximal-mu", 0.0)))
        metrics = {"num-examples": res.num_examples, "partition-id": pid, "train-loss": res.loss,
                   "auxiliary-loss": res.auxiliary_loss, "steps": res.steps}
        metrics.update({TOKENS_PREFIX + layer: t for layer, t in res.expert_tokens.items()})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_global(msg: Message, context: Context) -> Message:
        run_cfg, pid, model, (x, mask, y) = setup(context)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        ev = evaluate(model, x, mask, y, run_cfg.train.eval_batch_size)
        metrics = MetricRecord({"num-examples": ev.num_examples, "partition-id": pid, "accuracy": ev.accuracy,
                                "loss": ev.loss})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app


app = build_client_app()
"""The ClientApp of a Flower deployment (``flwr run``): reads its run config from the Flower run config."""
