"""The time-mixture run: slice experts and baseline (the trainer), then the mixture, its gate and the table.

``launch/train.py --config X.yaml`` with ``slices.ranges`` calls :func:`run_time_mixture`:

1. :func:`dsmoe.training.slices.train_slices`: the shared tokenizer, one expert per slice, the baseline;
2. ``OUTPUT/mixture/``: ``ExpertMixtureForCausalLM.from_experts`` over the experts' HF folders (slices and names
   from their ``dsmoe_slice``), the gate trained over the frozen experts on windows of the slices' *training*
   documents (``mixture.gate_objective``), saved with the tokenizer;
3. the comparison table on every slice's *held-out* documents (single experts, the baseline, equal, router,
   soft, argmax, oracle; year-prediction MAE), printed and written as ``mixture_eval.json`` / ``.png``.

Step 2-3 run once every run of step 1 is finished (with ``slices.only`` a job-array task trains one run; the
last one to finish, or a re-run of the command, builds the mixture). ``mixture.enabled: false`` skips them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

log = logging.getLogger("dsmoe.mixtures")
DATA_FILE = "dsmoe_data.json"     # the data section the mixture's experts were trained with (prompt included)


def gate_batches(docs, seq_len: int, batch_size: int, dates: bool = False) -> list[dict]:
    """Full windows of ``seq_len`` tokens of ``docs`` (EvalDocuments), batched with each window's gold slice, a
    ``prompt_mask`` on the prompt prefix (never read by the gate, never a target) when any document has one,
    and, with ``dates``, its document's year as the query date."""
    rows = []
    for doc in docs:
        for start in range(0, len(doc.ids) - seq_len + 1, seq_len):
            rows.append((doc.ids[start:start + seq_len], doc.year, doc.slice, max(0, doc.prompt_len - start)))
    prompted = any(r[3] for r in rows)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(rows), generator=g).tolist()
    batches = []
    for i in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [rows[j] for j in order[i:i + batch_size]]
        batch = {"input_ids": torch.tensor([c[0] for c in chunk]), "slice_labels": torch.tensor([c[2] for c in chunk])}
        if prompted:
            batch["prompt_mask"] = torch.arange(seq_len)[None, :] < torch.tensor([c[3] for c in chunk])[:, None]
        if dates:
            batch["date"] = torch.tensor([c[1] for c in chunk])
        batches.append(batch)
    return batches


def build_mixture(cfg, out: Path):
    """Mix the experts of ``out/experts``, train the gate, save to ``out/mixture``; returns (model, tokenizer,
    the data config of all slices)."""
    from dsmoe.data.tokenizer import load_tokenizer_folder

    from .documents import held_out_documents
    from .gate_training import GateTrainingConfig, train_gate
    from .modeling_expert_mixture import ExpertMixtureForCausalLM

    m, slices = cfg.mixture, cfg.slices.parsed()
    folders = [str(out / "experts" / s.name / "hf") for s in slices]
    tok = load_tokenizer_folder(str(out / "tokenizer"))
    torch.manual_seed(cfg.train.seed)            # the router's initialisation: the same table on every re-run
    model = ExpertMixtureForCausalLM.from_experts(folders, combine=m.combine, date_policy=m.date_policy,
                                                  top_k=m.top_k, router={"hidden_size": m.router_hidden_size})
    for e in model.experts:
        e.requires_grad_(False)
    data_cfg = replace(cfg.data, year_min=slices[0].start, year_max=slices[-1].end, tokenizer=str(out / "tokenizer"))
    train_docs, _ = held_out_documents(data_cfg, tok, model.config.slices, output_dir=out / "tokenizer_data",
                                       split="train")
    batches = gate_batches(train_docs, cfg.data.seq_len, m.batch_size, m.gate_dates)
    if not batches:
        raise ValueError(f"the slices' training documents give no full window of data.seq_len={cfg.data.seq_len} "
                         f"tokens for mixture.batch_size={m.batch_size}; lower one of them")
    res = train_gate(model, batches, GateTrainingConfig(objective=m.gate_objective, steps=m.gate_steps,
                                                        lr=m.gate_lr))
    log.info("gate (%s): loss %.4f -> %.4f over %d steps, %.1f s", m.gate_objective, res.losses[0], res.losses[-1],
             len(res.losses), res.seconds)
    folder = out / "mixture"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    (folder / DATA_FILE).write_text(json.dumps(data_cfg.to_dict(), indent=1))
    return model, tok, data_cfg


def evaluate(cfg, out: Path, model, tok, data_cfg):
    """The comparison table on every slice's held-out documents, printed and written to ``out/mixture``."""
    from transformers import AutoModelForCausalLM

    from .documents import held_out_documents
    from .evaluation import evaluate_mixture

    docs, mean_year = held_out_documents(data_cfg, tok, model.config.slices, output_dir=out / "tokenizer_data")
    baseline = None
    if (out / "baseline" / "hf" / "config.json").exists():
        baseline = AutoModelForCausalLM.from_pretrained(str(out / "baseline" / "hf"), dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    res = evaluate_mixture(model, docs, cfg.data.seq_len, cfg.mixture.batch_size, mean_year, baseline, pad or 0)
    js, png = res.write(out / "mixture")
    print(res.format_table(), flush=True)
    print(f"wrote {js} and {png}", flush=True)
    return res


def run_time_mixture(cfg, debug: bool = False) -> dict:
    """Slice experts + baseline, then (when every run is finished) the mixture, its gate and the table."""
    from dsmoe.training.slices import process_rank, run_dir, train_slices

    results = train_slices(cfg, debug=debug)
    out = Path(cfg.train.output_dir)
    runs = [s.name for s in cfg.slices.parsed()] + (["baseline"] if cfg.slices.baseline else [])
    missing = [r for r in runs if not (run_dir(out, r) / "hf" / "config.json").exists()]
    if process_rank() == 0 and cfg.mixture.enabled and not missing:
        model, tok, data_cfg = build_mixture(cfg, out)
        results["mixture"] = evaluate(cfg, out, model, tok, data_cfg).to_dict()
    elif process_rank() == 0 and cfg.mixture.enabled:
        log.info("mixture: waiting for %s; re-run the command (or the remaining job-array tasks) to build it",
                 ", ".join(missing))
    return results
