"""Where each (token, choice) assignment lives in the experts' input buffer, and the two gathers that use it.

A token routed to k choices is one *slot* per choice: slots ``t*k .. t*k+k-1`` belong to token ``t``. The
experts read a buffer of *rows*, grouped by expert; a :class:`RowPlan` maps between the two:

- ``row_token[r]``: the token copied into row r;
- ``slot_row[s]``: the row holding slot s;
- ``row_slot[r]``: the slot of row r (for the routing weights), ``S`` = "no slot" (weight 0).

Two layouts:

- **grouped**: rows sorted by expert, ``counts[e]`` rows each, plus one trailing *zero row* (weight 0, owned
  by the last expert); for grouped GEMM and for the expert-parallel exchange;
- **buckets** (:mod:`dsmoe.moe.buckets`): the experts cut into a few buckets, every expert of a bucket padded
  to the same row count, unused rows are zero rows; one batched GEMM per bucket and projection (one bucket:
  the padded layout, [E, capacity, H]).

Null and dropped slots point at a zero row, and a zero row only ever enters a sum with routing weight 0, so it
adds exactly 0 to the output and receives exactly 0 gradient: both gathers have gathers as their backward (no
scatter-add, no zero-filled buffer). The routing weights are applied once, in one of two places:

- by the experts, before their down projection (rows carry their slot's weight, zero rows 0): the cheaper
  place when the expert width F is below the hidden size H;
- by the combine, while it sums each token's k rows (``embedding_bag`` with per-sample weights: one pass, no
  weighted copy): two passes over the (R, H) rows in backward instead of four over the (R, F) activations and
  a row-weight gather, ~4% of a layer's forward+backward at F = 2H on a 2-core CPU; it keeps the (R, H)
  output rows for the weights' gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .buckets import ExpertBuckets, choose_buckets


@dataclass
class RowPlan:
    row_token: torch.Tensor        # (R,) long
    slot_row: torch.Tensor         # (S,) long
    row_slot: torch.Tensor         # (R,) long, S for zero rows
    counts: torch.Tensor           # (E,) long rows per expert (zero rows included)
    routed_counts: torch.Tensor    # (E,) long computed assignments per expert (for statistics)
    top_k: int
    buckets: ExpertBuckets | None = None   # set for the bucket layout
    computed: torch.Tensor | None = None   # (S,) 1.0 where the slot was computed, 0.0 not; None: all were

    @property
    def num_rows(self) -> int:
        return self.row_token.shape[0]

    def row_weights(self, slot_weight: torch.Tensor) -> torch.Tensor:
        """(S,) routing weights -> (R,) per row, 0 on zero rows (differentiable)."""
        return _per_row(slot_weight, self.row_slot)


def _per_row(slot_weight: torch.Tensor, row_slot: torch.Tensor) -> torch.Tensor:
    """(S,) per-slot values -> (R,) per row via ``row_slot``, 0 where a row has no slot (``row_slot == S``)."""
    return torch.cat([slot_weight, slot_weight.new_zeros(1)]).index_select(0, row_slot)


def plan_rows(slot_expert: torch.Tensor, keep: torch.Tensor | None, num_experts: int, top_k: int,
              max_buckets: int | None = None) -> RowPlan:
    """The row layout for ``slot_expert`` (S,) experts per slot; ``keep`` (S,) bool marks computed slots
    (None: all are). ``max_buckets`` selects the bucket layout with at most that many buckets (1: padded),
    None the grouped one."""
    s, e, dev = slot_expert.numel(), num_experts, slot_expert.device
    expert = slot_expert if keep is None else torch.where(keep, slot_expert, e)   # not computed: sort last
    order = torch.argsort(expert, stable=True)              # sorted position -> slot (token order per expert)
    routed = torch.bincount(expert, minlength=e + 1)[:e]
    n_real = s if keep is None else int(routed.sum())
    real = order[:n_real]
    if max_buckets is None:
        rows_sorted = torch.arange(n_real, device=dev)
        zero_row = n_real
        counts = routed.clone()
        counts[-1] += 1
        n_rows, buckets = n_real + 1, None
    else:
        buckets = choose_buckets(routed, max_buckets)
        start = torch.cumsum(routed, 0) - routed
        sorted_expert = expert[real]
        rows_sorted = buckets.row_start[sorted_expert] + torch.arange(n_real, device=dev) - start[sorted_expert]
        zero_row, counts, n_rows = buckets.zero_row, buckets.rows_per_expert, buckets.num_rows
    slot_row = torch.full((s,), zero_row, dtype=torch.long, device=dev) if n_real < s else torch.empty_like(order)
    slot_row[real] = rows_sorted
    row_slot = torch.full((n_rows,), s, dtype=torch.long, device=dev)
    row_slot[rows_sorted] = real
    row_token = torch.where(row_slot < s, row_slot // top_k, 0)
    computed = None if keep is None else keep.float()
    return RowPlan(row_token, slot_row, row_slot, counts, routed, top_k, buckets, computed)


def _sum_of_rows(rows: torch.Tensor, slot_row: torch.Tensor, k: int,
                 slot_weight: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_j w[t*k + j] * rows[slot_row[t*k + j]] (w = 1 when ``slot_weight`` is None): gather, weight
    and sum in one pass (``embedding_bag``), ~3x faster on CPU than materialising the (S, H) gather and summing
    it; exact, and deterministic (no atomics)."""
    w = None if slot_weight is None else slot_weight.view(-1, k)
    return F.embedding_bag(slot_row.view(-1, k), rows, mode="sum", per_sample_weights=w)


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
    """out[t] = sum over t's k slots s of w[s] * rows[slot_row[s]] (w = 1 when no weights are given; 0 on slots
    that were not computed). Backward: g = dout[row_token]; dw[s] = <g, rows>[slot_row[s]] on computed slots;
    drows = g * w per row (0 on zero rows)."""

    @staticmethod
    def forward(ctx, rows, slot_weight, slot_row, row_token, row_slot, computed, k):
        ctx.k = k
        if slot_weight is None:
            ctx.save_for_backward(row_token)
            return _sum_of_rows(rows, slot_row, k)
        w = slot_weight.to(rows.dtype)
        if computed is not None:
            w = w * computed.to(w.dtype)
        ctx.save_for_backward(row_token, rows, w, slot_row, row_slot, computed)
        ctx.weight_dtype = slot_weight.dtype
        return _sum_of_rows(rows, slot_row, k, w)

    @staticmethod
    def backward(ctx, grad):
        row_token, *weighted = ctx.saved_tensors
        g = grad.index_select(0, row_token)
        if not weighted:
            return g, None, None, None, None, None, None
        rows, w, slot_row, row_slot, computed = weighted
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = torch.linalg.vecdot(g, rows).index_select(0, slot_row)
            if computed is not None:
                d_weight = d_weight * computed.to(d_weight.dtype)
            d_weight = d_weight.to(ctx.weight_dtype)
        d_rows = None
        if ctx.needs_input_grad[0]:
            d_rows = g.mul_(_per_row(w, row_slot).unsqueeze(1))
        return d_rows, d_weight, None, None, None, None, None


def gather_rows(x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """Tokens (N, H) -> the experts' input rows (R, H)."""
    return _GatherRows.apply(x, plan.row_token, plan.slot_row, plan.top_k)


def combine_rows(rows: torch.Tensor, plan: RowPlan, slot_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Expert output rows (R, H) -> per-token sums over the k choices (N, H), weighted by the (S,) routing
    weights when given (else the rows are already weighted, zero rows exactly 0). Slots that were not
    computed (null, dropped) contribute 0 and get no weight gradient."""
    return _CombineRows.apply(rows, slot_weight, plan.slot_row, plan.row_token, plan.row_slot, plan.computed,
                              plan.top_k)
