"""Weight initialisation of dsmoe's MoE modules inside transformers models (``PreTrainedModel._init_weights``)."""
from __future__ import annotations

from torch import nn
from transformers import initialization as init

from dsmoe.moe.experts import GroupedExperts
from dsmoe.moe.router import Router


def init_moe_module(module: nn.Module, std: float) -> bool:
    """Initialise a router (normal weights, zero bias, expert bias and load counts) or stacked experts (normal
    weights); returns whether ``module`` was one of them."""
    if isinstance(module, Router):
        init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
        init.zeros_(module.expert_bias)
        init.zeros_(module.load_accum)
        return True
    if isinstance(module, GroupedExperts):
        init.normal_(module.w_in, mean=0.0, std=std)
        init.normal_(module.w_out, mean=0.0, std=std)
        return True
    return False
