"""RoutedLM <-> transformers: ``from_hf``, ``to_hf`` and ``upcycle``.

Supported transformers causal LMs (both directions, same logits in fp32):

=============  ===============================================================================================
llama          dense; no QK-norm, no sliding window (``mlp_bias=False``)
mixtral        every layer MoE; softmax top-k, always renormalised; optional sliding window
qwen3_moe      per-head QK RMSNorm; MoE layers per ``mlp_only_layers`` / ``decoder_sparse_step`` (the others use
               the dense ``intermediate_size`` MLP); optional sliding window (all layers)
olmoe          every layer MoE; RMSNorm over the whole q and k projections; optional ``clip_qkv``
=============  ===============================================================================================

Attention, embeddings and norms are copied by name (RoutedLM uses Llama's parameter names); MoE blocks go
through :meth:`dsmoe.moe.MoELayer.from_hf` / ``to_hf``. RoPE must be the default kind (no scaling) and the
activation SiLU. DeepSeek-V3 (multi-head latent attention) converts at the MoE-layer level only.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dsmoe.moe import MoELayer

from .configuration_routed_lm import RoutedLMConfig
from .moe_options import BY_LAYER_FIELD, imported_fields

FAMILIES = ("llama", "mixtral", "qwen3_moe", "olmoe")
_MODEL_STATE = ("model.moe_step", "model.router_reset_done")    # RoutedLM-only buffers


# ---------------------------------------------------------------------------------------------- helpers
def _hf_classes(family: str):
    """(config class, causal LM class) of a supported transformers family."""
    import transformers as t
    return {"llama": (t.LlamaConfig, t.LlamaForCausalLM), "mixtral": (t.MixtralConfig, t.MixtralForCausalLM),
            "qwen3_moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM),
            "olmoe": (t.OlmoeConfig, t.OlmoeForCausalLM)}[family]


def _is_moe_key(key: str, moe_layers) -> bool:
    return any(key.startswith(f"model.layers.{i}.mlp.") for i in moe_layers)


def _load_non_moe(dst: nn.Module, state: dict, moe_layers, allowed_missing, what: str) -> None:
    """Load every non-MoE tensor of ``state`` into ``dst``; anything else not lining up is an error."""
    state = {k: v for k, v in state.items() if not _is_moe_key(k, moe_layers) and k not in _MODEL_STATE}
    missing, unexpected = dst.load_state_dict(state, strict=False)
    missing = [k for k in missing
               if not _is_moe_key(k, moe_layers) and k not in allowed_missing and k not in _MODEL_STATE]
    if missing or unexpected:
        raise ValueError(f"{what}: the weights do not line up (missing {missing}, unexpected {unexpected})")


def _check_fields(kwargs: dict, what: str) -> None:
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(RoutedLMConfig)})
    if unknown:
        raise ValueError(f"{what}: unknown RoutedLMConfig field(s) {unknown}")


def _like(model: nn.Module) -> dict:
    p = next(model.parameters())
    return {"device": p.device, "dtype": p.dtype}


# ---------------------------------------------------------------------------------------------- from_hf
def _rope_theta(hf) -> float:
    rope = getattr(hf, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"from_hf: rope_type={kind!r} (RoPE scaling) is not supported; only default RoPE")
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise ValueError("from_hf: the config has no rope_theta")
    return float(theta)


def _hf_moe_layers(hf, family: str) -> list[int]:
    n = hf.num_hidden_layers
    if family == "llama":
        return []
    if family == "qwen3_moe":
        skip = set(hf.mlp_only_layers or [])
        return [i for i in range(n) if i not in skip and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0]
    return list(range(n))


def _check_same_moe(config: RoutedLMConfig, want, overridden: set, name: str) -> None:
    """The imported blocks' MoEConfig must be what ``config`` builds (apart from what the caller overrode)."""
    ours = config.moe_config().to_dict()
    skip = {"init_std", "expert_kernel", "eval_capacity_factor"} | {
        k for k, o in BY_LAYER_FIELD.items() if o.ours in overridden}
    for key, value in want.to_dict().items():
        if key not in skip and ours[key] != value:
            raise ValueError(f"from_hf: the MoE blocks of {name} need MoEConfig.{key}={value!r}, which "
                             f"RoutedLMConfig cannot express (it gives {ours[key]!r})")


