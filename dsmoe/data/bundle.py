"""``build_data``: source -> documents -> split -> tokenizer -> packed blocks, with caching."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from .cache import resolve_cache_dir, stable_hash, write_dir_atomically
from .config import DataConfig
from .loader import PackedLoader, iter_eval_batches
from .packing import flat_token_stream, pack_blocks, scored_stream, tokenize_documents
from .prompts import DocumentPrompt
from .sources import load_documents, source_fingerprint
from .split import split_documents
from .tokenizer import load_or_build_tokenizer, tokenizer_fingerprint

log = logging.getLogger("dsmoe.data")

#: Bump when the packed format or the packing rules change (invalidates packed caches).
PACK_FORMAT = 2
SPLITS = ("train", "val")


@dataclass
class DataStats:
    """What ``build_data`` produced; per-split dicts are keyed ``"train"``/``"val"``."""

    source: str
    """``data.source``."""
    tokenizer: str
    """``data.tokenizer``."""
    vocab_size: int
    """``len(tokenizer)`` (may be below ``data.vocab_size`` for a BPE trained on little text)."""
    seq_len: int
    """Tokens per block."""
    documents: dict[str, int]
    """Documents per split."""
    tokens: dict[str, int]
    """Tokens per split, EOS separators included, before the incomplete last block is dropped."""
    blocks: dict[str, int]
    """Packed ``seq_len`` blocks per split."""
    years: dict[str, list[int]]
    """Sorted distinct years per split (empty when the source has no year column)."""
    tokenizer_status: str = ""
    """How the tokenizer was obtained this call: "trained", "cache hit" (trained BPE reloaded) or "loaded"."""
    packed_cache_hit: bool = False
    """Whether the packed blocks were reloaded from the cache (the source was then not read at all)."""
    seconds: float = 0.0
    """Wall time of this ``build_data`` call."""
    cache_dir: str = ""
    """Cache root used (tokenizer-*, packed-* and hf_datasets folders)."""

    def year_range(self, split: str | None = None) -> tuple[int, int] | None:
        """(first, last) year of a split (both splits when None), or None without years."""
        ys = sorted({y for s, v in self.years.items() if split in (None, s) for y in v})
        return (ys[0], ys[-1]) if ys else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class DataBundle:
    """Tokenizer and packed train/validation blocks (``[n, seq_len]`` LongTensors) of one ``DataConfig``;
    with a document prompt, ``train_scored``/``val_scored`` (BoolTensors of the same shape) mark the tokens that
    are targets (False on prompt prefixes), else None."""

    config: DataConfig
    tokenizer: PreTrainedTokenizerBase
    train_blocks: torch.Tensor
    val_blocks: torch.Tensor
    stats: DataStats
    train_scored: torch.Tensor | None = None
    val_scored: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        """Size of the embedding the model needs (``len(tokenizer)``)."""
        return len(self.tokenizer)

    def train_loader(
        self,
        micro_batch: int,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int | None = None,
        epochs: int | None = None,
    ) -> PackedLoader:
        """Shuffled, resumable loader over the train blocks; ``seed`` defaults to ``data.seed``."""
        return PackedLoader(
            self.train_blocks,
            micro_batch,
            rank=rank,
            world_size=world_size,
            seed=self.config.seed if seed is None else seed,
            epochs=epochs,
            scored=self.train_scored,
        )

    def val_batches(
        self, batch_size: int, rank: int | None = None, world_size: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """All validation blocks in order, sharded over ranks (same batch count on every rank)."""
        return iter_eval_batches(self.val_blocks, batch_size, rank=rank, world_size=world_size,
                                 scored=self.val_scored)


def build_data(cfg: DataConfig, output_dir: str | os.PathLike[str] | None = None) -> DataBundle:
    """Load, filter, split, tokenize and pack ``cfg``'s source, reusing cached results.

    The BPE tokenizer is cached under a key of (source, filters, cuts, split seed/fraction,
    vocab size) and the packed tensors under that key plus the tokenizer's content hash and
    ``seq_len``; a fully cached call does not read the source at all. Cache writes are atomic,
    so concurrent ranks may call this at the same time.
    """
    t0 = time.perf_counter()
    cache_root = resolve_cache_dir(cfg, output_dir)
    docs_key = stable_hash(
        {
            "source": source_fingerprint(cfg),
            **{
                k: getattr(cfg, k)
                for k in (
                    "text_field", "year_field", "year_min", "year_max", "id_field", "split",
                    "txt_sample_by", "max_documents", "max_chars_per_doc", "val_fraction", "seed",
                )
            },
        }
    )
    split_docs: dict[str, datasets.Dataset] = {}

    def documents() -> dict[str, datasets.Dataset]:
        if not split_docs:
            docs = load_documents(cfg, cache_root / "hf_datasets")
            train_idx, val_idx = split_documents(list(docs["doc_id"]), cfg.val_fraction, cfg.seed)
            split_docs.update(train=docs.select(train_idx), val=docs.select(val_idx))
        return split_docs

    def train_texts() -> Iterator[list[str]]:
        train = documents()["train"]
        for start in range(0, len(train), 64):
            yield list(train[start : start + 64]["text"])

    tok_key = stable_hash({"docs": docs_key, "vocab_size": cfg.vocab_size})
    tokenizer, tok_status = load_or_build_tokenizer(cfg, cache_root, tok_key, train_texts)
    prompt = DocumentPrompt.of(cfg)
    prompt.prepare(tokenizer)
    tok_id = tokenizer_fingerprint(tokenizer)
    pack_key = {"docs": docs_key, "tok": tok_id, "seq_len": cfg.seq_len, "format": PACK_FORMAT}
    if prompt.enabled:
        pack_key["prompt"] = [cfg.prompt, cfg.prompt_template, cfg.prompt_periods]
    pack_id = stable_hash(pack_key)
    packed_dir = cache_root / f"packed-{pack_id}"

    cached = _load_packed(packed_dir)
    if cached is not None:
        blocks, stats = cached
        stats.packed_cache_hit = True
    else:
        blocks, stats = _pack(cfg, documents(), tokenizer, prompt, f"{docs_key}-{pack_id}")
        _save_packed(packed_dir, blocks, stats, cfg)
    stats.tokenizer_status = tok_status
    stats.cache_dir = str(cache_root)
    stats.seconds = round(time.perf_counter() - t0, 3)
    _log_summary(stats)
    return DataBundle(cfg, tokenizer, blocks["train"], blocks["val"], stats,
                      blocks.get("train_scored"), blocks.get("val_scored"))


def _pack(
    cfg: DataConfig, docs: dict[str, datasets.Dataset], tokenizer: PreTrainedTokenizerBase, prompt: DocumentPrompt,
    key: str,
) -> tuple[dict[str, torch.Tensor], DataStats]:
    blocks: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    for split in SPLITS:
        tokenized = tokenize_documents(docs[split], tokenizer, fingerprint=f"dsmoe-tok-{key}-{split}", prompt=prompt)
        stream = flat_token_stream(tokenized)
        tokens[split] = stream.numel()
        blocks[split] = pack_blocks(stream, cfg.seq_len)
        scored = scored_stream(tokenized)
        if scored is not None:
            blocks[f"{split}_scored"] = pack_blocks(scored, cfg.seq_len)
        if len(blocks[split]) == 0:
            raise ValueError(
                f"the {split} split has {tokens[split]} tokens, less than one block of data.seq_len={cfg.seq_len}; "
                "lower data.seq_len, raise data.val_fraction/data.max_documents/data.max_chars_per_doc, or use more data"
            )
    stats = DataStats(
        source=cfg.source,
        tokenizer=cfg.tokenizer,
        vocab_size=len(tokenizer),
        seq_len=cfg.seq_len,
        documents={s: len(docs[s]) for s in SPLITS},
        tokens=tokens,
        blocks={s: len(blocks[s]) for s in SPLITS},
        years={
            s: sorted({int(y) for y in docs[s]["year"] if y is not None}) if "year" in docs[s].column_names else []
            for s in SPLITS
        },
    )
    return blocks, stats


def _load_packed(folder: Path) -> tuple[dict[str, torch.Tensor], DataStats] | None:
    files = [folder / "blocks.safetensors", folder / "stats.json"]
    if not all(f.is_file() for f in files):
        return None
    known = set(DataStats.__dataclass_fields__)
    try:
        stats = DataStats(**{k: v for k, v in json.loads((folder / "stats.json").read_text()).items() if k in known})
    except (TypeError, ValueError):  # written by an incompatible version: rebuild
        return None
    try:
        loaded = load_file(str(folder / "blocks.safetensors"))
        blocks = {s: loaded[s] for s in SPLITS}
        blocks.update({f"{s}_scored": loaded[f"{s}_scored"] for s in SPLITS if f"{s}_scored" in loaded})
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
        return None
    return blocks, stats


def _save_packed(folder: Path, blocks: dict[str, torch.Tensor], stats: DataStats, cfg: DataConfig) -> None:
    def fill(tmp: Path) -> None:
        save_file({s: b.contiguous() for s, b in blocks.items()}, str(tmp / "blocks.safetensors"))
        (tmp / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1))
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))  # for humans browsing the cache

    write_dir_atomically(folder, fill)


def _log_summary(stats: DataStats) -> None:
    span = stats.year_range()
    years = "" if span is None else f", years {span[0]}-{span[1]}"
    log.info(
        "data %s: %d/%d train/val docs, %d/%d tokens -> %d/%d blocks of %d%s; tokenizer %s (%d tokens, %s), "
        "packed %s; %.1fs, cache %s",
        stats.source, stats.documents["train"], stats.documents["val"], stats.tokens["train"], stats.tokens["val"],
        stats.blocks["train"], stats.blocks["val"], stats.seq_len, years, stats.tokenizer, stats.vocab_size,
        stats.tokenizer_status, "cache hit" if stats.packed_cache_hit else "built",
        stats.seconds, stats.cache_dir,
    )
