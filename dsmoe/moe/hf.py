"""Conversion between :class:`dsmoe.moe.MoELayer` and the MoE blocks of Hugging Face transformers (>= 5).

Supported blocks (transformers 5 stores the routed experts fused as ``experts.gate_up_proj`` (E, 2F, H), rows
[gate; up], and ``experts.down_proj`` (E, H, F), both applied as ``F.linear``):

========================  ============  ==========================================================================
block                     model_type    routing
========================  ============  ==========================================================================
MixtralSparseMoeBlock     mixtral       softmax (fp32) -> top-k -> always renormalised
Qwen2MoeSparseMoeBlock    qwen2_moe     softmax (fp32) -> top-k -> renormalised iff norm_topk_prob;
                                        + shared expert scaled by sigmoid(shared_expert_gate(x))
Qwen3MoeSparseMoeBlock    qwen3_moe     softmax (fp32) -> top-k -> renormalised iff norm_topk_prob
DeepseekV3MoE             deepseek_v3   sigmoid (fp32); selection on scores + e_score_correction_bias, limited to
                                        the best topk_group of n_group groups (group score = sum of the top-2,
                                        other groups masked with -inf); weights gathered from the unbiased
                                        scores, renormalised iff norm_topk_prob (+1e-20), times
                                        routed_scaling_factor; + ungated shared experts (n_shared * moe_inter)
OlmoeSparseMoeBlock       olmoe         softmax (fp32) -> top-k -> renormalised iff norm_topk_prob
========================  ============  ==========================================================================

Mapping onto :class:`MoEConfig`: ``router.weight`` <- ``gate.weight``; ``experts.w_in`` (E, H, 2F) [gate | up]
<- ``gate_up_proj.transpose(1, 2)``; ``experts.w_out`` (E, F, H) <- ``down_proj.transpose(1, 2)``; the shared
MLP's ``gate_proj/up_proj/down_proj`` are copied as is and Qwen2-MoE's ``shared_expert_gate`` becomes
``shared_experts.gate``; DeepSeek-V3's ``e_score_correction_bias`` becomes ``router.expert_bias`` with
``bias_balancing=True`` (the bias is then updated by dsmoe's aux-loss-free balancing during training).

The layer built is dropless (``capacity_factor=None``), has no null experts and no router bias, keeps the HF
tensors' dtype and device, and enables no auxiliary loss (HF computes its balance loss across layers in the
CausalLM wrapper; set ``aux_loss_coef`` etc. on the config yourself if you want one). Mixtral's
``router_jitter_noise`` maps to ``router_jitter`` (training only; HF also jitters the experts' input, dsmoe
only the router's).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import MoEConfig

# block class name -> family; model_type -> family
_BLOCKS = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "DeepseekV3MoE": "deepseek_v3",
    "OlmoeSparseMoeBlock": "olmoe",
}
_MODEL_TYPES = {family: family for family in _BLOCKS.values()}
_SILU = ("silu", "swish")


def _supported() -> str:
    return ", ".join(f"{name} ({family})" for name, family in _BLOCKS.items())


def detect_family(block: nn.Module, hf_config=None) -> str:
    """Family of a transformers MoE block: from its class (or a base class) name, else from
    ``hf_config.model_type`` when the block has the fused-experts structure. Raises ValueError otherwise."""
    for klass in type(block).__mro__:
        if klass.__name__ in _BLOCKS:
            return _BLOCKS[klass.__name__]
    cfg = hf_config if hf_config is not None else getattr(block, "config", None)
    model_type = getattr(cfg, "model_type", None)
    experts = getattr(block, "experts", None)
    if (model_type in _MODEL_TYPES and hasattr(getattr(block, "gate", None), "weight")
            and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")):
        return _MODEL_TYPES[model_type]
    raise ValueError(f"unsupported MoE block {type(block).__name__} (model_type={model_type!r}); "
                     f"supported blocks: {_supported()}")


def _get(block_attr_owner: Any, attr: str, hf_config, cfg_attr: str | None, default: Any) -> Any:
    """Read a routing setting from the HF module first (it is what forward uses), then from the config."""
    if block_attr_owner is not None and getattr(block_attr_owner, attr, None) is not None:
        return getattr(block_attr_owner, attr)
    if hf_config is not None and cfg_attr is not None and getattr(hf_config, cfg_attr, None) is not None:
        return getattr(hf_config, cfg_attr)
    return default


def _check_act(block: nn.Module, hf_config, family: str) -> None:
    act = getattr(hf_config, "hidden_act", None) if hf_config is not None else None
    if act is None:
        act = getattr(getattr(block, "config", None), "hidden_act", None)
    if act is not None:
        if act not in _SILU:
            raise ValueError(f"{type(block).__name__}: hidden_act={act!r} is not supported; dsmoe's experts are "
                             f"SwiGLU, i.e. hidden_act must be one of {_SILU}")
        return
    fn = getattr(getattr(block, "experts", None), "act_fn", None)
    if fn is not None and not (isinstance(fn, nn.SiLU) or "SiLU" in type(fn).__name__):
        raise ValueError(f"{type(block).__name__}: expert activation {type(fn).__name__} is not supported; "
                         f"dsmoe's experts are SwiGLU (silu)")


def _experts(block: nn.Module) -> nn.Module:
    experts = getattr(block, "experts", None)
    if not (hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")):
        raise ValueError(f"{type(block).__name__}: expected fused experts with gate_up_proj (E, 2F, H) and "
                         f"down_proj (E, H, F) (transformers >= 5 layout), got {type(experts).__name__}")
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True) \
            or getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise ValueError(f"{type(block).__name__}: only concatenated, non-transposed, bias-free gated experts "
                         f"are supported")
    gu, down = experts.gate_up_proj, experts.down_proj
    e, f2, h = gu.shape
    if f2 % 2 or tuple(down.shape) != (e, h, f2 // 2):
        raise ValueError(f"{type(block).__name__}: inconsistent expert shapes gate_up_proj {tuple(gu.shape)}, "
                         f"down_proj {tuple(down.shape)}")
    return experts


def _shared(block: nn.Module, family: str) -> tuple[nn.Module | None, nn.Module | None]:
    """(shared MLP, its sigmoid gate) of the block, (None, None) for families without shared experts."""
    if family == "qwen2_moe":
        return block.shared_expert, block.shared_expert_gate
    if family == "deepseek_v3":
        return block.shared_experts, None
    return None, None


def _spec(block: nn.Module, hf_config, family: str) -> dict:
    """MoEConfig fields (other than the sizes of the routed experts) that reproduce the block's forward."""
    gate = block.gate
    top_k = _get(gate, "top_k", hf_config, "num_experts_per_tok", None)
    if top_k is None:
        top_k = _get(block, "top_k", hf_config, None, None)
    if top_k is None:
        raise ValueError(f"{type(block).__name__}: cannot find top_k (num_experts_per_tok)")
    spec: dict = {"top_k": int(top_k), "score_func": "softmax", "norm_topk_prob": True,
                  "routed_scaling_factor": 1.0, "num_groups": 1, "topk_groups": 1, "group_score": "top2_sum",
                  "bias_balancing": False, "router_jitter": 0.0}
    if family == "mixtral":
        spec["router_jitter"] = float(_get(block, "jitter_noise", hf_config, "router_jitter_noise", 0.0))
    elif family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        spec["norm_topk_prob"] = bool(_get(gate, "norm_topk_prob", hf_config, "norm_topk_prob", False))
    elif family == "deepseek_v3":
        spec.update(score_func="sigmoid", bias_balancing=True, group_score="top2_sum",
                    norm_topk_prob=bool(_get(gate, "norm_topk_prob", hf_config, "norm_topk_prob", True)),
                    routed_scaling_factor=float(_get(gate, "routed_scaling_factor", hf_config,
                                                     "routed_scaling_factor", 1.0)),
                    num_groups=int(_get(gate, "num_group", hf_config, "n_group", 1)),
                    topk_groups=int(_get(gate, "topk_group", hf_config, "topk_group", 1)))
    mlp, mlp_gate = _shared(block, family)
    f_shared = mlp.gate_proj.out_features if mlp is not None else 0
    if f_shared > 0:
        n_shared = 1
        if family == "deepseek_v3":
            n_shared = int(_get(hf_config, "n_shared_experts", None, None, 1) or 1)
        spec.update(num_shared_experts=n_shared, shared_expert_hidden_size=f_shared,
                    shared_expert_gate=mlp_gate is not None)
    else:
        spec.update(num_shared_experts=0, shared_expert_hidden_size=None, shared_expert_gate=False)
    return spec


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def layer_from_hf(cls, block: nn.Module, hf_config):
    """Build ``cls(cfg)`` (a dropless :class:`MoELayer`) holding the weights of a transformers MoE block.

    Parameters keep the block's dtype and device; the result's forward (eval) equals the block's forward.
    """
    family = detect_family(block, hf_config)
    _check_act(block, hf_config, family)
    experts = _experts(block)
    e, f2, h = experts.gate_up_proj.shape
    router_w = block.gate.weight
    if tuple(router_w.shape) != (e, h):
        raise ValueError(f"{type(block).__name__}: router weight {tuple(router_w.shape)} != (E={e}, H={h})")
    if getattr(block.gate, "bias", None) is not None:
        raise ValueError(f"{type(block).__name__}: a router bias is not expected for family {family}")
    spec = _spec(block, hf_config, family)
    init_std = float(getattr(hf_config, "initializer_range", 0.02) or 0.02)
    cfg = MoEConfig(hidden_size=h, expert_hidden_size=f2 // 2, num_experts=e, capacity_factor=None,
                    eval_capacity_factor=None, activation="swiglu", backend="dsmoe", init_std=init_std, **spec)
    device = experts.gate_up_proj.device
    if device.type == "meta":
        raise ValueError(f"{type(block).__name__}: the block's weights are on the meta device; load them first")
    with torch.device(device):
        layer = cls(cfg)
    with torch.no_grad():
        layer.router.weight = _param(router_w, layer.router.weight)
        layer.experts.w_in = _param(experts.gate_up_proj.transpose(1, 2), layer.experts.w_in)
        layer.experts.w_out = _param(experts.down_proj.transpose(1, 2), layer.experts.w_out)
        if family == "deepseek_v3":
            layer.router.expert_bias.copy_(block.gate.e_score_correction_bias.detach().float())
        mlp, mlp_gate = _shared(block, family)
        if layer.shared_experts is not None:
            se = layer.shared_experts
            for name in ("gate_proj", "up_proj", "down_proj"):
                src = getattr(mlp, name)
                if getattr(src, "bias", None) is not None:
                    raise ValueError(f"{type(block).__name__}: shared expert {name} has a bias; not supported")
                getattr(se, name).weight = _param(src.weight, getattr(se, name).weight)
            if mlp_gate is not None:
                if getattr(mlp_gate, "bias", None) is not None:
                    raise ValueError(f"{type(block).__name__}: shared_expert_gate has a bias; not supported")
                se.gate.weight = _param(mlp_gate.weight, se.gate.weight)
    layer.train(block.training)
    return layer