def _new_routed_lm(config: RoutedLMConfig) -> nn.Module:
    """A fresh RoutedLMForCausalLM, through the Auto classes (``import dsmoe`` registered it), so this module
    does not import the model module that calls into it."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_config(config)


def _is_routed_lm(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == RoutedLMConfig.model_type


def from_hf(model: nn.Module, **config_overrides) -> nn.Module:
    """A :class:`RoutedLMForCausalLM` holding the weights of a transformers causal LM (see the module doc).

    ``config_overrides`` are RoutedLMConfig fields set on top of the converted ones (e.g. ``aux_loss_coef``,
    ``expert_capacity_factor`` for training); the logits equal the source model's unless they change the function.
    """
    _check_fields(config_overrides, "from_hf")
    hf = getattr(model, "config", None)
    family = getattr(hf, "model_type", None)
    if family in ("deepseek_v3", "deepseek_v2"):
        raise NotImplementedError(
            f"from_hf: {type(model).__name__} uses multi-head latent attention (MLA), which RoutedLM does not "
            f"implement yet; convert its MoE blocks with dsmoe.moe.MoELayer.from_hf(block, config)")
    if family not in FAMILIES:
        raise ValueError(f"from_hf: unsupported model_type {family!r} ({type(model).__name__}); "
                         f"supported: {', '.join(FAMILIES)}")
    if not (hasattr(model, "lm_head") and hasattr(model, "model")):
        raise ValueError(f"from_hf: expected a *ForCausalLM model, got {type(model).__name__}")
    act = getattr(hf, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"from_hf: hidden_act={act!r} is not supported; RoutedLM's MLPs are SwiGLU (silu)")
    if getattr(hf, "mlp_bias", False):
        raise ValueError("from_hf: mlp_bias=True is not supported; RoutedLM's MLPs have no biases")

    heads = hf.num_attention_heads
    fields = dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers, num_attention_heads=heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        max_position_embeddings=hf.max_position_embeddings, rope_theta=_rope_theta(hf),
        rms_norm_eps=hf.rms_norm_eps, initializer_range=getattr(hf, "initializer_range", 0.02),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf, "attention_bias", False)),
        attention_dropout=float(getattr(hf, "attention_dropout", 0.0)),
        sliding_window=getattr(hf, "sliding_window", None) if family in ("mixtral", "qwen3_moe") else None,
        qk_norm={"qwen3_moe": "per_head", "olmoe": "full"}.get(family),
        clip_qkv=getattr(hf, "clip_qkv", None) if family == "olmoe" else None,
        pad_token_id=getattr(hf, "pad_token_id", None), bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_id=getattr(hf, "eos_token_id", None))
    moe_layers = _hf_moe_layers(hf, family)
    fields["use_moe"] = bool(moe_layers)
    if family == "qwen3_moe":
        fields["moe_layer_indices"] = moe_layers
    probe = None
    if moe_layers:
        probe = MoELayer.from_hf(model.model.layers[moe_layers[0]].mlp, hf)
        fields.update(imported_fields(probe.cfg))
    fields.update(config_overrides)
    config = RoutedLMConfig(**fields)
    if config.moe_layers != moe_layers:
        raise ValueError(f"from_hf: config_overrides change the MoE layers to {config.moe_layers}; the source "
                         f"model has MoE blocks at {moe_layers}")
    if probe is not None:
        _check_same_moe(config, probe.cfg, set(config_overrides), type(model).__name__)

    ours = _new_routed_lm(config).to(**_like(model))
    tied = ("lm_head.weight",) if config.tie_word_embeddings else ()
    _load_non_moe(ours, model.state_dict(), moe_layers, tied, "from_hf")
    for i in moe_layers:
        layer = probe if i == moe_layers[0] else MoELayer.from_hf(model.model.layers[i].mlp, hf)
        ours.model.layers[i].mlp.moe.load_state_dict(layer.state_dict())
    return ours.train(model.training)


# ---------------------------------------------------------------------------------------------- to_hf
def family_problems(model: nn.Module) -> dict[str, list[str]]:
    """For each supported transformers family, why ``model`` cannot be written as it (empty list = it can)."""
    cfg = model.config
    n = cfg.num_hidden_layers
    moe = cfg.moe_layers
    dense = [i for i in range(n) if i not in moe]
    routing = []
    if moe:
        checks = [(cfg.moe_backend != "dsmoe", f"moe_backend={cfg.moe_backend!r} (convert a dsmoe-backend model)"),
                  (cfg.n_shared_experts > 0, f"n_shared_experts={cfg.n_shared_experts}"),
                  (cfg.use_null_expert > 0, f"use_null_expert={cfg.use_null_expert}"),
                  (cfg.learned_token_importance, "learned_token_importance=True"),
                  (cfg.scoring_func != "softmax", f"scoring_func={cfg.scoring_func!r}"),
                  (cfg.n_group > 1, f"n_group={cfg.n_group}"),
                  (cfg.topk_method != "greedy", f"topk_method={cfg.topk_method!r}"),
                  (cfg.router_scaling_factor != 1.0, f"router_scaling_factor={cfg.router_scaling_factor}")]
        routing = [why for bad, why in checks if bad]
        step = int(model.model.moe_step)
        if cfg.moe_warmup_steps and step < cfg.moe_warmup_steps:
            routing.append(f"the model is in its MoE warmup (step {step} of {cfg.moe_warmup_steps}), mixing in "
                           f"the dense warmup path")

    def attn(qk_norm, sliding_ok: bool, clip_ok: bool, bias_ok: bool) -> list[str]:
        out = []
        if cfg.qk_norm != qk_norm:
            out.append(f"qk_norm={cfg.qk_norm!r} (needs {qk_norm!r})")
        if cfg.sliding_window is not None and not sliding_ok:
            out.append(f"sliding_window={cfg.sliding_window}")
        if cfg.clip_qkv is not None and not clip_ok:
            out.append(f"clip_qkv={cfg.clip_qkv}")
        if cfg.attention_bias and not bias_ok:
            out.append("attention_bias=True")
        return out

    all_moe = [f"layers {dense} are dense (needs every layer MoE)"] if dense else []
    return {
        "llama": ([f"layers {moe} are MoE"] if moe else []) + attn(None, False, False, True),
        "mixtral": all_moe + routing + attn(None, True, False, False)
        + ([] if cfg.norm_topk_prob else ["norm_topk_prob=False (Mixtral always renormalises)"]),
        "qwen3_moe": routing + attn("per_head", True, False, True),
        "olmoe": all_moe + routing + attn("full", False, True, True)
        + ([f"head_dim={cfg.head_dim} != hidden_size // num_attention_heads"]
           if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size else []),
    }


def _hf_config(family: str, cfg: RoutedLMConfig):
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        rms_norm_eps=cfg.rms_norm_eps, initializer_range=cfg.initializer_range, hidden_act="silu",
        tie_word_embeddings=cfg.tie_word_embeddings, attention_dropout=cfg.attention_dropout,
        use_cache=cfg.use_cache, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id)
    moe = dict(num_experts_per_tok=cfg.num_experts_per_tok, router_aux_loss_coef=cfg.aux_loss_coef)
    if family == "llama":
        extra = dict(intermediate_size=cfg.intermediate_size, attention_bias=cfg.attention_bias, mlp_bias=False)
    elif family == "mixtral":
        extra = dict(intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.n_routed_experts,
                     sliding_window=cfg.sliding_window, router_jitter_noise=cfg.router_jitter, **moe)
    elif family == "qwen3_moe":
        extra = dict(intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
                     num_experts=cfg.n_routed_experts, norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                     mlp_only_layers=[i for i in range(cfg.num_hidden_layers) if i not in cfg.moe_layers],
                     use_sliding_window=cfg.sliding_window is not None,
                     sliding_window=cfg.sliding_window, attention_bias=cfg.attention_bias, **moe)
    else:
        extra = dict(intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.n_routed_experts,
                     norm_topk_prob=cfg.norm_topk_prob, clip_qkv=cfg.clip_qkv, attention_bias=cfg.attention_bias,
                     **moe)
    return _hf_classes(family)[0](**common, **extra)


def to_hf(model: nn.Module) -> nn.Module:
    """The transformers model (Llama, Mixtral, Qwen3-MoE or OLMoE, first that fits) computing the same logits.

    Capacity limits, aux-loss settings and the warmup schedule are training-time settings and are not exported
    (transformers' MoE blocks are dropless). Raises ValueError listing why each family does not fit otherwise.
    """
    problems = family_problems(model)
    family = next((f for f in FAMILIES if not problems[f]), None)
    if family is None:
        why = "; ".join(f"{f}: {', '.join(p)}" for f, p in problems.items())
        raise ValueError(f"to_hf: no transformers architecture matches this RoutedLM ({why})")
    cfg = model.config
    hf_model = _hf_classes(family)[1](_hf_config(family, cfg)).to(**_like(model))
    tied = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    _load_non_moe(hf_model, model.state_dict(), cfg.moe_layers, tied, f"to_hf ({family})")
    for i in cfg.moe_layers:
        model.model.layers[i].mlp.moe.to_hf(hf_model.model.layers[i].mlp)
    return hf_model.train(model.training)


# ---------------------------------------------------------------------------------------------- upcycle
def upcycle(model: nn.Module, n_routed_experts: int, num_experts_per_tok: int, **moe_kwargs) -> nn.Module:
    """Sparse upcycling: a dense model (transformers Llama or dense RoutedLM) whose MLPs become MoE layers.

    Every routed expert starts as a copy of its layer's MLP (so ``moe_intermediate_size`` is the dense
    ``intermediate_size``), routers are freshly initialised, shared experts (if any) start with a zero
    ``down_proj`` and the warmup path (``moe_warmup_steps``) as a copy of the MLP. With ``norm_topk_prob=True``
    (the default) and no null experts the upcycled model computes the dense model's logits.
    ``moe_kwargs``: any RoutedLMConfig fields (``first_k_dense_layers``, ``expert_capacity_factor``, ...).
    """
    _check_fields(moe_kwargs, "upcycle")
    dense = model if _is_routed_lm(model) else from_hf(model)
    if dense.config.moe_layers:
        raise ValueError(f"upcycle: the model already has MoE layers {dense.config.moe_layers}; pass a dense model")
    f = dense.config.intermediate_size
    if moe_kwargs.get("moe_intermediate_size", f) != f:
        raise ValueError(f"upcycle: moe_intermediate_size={moe_kwargs['moe_intermediate_size']} must equal "
                         f"intermediate_size={f}: every expert starts as a copy of the dense MLP")
    if moe_kwargs.get("moe_backend", "dsmoe") != "dsmoe":
        raise ValueError(f"upcycle: moe_backend={moe_kwargs['moe_backend']!r}; upcycling writes dsmoe's "
                         f"stacked expert weights, use moe_backend='dsmoe'")
    fields = {**dense.config.to_dict(), "use_moe": True, "n_routed_experts": n_routed_experts,
              "num_experts_per_tok": num_experts_per_tok, "moe_intermediate_size": f, **moe_kwargs}
    config = RoutedLMConfig.from_dict(fields)
    ours = _new_routed_lm(config).to(**_like(dense))
    tied = ("lm_head.weight",) if config.tie_word_embeddings else ()
    _load_non_moe(ours, dense.state_dict(), config.moe_layers, tied, "upcycle")
    with torch.no_grad():
        for i in config.moe_layers:
            mlp, ffn = dense.model.layers[i].mlp, ours.model.layers[i].mlp
            w_in = torch.cat([mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()], dim=1)   # (H, 2F) [gate | up]
            ffn.moe.experts.w_in.copy_(w_in.unsqueeze(0).expand_as(ffn.moe.experts.w_in))
            ffn.moe.experts.w_out.copy_(mlp.down_proj.weight.t().unsqueeze(0).expand_as(ffn.moe.experts.w_out))
            if ffn.moe.shared_experts is not None:
                ffn.moe.shared_experts.down_proj.weight.zero_()
            if ffn.warmup_mlp is not None:
                ffn.warmup_mlp.load_state_dict(mlp.state_dict())
    return ours.train(dense.training)
