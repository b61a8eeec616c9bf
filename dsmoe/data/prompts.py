"""Temporal conditioning of documents: the prompt variants of the diachronic period experts.

``data.prompt`` puts a short prefix before every document's text:

- ``none`` (the period experts' configuration B): no prefix;
- ``period_token`` (configuration C): one special token naming the document's period, e.g. ``<|1850-1899|>``.
  The tokens of all ``data.prompt_periods`` are added to the tokenizer (so every model trained with this data
  shares one vocabulary) and a pretrained model's embeddings are resized to the grown vocabulary;
- ``year_prefix`` (configuration E): ``data.prompt_template`` with the document's year, by default
  ``"This text was written in the year {year}. "``, tokenized on its own and put before the text.

A prefix is context only: its tokens are never a training target and never count in a perplexity (the packer
marks them; the loaders give them the label -100), and a mixture's gate never reads them, since the prefix
states the answer the gate is asked for.
"""
from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

#: Values of ``data.prompt``.
PROMPTS = ("none", "period_token", "year_prefix")
DEFAULT_TEMPLATE = "This text was written in the year {year}. "


def parse_year_ranges(values: Sequence, key: str) -> list[tuple[int, int]]:
    """``["1790-1849", "1850-1899", ...]`` -> ``[(1790, 1849), ...]``: inclusive, ordered, non-overlapping; a
    ValueError naming ``key[i]`` otherwise."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{key}={values!r}: expected a list of START-END year ranges")
    out: list[tuple[int, int]] = []
    for i, r in enumerate(values):
        parts = str(r).replace(" ", "").split("-")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{key}[{i}]={r!r}: expected START-END years, e.g. 1790-1849")
        start, end = int(parts[0]), int(parts[1])
        if start > end:
            raise ValueError(f"{key}[{i}]={r!r}: starts after it ends")
        if out and start <= out[-1][1]:
            raise ValueError(f"{key}[{i}]={r!r}: overlaps or precedes {out[-1][0]}-{out[-1][1]}; list the ranges "
                             f"in order, without overlap")
        out.append((start, end))
    return out


def period_token(start: int, end: int) -> str:
    """The special token of one period."""
    return f"<|{start}-{end}|>"


class DocumentPrompt:
    """The prefix of each document under one ``data`` configuration (``prompt``, ``prompt_template``,
    ``prompt_periods``); :meth:`prepare` adds the period tokens to a tokenizer, :meth:`ids` gives one
    document's prefix token ids."""

    def __init__(self, kind: str = "none", template: str = DEFAULT_TEMPLATE, periods: Sequence | None = None):
        if kind not in PROMPTS:
            raise ValueError(f"data.prompt={kind!r}: expected one of {PROMPTS}")
        self.kind, self.template = kind, template
        self.periods = parse_year_ranges(periods, "data.prompt_periods") if periods is not None else None
        if kind == "period_token" and not self.periods:
            raise ValueError("data.prompt_periods: data.prompt=period_token needs the periods whose tokens to add, "
                             "e.g. [1790-1849, 1850-1899] (a run with slices.ranges uses the slices)")

    @classmethod
    def of(cls, cfg) -> DocumentPrompt:
        """The prompt of a :class:`DataConfig`."""
        return cls(cfg.prompt, cfg.prompt_template, cfg.prompt_periods)

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def tokens(self) -> list[str]:
        """The special tokens this prompt adds to the vocabulary (none but for ``period_token``)."""
        if self.kind != "period_token":
            return []
        return [period_token(s, e) for s, e in self.periods]

    def prepare(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        """Add the period tokens to ``tokenizer`` (in place; tokens it already has are kept as they are)."""
        new = [t for t in self.tokens() if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_tokens(new, special_tokens=True)
        return tokenizer

    def text(self, year) -> str:
        """The prefix as text, for a document of ``year`` ("" for ``none``)."""
        if self.kind == "none":
            return ""
        if year is None:
            raise ValueError(f"data.prompt={self.kind}: a document has no year; set data.year_field to the year "
                             "column or use data.prompt=none")
        year = int(year)
        if self.kind == "year_prefix":
            return self.template.format(year=year)
        for s, e in self.periods:
            if s <= year <= e:
                return period_token(s, e)
        raise ValueError(f"data.prompt_periods={[f'{s}-{e}' for s, e in self.periods]}: no period holds a document "
                         f"of {year}; widen the periods or filter the years (data.year_min / data.year_max)")

    def ids(self, tokenizer: PreTrainedTokenizerBase, year) -> list[int]:
        """Token ids of the prefix of a document of ``year`` (``[]`` for ``none``)."""
        if self.kind == "none":
            return []
        text = self.text(year)
        if self.kind == "period_token":
            vocab = tokenizer.get_vocab()
            if text not in vocab:
                raise ValueError(f"data.prompt=period_token: the tokenizer has no token {text}; build the data "
                                 "with this prompt so the period tokens are added")
            return [vocab[text]]
        return tokenizer(text, add_special_tokens=False)["input_ids"]
