"""The original FFN-merge API's names over :mod:`dsmoe.mixtures`: ``MoEModel`` and ``MoEInference``.

``MoEModel`` is :class:`dsmoe.mixtures.FFNMergeForCausalLM` itself. ``MoEInference`` wraps
:class:`dsmoe.mixtures.merge_inference.FFNMergeInference` and returns the original dictionaries:
``generate(...) -> {"text": ..., "gating_probs": {"model1_prob": p1, "model2_prob": p2, ...}}`` and
``get_gating_probs(text) -> {"model1_prob": ..., ...}``. Models are given as ``model1_path``, ``model2_path``, ...
(any number) or as the list ``model_paths``; ``routing_mode`` None keeps a saved merge's mode (weighted_sum for
components). An option dsmoe does not implement raises ``TypeError``.
"""
from __future__ import annotations

import re

from dsmoe.mixtures.ffn_merge import FFNMergeForCausalLM
from dsmoe.mixtures.merge_inference import FFNMergeInference

MoEModel = FFNMergeForCausalLM

_MODEL_PATH = re.compile(r"model(\d+)_path")


def _keyed(probs: list[float]) -> dict[str, float]:
    return {f"model{i + 1}_prob": float(p) for i, p in enumerate(probs)}


class MoEInference:
    """Text generation with an FFN merge (see the module doc)."""

    def __init__(self, saved_model_path=None, gating_model_path=None, base_model_path=None,
                 routing_mode=None, model_paths=None, **model_n_paths):
        numbered = {}
        for key, value in model_n_paths.items():
            m = _MODEL_PATH.fullmatch(key)
            if m is None:
                raise TypeError(f"MoEInference: option {key!r} is not supported by dsmoe")
            if value is not None:
                numbered[int(m.group(1))] = value
        if numbered and model_paths:
            raise TypeError("MoEInference: give model1_path, model2_path, ... or model_paths, not both")
        if numbered and sorted(numbered) != list(range(1, len(numbered) + 1)):
            raise TypeError(f"MoEInference: model paths must be numbered 1..N (got {sorted(numbered)})")
        paths = model_paths or [numbered[i] for i in sorted(numbered)]
        self._merge = FFNMergeInference.load(
            saved_model_path=saved_model_path, model_paths=paths or None, gating_model_path=gating_model_path,
            base_model_path=base_model_path, routing_mode=routing_mode)
        self.model = self._merge.model
        self.tokenizer = self._merge.tokenizer

    def generate(self, prompt, max_new_tokens=50, temperature=0.7, top_p=0.9, do_sample=True) -> dict:
        """{"text": the continuation, "gating_probs": {"model1_prob": ..., ...}}."""
        out = self._merge.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   do_sample=do_sample)
        return {"text": out.text, "gating_probs": _keyed(out.gating_probs)}

    def get_gating_probs(self, text) -> dict:
        """{"model1_prob": ..., "model2_prob": ..., ...} for ``text``."""
        return _keyed(self._merge.gating_probs(text))
