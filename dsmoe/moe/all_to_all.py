"""Differentiable variable-split all-to-all. Backward runs the transposed exchange (split sizes swapped)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, pending):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group,
                                      async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None,
               pending: list | None = None) -> torch.Tensor:
    """Send ``x.split(in_splits)[r]`` to rank r; receive ``out_splits[r]`` rows from rank r.

    With ``pending`` (a list) the forward exchange is asynchronous: its work handle is appended and the
    result must not be read before ``work.wait()``.
    """
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group, pending)
