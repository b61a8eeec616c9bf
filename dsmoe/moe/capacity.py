"""Expert capacity and the choice of which assignments overflow it."""
from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None,
                    min_capacity: int, max_capacity: int | None) -> int | None:
    """clamp(ceil(cf * tokens * k / E), min, max); None means dropless (no limit)."""
    if capacity_factor is None or math.isinf(capacity_factor):
        return None
    cap = max(math.ceil(capacity_factor * num_tokens * top_k / num_experts), min_capacity)
    return min(cap, max_capacity) if max_capacity is not None else cap


def keep_within_capacity(expert_idx: torch.Tensor, priority: torch.Tensor, num_experts: int,
                         capacity: int) -> torch.Tensor:
    """Bool mask over assignments: per expert, the ``capacity`` ones of highest priority survive.

    Ties keep the earlier assignment (stable sorts), so the result does not depend on the device or rank.
    """
    order = torch.argsort(priority, descending=True, stable=True)
    perm = order[torch.argsort(expert_idx[order], stable=True)]  # sorted by (expert, -priority)
    counts = torch.bincount(expert_idx, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(expert_idx.numel(), device=expert_idx.device) - starts[expert_idx[perm]]
    keep = torch.zeros_like(expert_idx, dtype=torch.bool)
    keep[perm] = rank_in_expert < capacity
    return keep
