"""Checks that N causal LMs can be merged FFN-by-FFN, and the trunk (everything but the FFNs) they share.

Models merge when they have the same architecture (model type, config, layer count, vocabulary) and, unless
averaging is asked for, identical non-FFN weights: FFN-only fine-tunes of one base. The first difference found
is named in a one-line ``ValueError``.
"""
from __future__ import annotations

import re

import torch
from torch import nn

# config keys that do not change the function of a model
_IGNORED_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype",
                        "architectures", "_attn_implementation", "_attn_implementation_autoset", "use_cache",
                        "output_attentions", "output_hidden_states", "return_dict", "_commit_hash"}
# what is compared first, so the most telling mismatch is the one reported
_FIRST_KEYS = ("model_type", "num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (``model.model.layers``: Llama, Mistral, Qwen2/3, OLMo, ...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.layers; the FFN merge supports "
                         f"Llama-style causal LMs (LlamaForCausalLM and its relatives)")
    return layers


def ffn_key_pattern(ffn_name: str = "mlp") -> re.Pattern:
    """Matches the state-dict keys of the per-layer FFNs (``model.layers.<i>.<ffn_name>.``)."""
    return re.compile(rf"^model\.layers\.(\d+)\.{re.escape(ffn_name)}\.")


def check_same_architecture(models: list[nn.Module], names: list[str], ffn_name: str = "mlp") -> None:
    """Raise ValueError naming the first config key where a model differs from the first one."""
    if len(models) != len(names):
        raise ValueError(f"{len(models)} models but {len(names)} names")
    ref = _comparable(models[0].config.to_dict())
    for model, name in zip(models[1:], names[1:]):
        cfg = _comparable(model.config.to_dict())
        keys = list(_FIRST_KEYS) + sorted((set(ref) | set(cfg)) - set(_FIRST_KEYS))
        for key in keys:
            if ref.get(key) != cfg.get(key):
                raise ValueError(f"{name}: {key}={cfg.get(key)!r} but {names[0]} has {key}={ref.get(key)!r}; "
                                 f"merged models must share one architecture (layers, vocabulary, widths)")
    for model, name in zip(models, names):
        for layer in decoder_layers(model):
            if not isinstance(getattr(layer, ffn_name, None), nn.Module):
                raise ValueError(f"{name}: decoder layer {type(layer).__name__} has no FFN module '{ffn_name}'")


def _comparable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in _IGNORED_CONFIG_KEYS}


@torch.no_grad()
def shared_trunk(models: list[nn.Module], names: list[str], allow_different_trunks: bool = False,
                 ffn_name: str = "mlp") -> dict[str, torch.Tensor]:
    """The non-FFN state of the models: the first model's when all are identical, their mean when
    ``allow_different_trunks``; otherwise a ValueError naming the first differing tensor."""
    check_same_architecture(models, names, ffn_name)
    is_ffn = ffn_key_pattern(ffn_name)
    states = [{k: v for k, v in m.state_dict().items() if not is_ffn.match(k)} for m in models]
    ref = states[0]
    for state, name in zip(states[1:], names[1:]):
        if set(state) != set(ref):
            extra = sorted(set(state) ^ set(ref))[0]
            raise ValueError(f"{name}: weight {extra} is in one model but not in {names[0]}; merged models must "
                             f"share one architecture")
        for key, value in ref.items():
            other = state[key]
            if other.shape != value.shape:
                raise ValueError(f"{name}: weight {key} has shape {tuple(other.shape)} but {names[0]}'s has "
                                 f"{tuple(value.shape)}")
            if not allow_different_trunks and not torch.equal(other, value):
                raise ValueError(f"{name}: weight {key} differs from {names[0]}'s, so the models are not FFN-only "
                                 f"fine-tunes of one base; pass allow_different_trunks=True "
                                 f"(--allow_different_trunks) to average the non-FFN weights")
    if not allow_different_trunks or len(states) == 1:
        return dict(ref)
    out = {}
    for key, value in ref.items():
        if value.is_floating_point():
            out[key] = torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
        else:
            out[key] = value.clone()
    return out
