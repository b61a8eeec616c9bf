"""The Flower ServerApp: rounds of the strategy, global evaluation, per-round checkpoints and metrics, resume.

Each round, after aggregation, the global model is evaluated on the BBC test split (accuracy, macro-F1), a row
is appended to ``metrics.jsonl`` and the model is checkpointed (``checkpoints/round_XXXX``). Re-running with the
same output dir continues after the newest checkpoint (rows of later rounds, from an interrupted run, are
dropped first) up to ``federation.num_rounds``.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from .checkpoint import latest_round, load_round, save_round
from .client import config_from_context
from .config import FederatedRunConfig
from .local import evaluate
from .metrics import append_row, truncate_after_round, write_plots
from .strategy import MoEFedStrategy
from .task import build_model, fingerprint, partitions, prepare_data

log = logging.getLogger("dsmoe.federated")


def run_server(grid: Grid, cfg: FederatedRunConfig) -> dict[str, Any]:
    """Run (or resume) the federated training of ``cfg`` over the clients of ``grid``; returns the last row."""
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    data = prepare_data(cfg)
    partitions(cfg, data)                                  # refuse an impossible split before any round
    model = build_model(cfg, data)
    fp = fingerprint(cfg)
    latest = latest_round(out)
    start = 0
    if latest is not None:
        start, folder = latest
        model.load_state_dict(load_round(folder, fp))
        log.info("resuming after round %d from %s", start, folder)
    truncate_after_round(metrics_path, start if latest is not None else -1)
    tmp = out / "run_config.json.tmp"
    tmp.write_text(json.dumps(cfg.to_dict(), indent=1))
    tmp.replace(out / "run_config.json")
    fed = cfg.federation
    remaining = fed.num_rounds - start
    last: dict[str, Any] = {}
    if remaining <= 0:
        log.info("all %d rounds are done (checkpoints in %s); raise federation.num_rounds to train more",
                 fed.num_rounds, out / "checkpoints")
    else:
        strategy = MoEFedStrategy(fed.aggregation, fed.num_clients, fed.min_fit_clients, fed.fraction_fit,
                                  fed.proximal_mu, round_offset=start)
        t0 = time.time()

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            r = start + server_round
            if server_round == 0 and start > 0:
                return None                                # the resumed-from round is already logged
            model.load_state_dict(arrays.to_torch_state_dict())
            ev = evaluate(model, data.test_x, data.test_mask, data.test_y, cfg.train.eval_batch_size)
            row = {"round": r, "test_accuracy": ev.accuracy, "test_macro_f1": ev.macro_f1, "test_loss": ev.loss,
                   "aggregation": fed.aggregation, **(strategy.round_record if server_round else {}),
                   "time_s": round(time.time() - t0, 2)}
            append_row(metrics_path, row)                  # the row first: a crash before the checkpoint redoes r
            if server_round:
                save_round(out, r, model.state_dict(), model.config, fp)
            last.clear()
            last.update(row)
            failed = len(row.get("failed_clients", []))
            log.info("round %d/%d  test acc %.3f  macro-F1 %.3f  train loss %s  aux %s  clients ok %s%s", r,
                     fed.num_rounds, ev.accuracy, ev.macro_f1, _fmt(row.get("train_loss")),
                     _fmt(row.get("auxiliary_loss")), row.get("clients_ok", "-"),
                     f"  FAILED {failed}" if failed else "")
            return MetricRecord({"accuracy": ev.accuracy, "macro-f1": ev.macro_f1})

        strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=remaining, timeout=fed.timeout_s,
                       evaluate_fn=evaluate_fn)
    if cfg.train.plots:
        for p in write_plots(out):
            log.info("wrote %s", p)
    return last


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def build_server_app(cfg: FederatedRunConfig | None = None,
                     on_error: Callable[[BaseException], None] | None = None) -> ServerApp:
    """A ServerApp for ``cfg`` (None: read it from the Flower run config). ``on_error`` sees any exception of
    the run before Flower does (the simulation runs the server in a thread and would only log it)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_server(grid, cfg if cfg is not None else config_from_context(context))
        except BaseException as e:
            if on_error is not None:
                on_error(e)
            raise

    return app


app = build_server_app()
"""The ServerApp of a Flower deployment (``flwr run``): reads its run config from the Flower run config."""
