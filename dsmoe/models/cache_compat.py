"""Where transformers carries the KV cache, for the transformers 5.x releases dsmoe supports.

transformers 5.24 renamed the cache everywhere: model outputs have a ``cache`` field (``past_key_values``
became a deprecated alias that warns), ``generate`` passes ``cache=`` to ``forward``, and the mask helpers
(``create_causal_mask`` ...) take ``cache=``. Releases 5.0-5.23 use ``past_key_values`` in all three places.
This module is the one place that knows which release is installed; dsmoe's models go through it:

* :data:`CACHE_NAME` - the name the installed release uses ("cache" or "past_key_values");
* :func:`model_output` - a ``ModelOutput`` dataclass whose cache field has that name (so ``generate`` finds
  it and nothing warns);
* :func:`pick_cache` - the cache a ``forward`` was given, under either name;
* :func:`cache_kwargs` - ``{CACHE_NAME: cache}`` for the mask helpers and for building outputs.

Drop the ``past_key_values`` branch once the supported range starts at 5.24.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from transformers.generation import utils as _generation_utils
from transformers.utils import ModelOutput

CACHE_NAME = "cache" if "cache" in _generation_utils.ALL_CACHE_NAMES else "past_key_values"
"""The KV-cache name of the installed transformers: "cache" (5.24+) or "past_key_values" (5.0-5.23)."""


def model_output(name: str, fields: list[tuple[str, Any]], doc: str, module: str) -> type[ModelOutput]:
    """A ``ModelOutput`` dataclass named ``name`` with ``fields`` [(name, type)] in order, every one defaulting
    to None; the field called "cache" is renamed to :data:`CACHE_NAME`."""
    spec = [(CACHE_NAME if f == "cache" else f, t, dataclasses.field(default=None)) for f, t in fields]
    cls = dataclasses.make_dataclass(name, spec, bases=(ModelOutput,), namespace={"__doc__": doc})
    cls.__module__ = module
    return cls


def pick_cache(cache=None, past_key_values=None):
    """The cache passed to a ``forward`` as ``cache=`` (5.24+) or ``past_key_values=`` (older callers)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as cache= (or past_key_values= for transformers < 5.24)")
    return cache if cache is not None else past_key_values


def cache_kwargs(cache) -> dict[str, Any]:
    """``{CACHE_NAME: cache}``: the keyword the installed transformers expects for a cache."""
    return {CACHE_NAME: cache}


def output_cache(output: ModelOutput):
    """The cache field of a model output (whatever the installed release calls it)."""
    return output.get(CACHE_NAME)
