"""Fused SwiGLU ``silu(gate) * up`` on a [gate | up] tensor, optionally scaled per row (the routing weights).

One autograd node instead of split + silu + mul (+ mul): the backward writes both halves of the gradient into
one buffer (no ``cat`` of the two halves) and makes fewer full-size temporaries, which on CPU is where a
fine-grained MoE's elementwise time goes. Scaling rows here, before the down projection, puts the routing
weights on the F-wide tensor instead of the H-wide expert output: the MoE layer does so when F < H. With row
weights the backward takes five elementwise passes, not seven: the up half's gradient is computed once, unscaled,
in its place in the output (the weights' gradient reads it), and the weights then scale the whole gradient in
one pass (with a core busy every pass is a parallel region that may wait for a descheduled thread).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, row_weight):
        f = h.shape[-1] // 2
        act = F.silu(h[:, :f])
        out = act * h[:, f:]
        if row_weight is not None:
            out.mul_(row_weight.to(out.dtype).unsqueeze(1))
        ctx.save_for_backward(h, act, row_weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, act, row_weight = ctx.saved_tensors
        f = h.shape[-1] // 2
        gate, up = h[:, :f], h[:, f:]
        dh = torch.empty_like(h)
        d_up = torch.mul(grad, act, out=dh[:, f:])          # before the row weights
        d_weight = None
        if row_weight is not None and ctx.needs_input_grad[1]:
            d_weight = torch.linalg.vecdot(d_up, up).to(row_weight.dtype)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=dh[:, :f])
        if row_weight is not None:
            dh.mul_(row_weight.to(dh.dtype).unsqueeze(1))
        return dh, d_weight


def swiglu(h: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(h[..., :F]) * h[..., F:]`` for ``h`` (..., 2F), times ``row_weight`` (rows,) per row when given."""
    shape = h.shape
    out = _SwiGLU.apply(h.reshape(-1, shape[-1]), row_weight)
    return out.view(*shape[:-1], shape[-1] // 2)
