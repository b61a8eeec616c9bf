"""Where the experts of a mixture run: all on this process, or spread over the ranks of a process group.

With a group of P ranks, rank r holds experts [r * N/P, (r+1) * N/P) and runs them on the whole batch; the
router is replicated. The only thing that crosses ranks is the experts' outputs, all-gathered into expert order
and then mixed identically on every rank:

* scoring and training with ``combine="logprob"``: the per-token target log-probs, [N_local, B, T] -> [N, B, T];
* a full-vocabulary mixture: the experts' log-probs (or logits for ``combine="logits"``, which is not a mixture
  of distributions and so needs every expert's full vocabulary) at the positions asked for; generation asks for
  the last position only, [N_local, B, 1, V].

The experts are frozen, so what is gathered is a constant and the replicated router gets the same gradient on
every rank with no gradient communication. This is the only file of the mixtures package that talks to
``torch.distributed``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class LocalPlacement:
    """Every expert on this process; the collectives are identities."""

    def __init__(self, num_experts: int):
        self.local_experts = list(range(num_experts))
        self.holds_all = True

    def gather(self, x_local: torch.Tensor) -> torch.Tensor:
        """[N_local, ...] -> [N, ...] in expert order."""
        return x_local


class GroupPlacement(LocalPlacement):
    """Experts split into equal contiguous blocks over the ranks of ``group``."""

    def __init__(self, num_experts: int, group=None):
        size = dist.get_world_size(group)
        if num_experts % size:
            raise ValueError(f"parallel.expert_parallel_size={size} must divide the number of experts "
                             f"({num_experts}); use a divisor of {num_experts}")
        per = num_experts // size
        rank = dist.get_rank(group)
        self.group = group
        self.size = size
        self.local_experts = list(range(rank * per, (rank + 1) * per))
        self.holds_all = size == 1

    def gather(self, x_local: torch.Tensor) -> torch.Tensor:
        if x_local.requires_grad:
            raise ValueError("expert placement runs frozen experts only (their outputs are gathered as constants); "
                             "call expert.requires_grad_(False) or train the experts without placement")
        parts = [torch.empty_like(x_local) for _ in range(self.size)]
        dist.all_gather(parts, x_local.contiguous(), group=self.group)
        return torch.cat(parts, dim=0)


def apply_expert_placement(model, group=None):
    """Place ``model``'s experts over the ranks of ``group`` (default: the world): each rank keeps only its own
    experts (the others are dropped to free their memory). Call once, after construction or loading, on every
    rank with the same model. Returns the model."""
    if not dist.is_initialized():
        raise ValueError("expert placement needs torch.distributed initialised (one process per rank)")
    placement = GroupPlacement(model.config.num_experts, group)
    keep = set(placement.local_experts)
    for k in range(model.config.num_experts):
        if k not in keep:
            model.experts[k] = nn.Module()         # an empty slot: the expert lives on another rank
    model.placement = placement
    return model
