"""The Flower strategy of dsmoe's federated training: FedAvg or expert-aware FedAvg (optionally FedProx).

Built on ``flwr.serverapp.strategy.FedAvg`` (sampling, message construction, reply checks); what it changes:

* ``configure_train`` sends the absolute round (``round``; a resumed run continues the count) and
  ``proximal-mu`` in the train config;
* ``aggregate_train`` calls :func:`dsmoe.federated.fedavg` or :func:`dsmoe.federated.expert_fedavg` on the
  clients' state dicts, with each client's ``num-examples`` and per-expert token counts (``tokens/<layer>``);
  a failed client is logged and left out; with fewer than ``min_fit_clients`` successes the global model is kept;
* both aggregation steps record per-client facts (weight, expert usage, local accuracy, failures) in
  :attr:`round_record` for the round's metrics row.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .aggregation import aggregation_weights, expert_fedavg, expert_weights, fedavg

log = logging.getLogger("dsmoe.federated")

TOKENS_PREFIX = "tokens/"
"""MetricRecord key prefix of a client's per-expert token counts: ``tokens/<MoE layer prefix>`` -> list[int]."""


class MoEFedStrategy(FedAvg):
    """FedAvg / expert-aware FedAvg over whole clients (see the module docstring)."""

    def __init__(self, aggregation: str, num_clients: int, min_fit_clients: int, fraction_fit: float = 1.0,
                 proximal_mu: float = 0.0, round_offset: int = 0):
        super().__init__(fraction_train=fraction_fit, fraction_evaluate=1.0, min_train_nodes=min_fit_clients,
                         min_evaluate_nodes=min_fit_clients, min_available_nodes=num_clients,
                         weighted_by_key="num-examples", arrayrecord_key="arrays", configrecord_key="config",
                         evaluate_metrics_aggr_fn=_weighted_mean_metrics)
        self.aggregation = aggregation
        self.min_fit_clients = min_fit_clients
        self.proximal_mu = proximal_mu
        self.round_offset = round_offset
        self.round_record: dict[str, Any] = {}
        self._partition_of_node: dict[int, int] = {}

    def absolute_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.round_record = {"failed_clients": []}
        config["round"] = self.absolute_round(server_round)
        config["proximal-mu"] = float(self.proximal_mu)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid, errors = self._check_and_log_replies(replies, is_train=True)
        self._record_failures(server_round, errors)
        rec = self.round_record
        rec["clients_ok"] = len(valid)
        if len(valid) < self.min_fit_clients:
            log.warning("round %d: only %d client(s) succeeded, below federation.min_fit_clients=%d; the global "
                        "model is kept unchanged", self.absolute_round(server_round), len(valid), self.min_fit_clients)
            rec["aggregated"] = False
            return None, None
        valid.sort(key=lambda m: int(m.content["metrics"]["partition-id"]))    # a fixed summation order
        metrics = [m.content["metrics"] for m in valid]
        pids = [int(m["partition-id"]) for m in metrics]
        for msg, pid in zip(valid, pids):
            self._partition_of_node[msg.metadata.src_node_id] = pid
        states = [m.content["arrays"].to_torch_state_dict() for m in valid]
        num_examples = [int(m["num-examples"]) for m in metrics]
        tokens = [{k[len(TOKENS_PREFIX):]: [int(v) for v in m[k]] for k in m.keys() if k.startswith(TOKENS_PREFIX)}
                  for m in metrics]
        if self.aggregation == "expert_fedavg" and any(tokens):
            new = expert_fedavg(states, num_examples, tokens)
            rec["expert_weight"] = {layer: dict(zip(map(str, pids), w)) for layer, w in expert_weights(tokens).items()}
        else:
            new = fedavg(states, num_examples)
        weights = aggregation_weights(num_examples)
        rec.update(aggregated=True, client_weight=dict(zip(map(str, pids), weights)),
                   client_examples=dict(zip(map(str, pids), num_examples)),
                   expert_usage={str(p): t for p, t in zip(pids, tokens) if t},
                   train_loss=sum(w * float(m["train-loss"]) for w, m in zip(weights, metrics)),
                   auxiliary_loss=sum(w * float(m["auxiliary-loss"]) for w, m in zip(weights, metrics)))
        summary = MetricRecord({"train-loss": rec["train_loss"], "auxiliary-loss": rec["auxiliary_loss"]})
        return ArrayRecord(new), summary

    # ------------------------------------------------------------------ evaluate (global model on client data)
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid, errors = self._check_and_log_replies(list(replies), is_train=False)
        self._record_failures(server_round, errors, phase="evaluate")
        acc = {str(int(m.content["metrics"]["partition-id"])): float(m.content["metrics"]["accuracy"]) for m in valid}
        self.round_record["client_accuracy"] = dict(sorted(acc.items(), key=lambda kv: int(kv[0])))
        return super().aggregate_evaluate(server_round, valid) if valid else None

    def _record_failures(self, server_round: int, errors: list[Message], phase: str = "train") -> None:
        for msg in errors:
            node = msg.metadata.src_node_id
            pid = self._partition_of_node.get(node)
            reason = msg.error.reason.strip().splitlines()[-1] if msg.error.reason else f"code {msg.error.code}"
            log.warning("round %d: client %s (node %d) failed in %s and is left out: %s",
                        self.absolute_round(server_round), "?" if pid is None else pid, node, phase, reason)
            self.round_record.setdefault("failed_clients", []).append(
                {"node": node, "partition": pid, "phase": phase, "reason": reason})


def _weighted_mean_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of the clients' float metrics (ids and counts are not averaged)."""
    records = [next(iter(c.metric_records.values())) for c in contents]
    total = sum(float(r[weight_key]) for r in records) or 1.0
    keys = [k for k in records[0].keys() if k not in (weight_key, "partition-id") and not k.startswith(TOKENS_PREFIX)]
    return MetricRecord({k: sum(float(r[weight_key]) * float(r[k]) for r in records) / total for k in keys})
