"""Tokenize documents and pack them into fixed-length blocks.

Every document is followed by the EOS token, all documents are concatenated in order, and the stream
is cut into blocks of ``seq_len`` tokens (the incomplete tail is dropped). A batch holds
``input_ids`` and ``labels`` of the same length with ``labels == input_ids``: the model shifts them
(HF causal-LM convention), so every token of a block but the first is a prediction target.

With a document prompt (``data.prompt``, :mod:`dsmoe.data.prompts`) each document is its prefix, its text and
EOS; a parallel boolean stream marks the tokens that are scored (everything but the prefixes), is packed into
blocks the same way, and gives the prefix positions the label -100.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .prompts import DocumentPrompt


def tokenize_documents(docs: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, fingerprint: str,
                       prompt: DocumentPrompt | None = None) -> datasets.Dataset:
    """``docs`` (column ``text``, and ``year`` for a prompt) -> a dataset with one column ``input_ids`` per
    document (prompt prefix + text + EOS) and ``prompt_len`` (the prefix's tokens).

    ``fingerprint`` names the result (it must change with the tokenizer and the prompt); passing it spares
    ``datasets`` from hashing the tokenizer.
    """
    eos = tokenizer.eos_token_id
    assert eos is not None, "tokenizer without eos_token reached packing"
    prompt = prompt or DocumentPrompt()
    if prompt.enabled and "year" not in docs.column_names:
        raise ValueError(f"data.prompt={prompt.kind}: the documents have no year column; set data.year_field or "
                         "use data.prompt=none")
    prefixes: dict = {}

    def prefix(year) -> list[int]:
        if year not in prefixes:
            prefixes[year] = prompt.ids(tokenizer, year)
        return prefixes[year]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        heads = [prefix(y) for y in batch["year"]] if prompt.enabled else [[]] * len(ids)
        return {"input_ids": [h + x + [eos] for h, x in zip(heads, ids)], "prompt_len": [len(h) for h in heads]}

    return docs.map(
        encode,
        batched=True,
        batch_size=256,
        num_proc=None,
        remove_columns=docs.column_names,
        keep_in_memory=True,
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )


def flat_token_stream(tokenized: datasets.Dataset) -> torch.Tensor:
    """All ``input_ids`` of a tokenized dataset, concatenated, as a 1-D LongTensor."""
    if len(tokenized) == 0:
        return torch.zeros(0, dtype=torch.long)
    column = tokenized.with_format("arrow")[:].column("input_ids")  # respects any indices mapping
    parts = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]
    return torch.from_numpy(np.concatenate(parts).astype(np.int64, copy=False))


def scored_stream(tokenized: datasets.Dataset) -> torch.Tensor | None:
    """A 1-D BoolTensor beside :func:`flat_token_stream`: False on prompt-prefix tokens; None without any."""
    if len(tokenized) == 0 or "prompt_len" not in tokenized.column_names:
        return None
    import pyarrow.compute as pc

    table = tokenized.with_format("arrow")[:]
    heads = table.column("prompt_len").to_numpy().astype(np.int64)
    if not heads.any():
        return None
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    scored = np.ones(int(lengths.sum()), dtype=bool)
    for s, h in zip(starts[heads > 0], heads[heads > 0]):
        scored[s:s + h] = False
    return torch.from_numpy(scored)


def pack_blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``[n, seq_len]`` blocks, dropping the incomplete tail."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].reshape(n, seq_len).clone()


def lm_batch(blocks: torch.Tensor, scored: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A causal-LM batch from ``[b, seq_len]`` blocks: ``labels`` is a copy of ``input_ids``, -100 where
    ``scored`` (a BoolTensor of the same shape, when given) is False."""
    labels = blocks.clone()
    if scored is not None:
        labels[~scored] = -100
    return {"input_ids": blocks, "labels": labels}
