"""MoEStats: what one forward of an MoE layer did (detached, typed)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class MoEStats:
    """Routing statistics of one MoE-layer forward; every tensor is detached.

    Counts are summed over the layer's expert-parallel group. Read fields by name (``stats.dropped_tokens``);
    ``stats["dropped_tokens"]`` also works, for code written against the older dict form.
    """

    tokens_per_expert: torch.Tensor
    """(E,) long: assignments each routed expert computed (after capacity drops; null choices excluded)."""
    dropped_tokens: int = 0
    """Assignments dropped by the capacity limit."""
    null_fraction: float = 0.0
    """Share of all k-choices that went to null experts."""
    capacity: int | None = None
    """Per-expert capacity used (None = dropless)."""
    capacity_factor: float | None = None
    """Capacity factor used by this forward (None = dropless)."""
    routed_per_expert: torch.Tensor | None = None
    """(E,) assignments routed to each expert before dropping (DeepSpeed's ``exp_counts``); None when the
    backend does not report it separately."""
    load_balance_loss: torch.Tensor | None = None
    """Unweighted batch-level balance loss (when ``aux_loss_coef`` > 0)."""
    seq_balance_loss: torch.Tensor | None = None
    """Unweighted sequence-level balance loss (when ``seq_aux_loss_coef`` > 0)."""
    z_loss: torch.Tensor | None = None
    """Unweighted router z-loss (when ``z_loss_coef`` > 0)."""
    entropy_loss: torch.Tensor | None = None
    """Unweighted router entropy (when ``entropy_loss_coef`` > 0)."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def replace(self, **changes) -> "MoEStats":
        return dataclasses.replace(self, **changes)
