"""Where each (token, choice) assignment lives in the experts' input buffer, and the two gathers that use it.

A token routed to k choices is one *slot* per choice: slots ``t*k .. t*k+k-1`` belong to token ``t``. The
experts read a buffer of *rows*, grouped by expert; a :class:`RowPlan` maps between the two:

- ``row_token[r]``: the token copied into row r;
- ``slot_row[s]``: the row holding slot s;
- ``row_slot[r]``: the slot of row r (for the routing weights), ``S`` = "no slot" (weight 0).

Two layouts:

- **grouped**: rows sorted by expert, ``counts[e]`` rows each, plus one trailing *zero row* (weight 0, owned
  by the last expert); for grouped GEMM and for the expert-parallel exchange;
- **padded**: ``E x capacity`` rows (capacity = the largest expert's count, +1 if all are equal), unused rows
  are zero rows; for one batched GEMM over [E, capacity, H].

Null and dropped slots point at a zero row. Zero rows carry routing weight 0, so (with the weights applied
inside the experts, before their down projection) their output is exactly 0 and the gradient they send back
is exactly 0: both gathers therefore have gathers as their backward (no scatter-add, no zero-filled buffer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RowPlan:
    row_token: torch.Tensor        # (R,) long
    slot_row: torch.Tensor         # (S,) long
    row_slot: torch.Tensor         # (R,) long, S for zero rows
    counts: torch.Tensor           # (E,) long rows per expert (zero rows included)
    routed_counts: torch.Tensor    # (E,) long computed assignments per expert (for statistics)
    top_k: int
    capacity: int | None = None    # set for the padded layout

    @property
    def num_rows(self) -> int:
        return self.row_token.shape[0]

    def row_weights(self, slot_weight: torch.Tensor) -> torch.Tensor:
        """(S,) routing weights -> (R,) per row, 0 on zero rows (differentiable)."""
        return torch.cat([slot_weight, slot_weight.new_zeros(1)]).index_select(0, self.row_slot)


def plan_rows(slot_expert: torch.Tensor, keep: torch.Tensor | None, num_experts: int, top_k: int,
              padded: bool = False) -> RowPlan:
    """The row layout for ``slot_expert`` (S,) experts per slot; ``keep`` (S,) bool marks computed slots
    (None: all are). ``padded`` selects the padded layout, else the grouped one."""
    s, e, dev = slot_expert.numel(), num_experts, slot_expert.device
    expert = slot_expert if keep is None else torch.where(keep, slot_expert, e)   # not computed: sort last
    order = torch.argsort(expert, stable=True)              # sorted position -> slot (token order per expert)
    routed = torch.bincount(expert, minlength=e + 1)[:e]
    n_real = s if keep is None else int(routed.sum())
    real = order[:n_real]
    if not padded:
        rows_sorted = torch.arange(n_real, device=dev)
        zero_row = n_real
        counts = routed.clone()
        counts[-1] += 1
        n_rows, capacity = n_real + 1, None
    else:
        top, low = int(routed.max()), int(routed.min())
        capacity = top + (1 if top == low else 0)           # at least one unused row: the zero row
        start = torch.cumsum(routed, 0) - routed
        sorted_expert = expert[real]
        rows_sorted = sorted_expert * capacity + torch.arange(n_real, device=dev) - start[sorted_expert]
        zero_row = int(torch.argmin(routed)) * capacity + capacity - 1
        counts = torch.full((e,), capacity, dtype=torch.long, device=dev)
        n_rows = e * capacity
    slot_row = torch.full((s,), zero_row, dtype=torch.long, device=dev) if n_real < s else torch.empty_like(order)
    slot_row[real] = rows_sorted
    row_slot = torch.full((n_rows,), s, dtype=torch.long, device=dev)
    row_slot[rows_sorted] = real
    row_token = torch.where(row_slot < s, row_slot // top_k, 0)
    return RowPlan(row_token, slot_row, row_slot, counts, routed, top_k, capacity)


def _sum_of_rows(rows: torch.Tensor, slot_row: torch.Tensor, k: int) -> torch.Tensor:
    """out[t] = sum_j rows[slot_row[t*k + j]]: gather and sum in one pass (``embedding_bag``), ~3x faster on CPU
    than materialising the (S, H) gather and summing it; exact, and deterministic (no atomics)."""
    return F.embedding_bag(slot_row.view(-1, k), rows, mode="sum")


class _GatherRows(torch.autograd.Function):
    """rows = x[row_token]; backward: dx[t] = sum over t's k slots of drows[slot_row]."""

    @staticmethod
    def forward(ctx, x, row_token, slot_row, k):
        ctx.save_for_backward(slot_row)
        ctx.k = k
        return x.index_select(0, row_token)

    @staticmethod
    def backward(ctx, grad):
        (slot_row,) = ctx.saved_tensors
        return _sum_of_rows(grad, slot_row, ctx.k), None, None, None


class _CombineRows(torch.autograd.Function):
    """out[t] = sum over t's k slots of rows[slot_row]; backward: drows = dout[row_token]."""

    @staticmethod
    def forward(ctx, rows, slot_row, row_token, k):
        ctx.save_for_backward(row_token)
        return _sum_of_rows(rows, slot_row, k)

    @staticmethod
    def backward(ctx, grad):
        (row_token,) = ctx.saved_tensors
        return grad.index_select(0, row_token), None, None, None


def gather_rows(x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """Tokens (N, H) -> the experts' input rows (R, H)."""
    return _GatherRows.apply(x, plan.row_token, plan.slot_row, plan.top_k)


def combine_rows(rows: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """Weighted expert output rows (R, H) (zero rows exactly 0) -> per-token sums over the k choices (N, H)."""
    return _CombineRows.apply(rows, plan.slot_row, plan.row_token, plan.top_k)
