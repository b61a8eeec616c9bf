"""Token dispatchers: move expert-sorted assignments to the ranks holding their experts and back.

The layer hands over rows sorted by global expert with their per-expert counts; the dispatcher returns the rows
for this rank's local experts sorted by local expert, and later brings the expert outputs back in the original
order. Routing weights never travel: the layer applies them on the sending rank (in its combine). Null and
dropped assignments never reach a dispatcher, so they are never sent.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .all_to_all import all_to_all


@dataclass
class Dispatched:
    """Result of :meth:`TokenDispatcher.dispatch`; call :meth:`wait` before reading ``tokens``."""

    tokens: torch.Tensor
    counts: torch.Tensor                      # (E_local,) rows per local expert
    pending: list = field(default_factory=list)
    state: dict = field(default_factory=dict)

    def wait(self) -> "Dispatched":
        while self.pending:
            self.pending.pop().wait()
        return self


class TokenDispatcher(ABC):
    """Moves expert-sorted rows to the ranks holding their experts (:meth:`dispatch`) and the expert outputs
    back (:meth:`combine`); :meth:`all_reduce` sums statistics over the same group."""

    world_size: int
    rank: int
    num_experts: int
    num_local_experts: int

    @abstractmethod
    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> "Dispatched":
        """tokens (N, H) sorted by global expert, counts (E,) -> this rank's rows sorted by local expert."""

    @abstractmethod
    def combine(self, out: torch.Tensor, d: "Dispatched") -> torch.Tensor:
        """Expert outputs of :meth:`dispatch`'s rows -> outputs for the original rows, in their order."""

    @abstractmethod
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the dispatcher's group (a new tensor)."""


class LocalDispatcher(TokenDispatcher):
    """Single-rank dispatcher: all experts are local, nothing moves."""

    world_size = 1
    rank = 0

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> Dispatched:
        return Dispatched(tokens, counts)

    def combine(self, out: torch.Tensor, d: Dispatched) -> torch.Tensor:
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t


class AllToAllDispatcher(TokenDispatcher):
    """Expert-parallel dispatcher over a torch.distributed group (gloo or NCCL).

    Rank r holds global experts [r*E/P, (r+1)*E/P). One small all-to-all exchanges the per-expert counts,
    one variable-split all-to-all moves the rows (asynchronously, so shared experts can run meanwhile), and
    the combine runs the reverse exchange. Both are differentiable: one exchange each way, in the same order on
    every rank.
    """

    def __init__(self, num_experts: int, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.world_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {self.world_size}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world_size

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> Dispatched:
        p, el = self.world_size, self.num_local_experts
        send_counts = counts.reshape(p, el)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts.view(-1), send_counts.reshape(-1).contiguous(), group=self.group)
        in_splits = send_counts.sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        pending: list = []
        received = all_to_all(tokens, out_splits, in_splits, self.group, pending)
        # received rows are ordered (source rank, local expert); the experts want (local expert, source rank)
        seg = torch.arange(p * el, device=counts.device).view(p, el).t().reshape(-1)   # (e, src) -> segment id
        seg_sizes = recv_counts.reshape(-1)
        src_starts = (torch.cumsum(seg_sizes, 0) - seg_sizes)[seg]
        dst_sizes = seg_sizes[seg]
        dst_starts = torch.cumsum(dst_sizes, 0) - dst_sizes
        perm = torch.arange(received.shape[0], device=counts.device) + torch.repeat_interleave(
            src_starts - dst_starts, dst_sizes, output_size=received.shape[0])
        d = Dispatched(received, recv_counts.sum(0), pending,
                       {"perm": perm, "in_splits": in_splits, "out_splits": out_splits})
        return _Permuted(d)

    def combine(self, out: torch.Tensor, d: Dispatched) -> torch.Tensor:
        back = torch.empty_like(out)
        back = back.index_copy(0, d.state["perm"], out) if out.shape[0] else out
        return all_to_all(back, d.state["in_splits"], d.state["out_splits"], self.group)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t


class _Permuted(Dispatched):
    """Applies the (source, expert) -> (expert, source) reorder once the exchange has finished."""

    def __init__(self, d: Dispatched):
        super().__init__(d.tokens, d.counts, d.pending, d.state)

    def wait(self) -> "Dispatched":
        if self.pending:
            super().wait()
        if not self.state.get("permuted"):
            if self.tokens.shape[0]:
                self.tokens = self.tokens.index_select(0, self.state["perm"])
            self.state["permuted"] = True
        return self
