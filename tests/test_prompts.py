"""The prompt variants of the period experts as data options: none (B), a period special token added to the
tokenizer (C), the year sentence (E). Prompt tokens are context only: label -100 in training and validation
batches, never scored by the mixture table, never read by the gate."""
from __future__ import annotations

import json

import pytest
import torch

from dsmoe.data import DataConfig, build_data
from dsmoe.data.packing import lm_batch

DOCS = [{"text": f"document number {i} says hello to the reader " * 6, "year": 1800 + 30 * i, "id": str(i)}
        for i in range(8)]
PERIODS = ["1790-1899", "1900-2026"]


def data(tmp_path, prompt, **kw):
    src = tmp_path / "docs.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    cfg = DataConfig(source=str(src), id_field="id", vocab_size=300, seq_len=16, val_fraction=0.25, prompt=prompt,
                     prompt_periods=PERIODS if prompt == "period_token" else None, **kw)
    return build_data(cfg, output_dir=tmp_path / "cache")


def stream(blocks):
    return blocks.reshape(-1)


def test_prefix_tokens_are_never_targets_and_the_text_tokens_are_unchanged(tmp_path):
    plain = data(tmp_path, "none")
    assert plain.train_scored is None
    for prompt, first in (("year_prefix", "This text was written in the year"), ("period_token", "<|1790-1899|>")):
        b = data(tmp_path, prompt)
        tok = b.tokenizer
        ids, scored = stream(b.train_blocks), stream(b.train_scored)
        k = int(scored.int().argmax())                      # the first document's prefix: stream[:k]
        assert tok.decode(ids[:k]).strip() == (first + " 1800." if prompt == "year_prefix" else first)
        # dropping the prefix tokens gives exactly the stream without prompts (cut to whole blocks)
        text_only = ids[scored]
        n = min(len(text_only), stream(plain.train_blocks).numel())
        assert torch.equal(text_only[: n - 64], stream(plain.train_blocks)[: n - 64])
        # every document has its prefix: one unscored run per document start
        runs = int((scored[1:] & ~scored[:-1]).sum() + (~scored[0]).int())
        assert runs >= 4
        loader = b.train_loader(micro_batch=3, seed=0)
        batch = next(loader)
        idx = loader.permutation(0)[:3]
        assert torch.equal(batch["labels"] == -100, ~b.train_scored[idx])
        assert torch.equal(batch["labels"][b.train_scored[idx]], batch["input_ids"][b.train_scored[idx]])
        val = next(b.val_batches(2))
        assert torch.equal(val["labels"] == -100, ~b.val_scored[:2])


def test_period_tokens_join_the_vocabulary_and_each_document_gets_its_own(tmp_path):
    plain, b = data(tmp_path, "none"), data(tmp_path, "period_token")
    assert len(b.tokenizer) == len(plain.tokenizer) + 2
    vocab = b.tokenizer.get_vocab()
    early, late = vocab["<|1790-1899|>"], vocab["<|1900-2026|>"]
    ids = stream(torch.cat([b.train_blocks, b.val_blocks]))
    assert {int(i) for i in ids if i >= len(plain.tokenizer)} == {early, late}
    assert b.tokenizer.tokenize("<|1900-2026|>") == ["<|1900-2026|>"]       # one token, never split
    again = data(tmp_path, "period_token")                                   # cached: the same blocks and masks
    assert again.stats.packed_cache_hit and torch.equal(again.train_scored, b.train_scored)


def test_a_year_outside_the_periods_and_bad_prompt_settings_name_the_key(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    with pytest.raises(ValueError, match=r"data.prompt_periods=\['1790-1899'\]: no period holds a document of 19[0-9]0"):
        build_data(DataConfig(source=str(src), id_field="id", vocab_size=300, seq_len=16, val_fraction=0.25,
                              prompt="period_token", prompt_periods=["1790-1899"]), output_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="data.prompt_periods: data.prompt=period_token needs the periods"):
        build_data(DataConfig(source=str(src), id_field="id", vocab_size=300, seq_len=16, val_fraction=0.25,
                              prompt="period_token"), output_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="data.prompt='year': expected one of"):
        DataConfig(prompt="year")
    with pytest.raises(ValueError, match="data.prompt_template='Written in': expected a text with {year}"):
        DataConfig(prompt="year_prefix", prompt_template="Written in")
    with pytest.raises(ValueError, match=r"data.prompt_periods\[1\]='1850-1900': overlaps or precedes"):
        DataConfig(prompt="period_token", prompt_periods=["1790-1899", "1850-1900"])


def test_lm_batch_masks_only_unscored_positions():
    blocks = torch.arange(12).reshape(2, 6)
    scored = torch.ones(2, 6, dtype=torch.bool)
    scored[0, :2] = False
    batch = lm_batch(blocks, scored)
    assert batch["labels"][0, :2].tolist() == [-100, -100] and torch.equal(batch["labels"][1], blocks[1])
    assert torch.equal(lm_batch(blocks)["labels"], blocks)
