"""Tokenize documents and pack them into fixed-length blocks.

Every document is followed by the EOS token, all documents are concatenated in order, and the stream
is cut into blocks of ``seq_len`` tokens (the incomplete tail is dropped). A batch holds
``input_ids`` and ``labels`` of the same length with ``labels == input_ids``: the model shifts them
(HF causal-LM convention), so every token of a block but the first is a prediction target.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


def tokenize_documents(docs: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, fingerprint: str) -> datasets.Dataset:
    """``docs`` (column ``text``) -> a dataset with one column ``input_ids`` per document, EOS-terminated.

    ``fingerprint`` names the result (it must change with the tokenizer); passing it spares
    ``datasets`` from hashing the tokenizer.
    """
    eos = tokenizer.eos_token_id
    assert eos is not None, "tokenizer without eos_token reached packing"

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

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


def pack_blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``[n, seq_len]`` blocks, dropping the incomplete tail."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].reshape(n, seq_len).clone()


def lm_batch(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """A causal-LM batch from ``[b, seq_len]`` blocks: ``labels`` is a copy of ``input_ids``."""
    return {"input_ids": blocks, "labels": blocks.clone()}
