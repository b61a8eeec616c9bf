"""Prompt-in, text-out use of an FFN merge: load it (saved, or from its components), classify a prompt with the
gate, generate with the KV cache; the gate's probabilities come back with the text."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .ffn_merge import FFNMergeForCausalLM


@dataclass
class MergeGeneration:
    """One generation: the continuation (new tokens only) and the gate's probability of each merged model."""

    text: str
    gating_probs: list[float]


class FFNMergeInference:
    """An :class:`FFNMergeForCausalLM` with its tokenizer, for text generation (``launch/moe_inference.py``)."""

    def __init__(self, model: FFNMergeForCausalLM, tokenizer=None):
        self.model = model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if self.tokenizer is None:
            raise ValueError("the merge has no tokenizer; save the models' tokenizer with them (save_pretrained)")

    @classmethod
    def load(cls, saved_model_path: str | os.PathLike | None = None, model_paths: list | None = None,
             gating_model_path: str | os.PathLike | None = None, base_model_path: str | os.PathLike | None = None,
             routing_mode: str | None = None, allow_different_trunks: bool = False) -> "FFNMergeInference":
        """From a saved merge (``saved_model_path``) or from N model folders and a gate folder. ``routing_mode``
        None keeps the saved one (weighted_sum for components); ``base_model_path`` replaces the gate's encoder."""
        if saved_model_path is not None:
            if model_paths:
                raise ValueError("saved_model_path: give either a saved merge or model paths, not both")
            model = FFNMergeForCausalLM.from_pretrained(saved_model_path, dtype=torch.float32)
            if routing_mode is not None:
                model.set_routing_mode(routing_mode)
        else:
            if not model_paths or len(model_paths) < 2:
                raise ValueError("model_paths: give a saved merge (saved_model_path) or at least 2 model folders")
            model = FFNMergeForCausalLM.from_components(model_paths, gating=gating_model_path,
                                                        routing_mode=routing_mode or "weighted_sum",
                                                        allow_different_trunks=allow_different_trunks)
        if base_model_path is not None:
            model.set_gating_encoder(base_model_path)
        return cls(model)

    @torch.no_grad()
    def gating_probs(self, text: str) -> list[float]:
        """The gate's probability of each merged model for ``text``."""
        return self.model.gating_probs_for([text])[0].tolist()

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 50, temperature: float = 0.7, top_p: float = 0.9,
                 do_sample: bool = True) -> MergeGeneration:
        """Continue ``prompt``; the gate classifies the prompt once and mixes the FFNs for every new token."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        enc = self.tokenizer(prompt, return_tensors="pt")
        n = enc["input_ids"].shape[1]
        limit = self.model.config.trunk_config.get("max_position_embeddings")
        if limit is not None and n + max_new_tokens > limit:
            raise ValueError(f"prompt: {n} tokens + max_new_tokens={max_new_tokens} exceed the model's context of "
                             f"{limit} tokens; shorten the prompt or lower max_new_tokens")
        probs = self.model.gating_probs_for([prompt])
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(**enc, gating_probs=probs, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                  **sampling)
        text = self.tokenizer.decode(out[0, n:], skip_special_tokens=True)
        return MergeGeneration(text=text, gating_probs=probs[0].tolist())
