"""Where the experts of a mixture run: all on this process, or spread over the ranks of a process group.

With a group of P ranks, rank r holds experts [r * N/P, (r+1) * N/P) and runs them on the whole batch (the
router is replicated). What crosses ranks is small:

* scoring and training (``combine="logprob"``): the per-token target log-probs of the local experts,
  [N_local, B, T], are all-gathered into [N, B, T] and mixed identically on every rank;
* a full-vocabulary mixture (generation asks for the last position only, [B, 1, V]): a log-sum-exp across
  ranks of each rank's partial mixture (``combine="logprob"``), or a sum of the weighted logits
  (``combine="logits"``, which is not a mixture of distributions and so needs the full vocabulary reduced).

The collectives are differentiable (``torch.distributed.nn``), so a replicated router trains with the same
gradient on every rank. This is the only file of the mixtures package that talks to ``torch.distributed``.
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

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """log(sum over ranks of exp(x))."""
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks."""
        return x


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
        from torch.distributed.nn.functional import all_gather
        return torch.cat(all_gather(x_local.contiguous(), group=self.group), dim=0)

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_gather
        return torch.logsumexp(torch.stack(all_gather(x.contiguous(), group=self.group)), dim=0)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce
        return all_reduce(x.contiguous(), group=self.group)


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
