"""Branch-Train-MiX: N same-architecture Llamas become one RoutedLM whose MoE layers hold their FFNs as experts.

In every layer, routed expert e is model e's FFN (optionally plus the base model's FFN as an always-on shared
expert); attention, embeddings and norms are the models' mean (or the first model's). The routers start from

* ``"gate"``: the class directions of a prompt gate trained on the experts' base model's embeddings (its
  input width must be the models' hidden size): the gradient of each class logit at the mean training
  embedding, unit-normalised, used in every layer;
* ``"hidden"``: per expert, the mean FFN input (post-attention-norm hidden state) of that expert's model over
  prompts of its domain, per layer, unit-normalised (mergekit-moe's ``hidden`` mode, positive prompts only);
* ``"random"``: normal(0, initializer_range).

The result is an ordinary :class:`dsmoe.models.RoutedLMForCausalLM` (fine-tune it like any RoutedLM) and exports
to Mixtral with ``to_hf()`` (without a shared expert) or ``launch/export.py ... --to mixtral``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.models import RoutedLMForCausalLM, from_hf, upcycle

from .ffn_merge import load_causal_lm
from .gating import load_gate
from .merge_checks import check_same_architecture

LLAMA = "a Llama causal LM folder"

ROUTER_INITS = ("gate", "hidden", "random")
TRUNK_MODES = ("average", "first")


def btx_merge(models: list, top_k: int = 2, router_init: str = "random", gating: str | os.PathLike | None = None,
              shared_expert: bool = False, *, base=None, trunk: str = "average",
              prompts: list[list[str]] | None = None, tokenizer=None, **moe_kwargs) -> RoutedLMForCausalLM:
    """A :class:`RoutedLMForCausalLM` with one routed expert per model in every layer (see the module doc).

    ``models``: N >= 1 transformers Llama causal LMs (folders or loaded) of one architecture; ``top_k``: experts
    per token; ``gating``: a gate folder (router_init="gate"); ``shared_expert``: add ``base``'s FFN (the model
    the experts were fine-tuned from) as an always-on shared expert; ``trunk``: "average" or "first";
    ``prompts``: per model, texts of its domain (router_init="hidden"), tokenised with ``tokenizer`` (default:
    the first model folder's); ``moe_kwargs``: further RoutedLMConfig fields (aux_loss_coef, topk_method, ...).
    """
    if router_init not in ROUTER_INITS:
        raise ValueError(f"btx_merge: router_init={router_init!r}; choose one of {ROUTER_INITS}")
    if trunk not in TRUNK_MODES:
        raise ValueError(f"btx_merge: trunk={trunk!r}; choose one of {TRUNK_MODES}")
    if not models:
        raise ValueError("btx_merge: models is empty; give at least one model")
    if not isinstance(top_k, int) or not 1 <= top_k <= len(models):
        raise ValueError(f"btx_merge: top_k={top_k!r} must be in [1, {len(models)}] (the number of models)")
    if shared_expert and base is None:
        raise ValueError("btx_merge: shared_expert=True needs base= (the model the experts were fine-tuned from, "
                         "whose FFN becomes the shared expert)")
    if router_init == "gate" and gating is None:
        raise ValueError("btx_merge: router_init='gate' needs gating= (a gate folder from train_gating)")
    if router_init == "hidden" and (prompts is None or len(prompts) != len(models)):
        raise ValueError(f"btx_merge: router_init='hidden' needs prompts= (one list of texts per model, "
                         f"{len(models)} lists)")
    names = [str(m) if isinstance(m, (str, os.PathLike)) else f"model {i + 1}" for i, m in enumerate(models)]
    hf = [load_causal_lm(m, name, LLAMA) for m, name in zip(models, names)]
    check_same_architecture(hf, names)
    dense = [from_hf(m).eval() for m in hf]                                  # dense RoutedLMs, Llama names
    trunk_model = dense[0]
    if trunk == "average" and len(dense) > 1:
        trunk_model = from_hf(hf[0]).eval()
        with torch.no_grad():
            states = [d.state_dict() for d in dense]
            for key, p in trunk_model.state_dict().items():
                if ".mlp." not in key and p.is_floating_point():
                    p.copy_(torch.stack([s[key].float() for s in states]).mean(0).to(p.dtype))
    extra = {"n_shared_experts": 1} if shared_expert else {}
    base_dense = None
    if shared_expert:
        base_hf = load_causal_lm(base, "base", LLAMA)
        check_same_architecture([hf[0], base_hf], [names[0], "base"])
        base_dense = from_hf(base_hf).eval()
    out = upcycle(trunk_model, n_routed_experts=len(models), num_experts_per_tok=top_k, **extra, **moe_kwargs)
    with torch.no_grad():
        for i, layer in enumerate(out.model.layers):
            if not layer.is_moe:
                continue
            experts = layer.mlp.moe.experts
            for e, d in enumerate(dense):
                mlp = d.model.layers[i].mlp
                experts.w_in[e].copy_(torch.cat([mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()], dim=1))
                experts.w_out[e].copy_(mlp.down_proj.weight.t())
            if base_dense is not None:
                layer.mlp.moe.shared_experts.load_state_dict(base_dense.model.layers[i].mlp.state_dict())
    if router_init == "gate":
        _init_from_gate(out, gating)
    elif router_init == "hidden":
        if tokenizer is None:
            tokenizer = _tokenizer_of(models[0])
        _init_from_hidden(out, dense, prompts, tokenizer)
    return out.eval()


def _routers(model: RoutedLMForCausalLM) -> list[nn.Parameter]:
    return [moe.router.weight for moe in model.moe_layers()]


@torch.no_grad()
def _init_from_gate(model: RoutedLMForCausalLM, gating) -> None:
    g = load_gate(gating)
    h, n = model.config.hidden_size, model.config.n_routed_experts
    if g.gate.input_dim != h:
        raise ValueError(f"gating={str(gating)!r}: the gate reads {g.gate.input_dim}-wide embeddings of "
                         f"{g.base_model} but the models' hidden size is {h}; train the gate on the experts' base "
                         f"model (--base_model) or use router_init='hidden'")
    if g.gate.num_classes != n:
        raise ValueError(f"gating={str(gating)!r}: the gate has {g.gate.num_classes} classes but {n} models were "
                         f"given; train the gate on one dataset per model")
    at = torch.tensor(g.info.get("embedding_mean") or [0.0] * h)
    with torch.enable_grad():
        directions = F.normalize(g.gate.class_directions(at), dim=-1)         # (N, H)
    for w in _routers(model):
        w[:n].copy_(directions.to(w))


@torch.no_grad()
def _init_from_hidden(model: RoutedLMForCausalLM, dense: list[RoutedLMForCausalLM], prompts, tokenizer) -> None:
    if tokenizer is None:
        raise ValueError("btx_merge: router_init='hidden' needs tokenizer= (the models' folders have none)")
    layers = [i for i, layer in enumerate(model.model.layers) if layer.is_moe]
    means = torch.zeros(len(layers), len(dense), model.config.hidden_size)                     # (L, N, H)
    for e, (d, texts) in enumerate(zip(dense, prompts)):
        if not texts:
            raise ValueError(f"btx_merge: prompts[{e}] is empty; give at least one text per model")
        sums = [torch.zeros(model.config.hidden_size) for _ in layers]
        count = 0
        captured: dict[int, torch.Tensor] = {}
        hooks = [d.model.layers[i].post_attention_layernorm.register_forward_hook(
            lambda _m, _inp, y, j=j: captured.__setitem__(j, y)) for j, i in enumerate(layers)]
        try:
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", truncation=True,
                                max_length=min(512, model.config.max_position_embeddings))["input_ids"]
                d(input_ids=ids, use_cache=False)
                for j in range(len(layers)):
                    sums[j] += captured[j][0].float().sum(0)
                count += ids.shape[1]
        finally:
            for hk in hooks:
                hk.remove()
        for j in range(len(layers)):
            means[j, e] = sums[j] / max(count, 1)
    for j, w in enumerate(_routers(model)):
        w[:len(dense)].copy_(F.normalize(means[j], dim=-1).to(w))


def _tokenizer_of(model):
    if not isinstance(model, (str, os.PathLike)):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError):
        return None

