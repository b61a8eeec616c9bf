"""The centralised baseline: the same model trained on the union of the clients' data.

Per "round" it makes ``federation.local_epochs`` passes over the union of all partitions (the whole training
split) with the same batch size and learning rate as the clients, so it sees every example as often as the
federated run does; one Adam optimizer runs through all rounds. After each round the model is evaluated on the
same test split and a row is appended to ``<train.output_dir>/centralised/metrics.jsonl``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .config import FederatedRunConfig
from .local import evaluate, train_local
from .metrics import append_row
from .task import build_model, client_seed, partitions, prepare_data

log = logging.getLogger("dsmoe.federated")


def run_centralised(cfg: FederatedRunConfig) -> list[dict]:
    """Train the baseline of ``cfg`` from scratch (its output folder is replaced); returns its rows."""
    out = Path(cfg.train.output_dir) / "centralised"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.jsonl"
    path.unlink(missing_ok=True)
    torch.set_num_threads(cfg.train.threads_per_client)        # as one client (oversubscribed OpenMP crawls)
    data = prepare_data(cfg)
    union = sorted(i for part in partitions(cfg, data) for i in part)
    x, mask, y = data.train_subset(union)
    model = build_model(cfg, data)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    rows, t0 = [], time.time()
    for r in range(1, cfg.federation.num_rounds + 1):
        res = train_local(model, x, mask, y, cfg.train, cfg.federation.local_epochs,
                          seed=client_seed(cfg.train.seed, r, -1) % 2**31, optimizer=opt)
        ev = evaluate(model, data.test_x, data.test_mask, data.test_y, cfg.train.eval_batch_size)
        row = {"round": r, "test_accuracy": ev.accuracy, "test_macro_f1": ev.macro_f1, "test_loss": ev.loss,
               "train_loss": res.loss, "auxiliary_loss": res.auxiliary_loss, "steps": res.steps,
               "expert_usage": {"all": res.expert_tokens} if res.expert_tokens else {},
               "time_s": round(time.time() - t0, 2)}
        append_row(path, row)
        rows.append(row)
        log.info("centralised round %d/%d  test acc %.3f  macro-F1 %.3f  train loss %.4f", r,
                 cfg.federation.num_rounds, ev.accuracy, ev.macro_f1, res.loss)
    (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return rows
