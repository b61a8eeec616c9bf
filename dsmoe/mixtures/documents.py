"""Held-out documents of a dated corpus, assigned to the mixture's slices by their year.

The train/validation split is the data layer's own (by a hash of each document id), so the held-out documents
here are exactly the validation documents of every slice expert trained with the same ``data`` section: no
document is trained on by one model and scored by another.
"""
from __future__ import annotations

import logging
from pathlib import Path

from dsmoe.data import DataConfig
from dsmoe.data.cache import resolve_cache_dir
from dsmoe.data.prompts import DocumentPrompt
from dsmoe.data.sources import load_documents
from dsmoe.data.split import split_documents

from .evaluation import EvalDocument

log = logging.getLogger("dsmoe.mixtures")


def held_out_documents(cfg: DataConfig, tokenizer, slices: list[list[int]],
                       output_dir: str | Path | None = None, split: str = "val") -> tuple[list[EvalDocument], float]:
    """(validation documents with their slice, mean year of the training documents) of ``cfg``'s source;
    ``split="train"`` gives the training documents instead (for training a gate on them).

    Each document is EOS (the separator the models saw before every document in training), the prompt prefix of
    ``cfg.prompt`` (a period token or the year sentence) and the text; ``prompt_len`` covers the separator and
    the prefix, so neither is scored nor read by the gate (which thus reads the same tokens under every prompt
    variant). Documents whose year lies in no slice
    are left out; a slice with no training or no held-out document is a ValueError naming it."""
    if split not in ("val", "train"):
        raise ValueError(f"split={split!r}: must be 'val' or 'train'")
    docs = load_documents(cfg, resolve_cache_dir(cfg, output_dir) / "hf_datasets")
    if "year" not in docs.column_names:
        raise ValueError(f"data.year_field={cfg.year_field!r} is not a column of data.source={cfg.source!r}; the "
                         "slices need each document's year")
    train_idx, val_idx = split_documents(list(docs["doc_id"]), cfg.val_fraction, cfg.seed)
    years = docs["year"]

    def slice_of(y):
        return next((k for k, s in enumerate(slices) if y is not None and s[0] <= y <= s[1]), None)

    for part, idx in (("training", train_idx), ("held-out", val_idx)):
        counts = [0] * len(slices)
        for i in idx:
            k = slice_of(years[i])
            if k is not None:
                counts[k] += 1
        empty = [slices[k] for k, c in enumerate(counts) if c == 0]
        if empty:
            raise ValueError(f"slice {empty[0]} has no {part} documents in data.source={cfg.source!r} (documents "
                             f"per slice {counts}); widen that slice or raise data.max_documents / "
                             "data.val_fraction")
    train_years = [years[i] for i in train_idx if slice_of(years[i]) is not None]
    out = []
    eos = tokenizer.eos_token_id
    prompt = DocumentPrompt.of(cfg)
    chosen = val_idx if split == "val" else train_idx
    texts = docs.select(chosen)["text"]
    for i, text in zip(chosen, texts):
        k = slice_of(years[i])
        if k is None:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        head = ([eos] if eos is not None else []) + prompt.ids(tokenizer, years[i])
        out.append(EvalDocument(head + ids, int(years[i]), k, len(head)))
    skipped = len(chosen) - len(out)
    if skipped:
        log.info("%d held-out documents lie in no slice and are not scored", skipped)
    return out, sum(train_years) / len(train_years)
