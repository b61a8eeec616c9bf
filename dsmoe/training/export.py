"""Checkpoint -> Hugging Face folder, and held-out evaluation of a checkpoint or HF folder."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from .checkpoint import STATE_FILE, CheckpointError, latest_checkpoint

RUN_FILE = "dsmoe_run.json"
"""Written by :func:`export_hf` into the exported folder: the run config and topology of the checkpoint, so the
folder evaluates on the run's held-out split with the tokenizer it carries."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def resolve_model_folder(path: str | Path) -> Path:
    """Accept a run's output_dir, a checkpoint dir (step_N) or an HF folder; return the HF folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory; give a run output_dir, a checkpoint or an HF folder")
    if (p / "config.json").exists() and (p / "model.safetensors").exists():
        return p
    if (p / STATE_FILE).exists():
        return p / "model"
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise CheckpointError(f"{p}: holds no complete checkpoint (no checkpoints/step_*/{STATE_FILE}) and is "
                              f"not an HF folder")
    return ckpt / "model"


def trainer_state_of(path: str | Path) -> dict:
    """The trainer state (run config, topology) of a run dir / checkpoint / its HF folder / an exported folder;
    {} if unknown."""
    p = Path(path)
    for cand in (p / STATE_FILE, p.parent / STATE_FILE, p / RUN_FILE):
        if cand.exists():
            return json.loads(cand.read_text())
    ckpt = latest_checkpoint(p) if p.is_dir() else None
    return json.loads((ckpt / STATE_FILE).read_text()) if ckpt is not None else {}


def export_hf(src: str | Path, out_dir: str | Path, tokenizer: bool = True) -> Path:
    """Write an HF folder (config + safetensors, experts in global order) that
    ``import dsmoe; AutoModelForCausalLM.from_pretrained(out_dir)`` loads."""
    import dsmoe  # noqa: F401  (registers the model with the Auto classes)
    from transformers import AutoModelForCausalLM

    folder = resolve_model_folder(src)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new OUT_DIR (nothing was overwritten)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    state = trainer_state_of(src)
    run_cfg = state.get("config")
    if run_cfg is not None:
        (tmp / RUN_FILE).write_text(json.dumps({"config": run_cfg, "topology": state.get("topology")}, indent=1))
    if tokenizer and run_cfg is not None:
        tok = _tokenizer_for(run_cfg, Path(src))
        if tok is not None:
            tok.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def _tokenizer_for(run_cfg: dict, src: Path):
    from dsmoe.data import DataConfig, build_data
    out_dir = run_cfg.get("train", {}).get("output_dir")
    try:
        return build_data(DataConfig(**run_cfg["data"]), output_dir=out_dir).tokenizer
    except Exception:  # noqa: BLE001 - the tokenizer is a convenience; the weights are the export
        return None


@torch.no_grad()
def evaluate_folder(src: str | Path, data_overrides: dict | None = None, batch_size: int | None = None,
                    max_batches: int | None = None) -> dict:
    """Held-out perplexity of a checkpoint / HF folder on the validation split of its run's data config.

    Batch size and count default to the run's, so the blocks scored are the trainer's: ``train.eval_batches`` per
    rank over W ranks (strided) is the first ``eval_batches * W`` batches here. Evaluation is dropless by default
    (``eval_dropless``), so the per-token losses do not depend on how the blocks were batched. A folder written by
    :func:`export_hf` evaluates with the tokenizer it carries, on the held-out split of the run recorded in it."""
    import dsmoe  # noqa: F401
    from transformers import AutoModelForCausalLM
    from dsmoe.data import DataConfig, build_data

    folder = resolve_model_folder(src)
    state = trainer_state_of(src)
    run_cfg = state.get("config") or {}
    train_cfg = run_cfg.get("train", {})
    batch_size = batch_size or train_cfg.get("micro_batch_size", 8)
    if max_batches is None:
        max_batches = train_cfg.get("eval_batches", 0) * state.get("topology", {}).get("world_size", 1)
    data_cfg = dict(run_cfg.get("data", {}))
    cache_dir = train_cfg.get("output_dir")
    if any((folder / f).exists() for f in TOKENIZER_FILES):     # an exported folder: its own tokenizer
        data_cfg["tokenizer"] = str(folder)
        cache_dir = None if (folder / RUN_FILE).exists() else cache_dir
    data_cfg.update(data_overrides or {})
    data = build_data(DataConfig(**data_cfg), output_dir=cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if data.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{folder}: vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                              f"{data.vocab_size}; evaluate with the data config the model was trained on")
    nll, n = 0.0, 0
    for i, batch in enumerate(data.val_batches(batch_size, rank=0, world_size=1)):
        if max_batches and i >= max_batches:
            break
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        k = int((batch["labels"][:, 1:] != -100).sum())
        nll += float(out.lm_loss if getattr(out, "lm_loss", None) is not None else out.loss) * k
        n += k
    mean = nll / max(n, 1)
    return {"model": str(folder), "batch_size": batch_size, "val_tokens": n, "val_loss": mean, "val_perplexity": math.exp(min(mean, 50))}