def layer_to_hf(layer, block: nn.Module) -> nn.Module:
    """Copy a full (unsharded) layer's weights into a transformers MoE block of the matching family.

    The block keeps its dtype and device. Raises ValueError when the layer is expert-parallel sharded or its
    configuration cannot be represented by the block (routing settings, sizes, null experts, router bias,
    shared experts or their gate, a non-zero expert bias on a family without one).
    """
    cfg: MoEConfig = layer.cfg
    if layer.experts.w_in.shape[0] != cfg.num_experts:
        raise ValueError(f"layer_to_hf: the layer is expert-parallel sharded (holds {layer.experts.w_in.shape[0]} "
                         f"of {cfg.num_experts} experts); gather the full experts onto one rank "
                         f"(or build an unsharded layer from a full state dict) before converting")
    family = detect_family(block)
    name = type(block).__name__
    _check_act(block, getattr(block, "config", None), family)
    if cfg.activation != "swiglu":
        raise ValueError(f"layer_to_hf: activation={cfg.activation!r}; {name} needs swiglu experts")
    if cfg.num_null_experts:
        raise ValueError(f"layer_to_hf: {name} cannot represent num_null_experts={cfg.num_null_experts}")
    if layer.router.bias is not None and bool(layer.router.bias.detach().ne(0).any()):
        raise ValueError(f"layer_to_hf: {name} has no router bias; the layer's router bias is non-zero")
    if cfg.random_routing:
        raise ValueError(f"layer_to_hf: {name} cannot represent random_routing=True")
    experts = _experts(block)
    e, f2, h = experts.gate_up_proj.shape
    if (e, f2 // 2, h) != (cfg.num_experts, cfg.expert_hidden_size, cfg.hidden_size):
        raise ValueError(f"layer_to_hf: size mismatch: {name} has E={e}, F={f2 // 2}, H={h}; the layer has "
                         f"E={cfg.num_experts}, F={cfg.expert_hidden_size}, H={cfg.hidden_size}")
    spec = _spec(block, getattr(block, "config", None), family)
    for key in ("top_k", "score_func", "norm_topk_prob", "routed_scaling_factor", "num_groups", "topk_groups"):
        ours, theirs = getattr(cfg, key), spec[key]
        if ours != theirs and not (isinstance(ours, float) and abs(ours - theirs) <= 1e-12 * max(1.0, abs(theirs))):
            raise ValueError(f"layer_to_hf: routing mismatch: layer {key}={ours!r} but {name} uses {theirs!r}")
    if spec["num_groups"] > 1 and cfg.group_score != spec["group_score"]:
        raise ValueError(f"layer_to_hf: routing mismatch: layer group_score={cfg.group_score!r} but {name} uses "
                         f"{spec['group_score']!r}")
    mlp, mlp_gate = _shared(block, family)
    f_shared = mlp.gate_proj.out_features if mlp is not None else 0
    if cfg.shared_hidden != f_shared:
        raise ValueError(f"layer_to_hf: shared expert width mismatch: layer {cfg.shared_hidden}, {name} {f_shared}")
    if f_shared and (layer.shared_experts.gate is not None) != (mlp_gate is not None):
        raise ValueError(f"layer_to_hf: shared_expert_gate={cfg.shared_expert_gate} but {name} "
                         f"{'has' if mlp_gate is not None else 'has no'} shared expert gate")
    has_bias = family == "deepseek_v3"
    if not has_bias and cfg.bias_balancing and bool(layer.router.expert_bias.ne(0).any()):
        raise ValueError(f"layer_to_hf: {name} has no expert score-correction bias; the layer's expert_bias is "
                         f"non-zero (bias_balancing=True)")

    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        experts.gate_up_proj.copy_(layer.experts.w_in.transpose(1, 2))
        experts.down_proj.copy_(layer.experts.w_out.transpose(1, 2))
        if has_bias:
            bias = layer.router.expert_bias if cfg.bias_balancing else torch.zeros_like(layer.router.expert_bias)
            block.gate.e_score_correction_bias.copy_(bias)
        if f_shared:
            se = layer.shared_experts
            for proj in ("gate_proj", "up_proj", "down_proj"):
                getattr(mlp, proj).weight.copy_(getattr(se, proj).weight)
            if mlp_gate is not None:
                mlp_gate.weight.copy_(se.gate.weight)
    return block
