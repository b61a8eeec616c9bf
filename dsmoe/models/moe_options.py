"""The one table of RoutedLM's MoE options: each ``RoutedLMConfig`` field and the ``MoEConfig`` field it sets.

It drives the three places that need the correspondence: ``RoutedLMConfig.moe_config()`` (RoutedLM -> layer),
the import of transformers MoE blocks (``interop.from_hf``: layer -> RoutedLM) and error messages (an error
raised by ``MoEConfig`` names the RoutedLM option the user wrote). Options are validated once, by ``MoEConfig``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MoEOption:
    ours: str
    """The RoutedLMConfig field (what users write in a config or YAML)."""
    layer: str
    """The MoEConfig field it sets."""
    to_layer: Callable[[Any], Any] | None = None
    """RoutedLMConfig -> MoEConfig value, given the whole config; None = copy the field's value."""
    from_layer: Callable[[Any], Any] | None = None
    """MoEConfig value -> RoutedLMConfig value; None = copy."""
    imported: bool = True
    """Whether ``from_hf`` sets this RoutedLM field from an imported layer (sizes of the trunk and
    training-time settings are not)."""

    def layer_value(self, config) -> Any:
        return self.to_layer(config) if self.to_layer is not None else getattr(config, self.ours)

    def our_value(self, layer_value: Any) -> Any:
        return self.from_layer(layer_value) if self.from_layer is not None else layer_value


def _eval_capacity(config) -> float | None:
    # eval_dropless: evaluation without capacity drops whatever the training capacity (inf = dropless)
    return math.inf if config.eval_dropless and config.expert_capacity_factor is not None else None


MOE_OPTIONS: tuple[MoEOption, ...] = (
    MoEOption("hidden_size", "hidden_size", imported=False),
    MoEOption("moe_intermediate_size", "expert_hidden_size"),
    MoEOption("n_routed_experts", "num_experts"),
    MoEOption("num_experts_per_tok", "top_k"),
    MoEOption("n_shared_experts", "num_shared_experts"),
    MoEOption("shared_expert_gate", "shared_expert_gate"),
    MoEOption("use_null_expert", "num_null_experts"),
    MoEOption("expert_capacity_factor", "capacity_factor"),
    MoEOption("eval_dropless", "eval_capacity_factor", to_layer=_eval_capacity, imported=False),
    MoEOption("min_expert_capacity", "min_capacity", imported=False),
    MoEOption("max_expert_capacity", "max_capacity", imported=False),
    MoEOption("scoring_func", "score_func"),
    MoEOption("n_group", "num_groups"),
    MoEOption("topk_group", "topk_groups"),
    MoEOption("norm_topk_prob", "norm_topk_prob"),
    MoEOption("router_scaling_factor", "routed_scaling_factor"),
    MoEOption("router_jitter", "router_jitter"),
    MoEOption("topk_method", "bias_balancing", to_layer=lambda c: c.topk_method == "noaux_tc",
              from_layer=lambda b: "noaux_tc" if b else "greedy"),
    MoEOption("bias_update_rate", "bias_update_rate", imported=False),
    MoEOption("aux_loss_coef", "aux_loss_coef"),
    MoEOption("seq_aux_loss_coef", "seq_aux_loss_coef"),
    MoEOption("z_loss_coef", "z_loss_coef"),
    MoEOption("moe_backend", "backend", imported=False),
    MoEOption("moe_expert_kernel", "expert_kernel", imported=False),
    MoEOption("initializer_range", "init_std", imported=False),
)

BY_LAYER_FIELD = {o.layer: o for o in MOE_OPTIONS}
"""MoEConfig field -> its option."""


def layer_kwargs(config) -> dict[str, Any]:
    """The MoEConfig keyword arguments of a RoutedLMConfig."""
    return {o.layer: o.layer_value(config) for o in MOE_OPTIONS}


def our_name(layer_field: str) -> str:
    """The RoutedLMConfig name of a MoEConfig field (the field itself when RoutedLM does not set it)."""
    opt = BY_LAYER_FIELD.get(layer_field)
    return opt.ours if opt is not None else layer_field


def imported_fields(layer_cfg) -> dict[str, Any]:
    """RoutedLMConfig fields reproducing an imported layer's MoEConfig."""
    return {o.ours: o.our_value(getattr(layer_cfg, o.layer)) for o in MOE_OPTIONS if o.imported}
