"""Padded expert layouts: experts sorted by load into a few buckets, each bucket one batched GEMM per projection.

Grouped GEMM computes no padding but, on a CPU, runs one parallel region per expert and projection (6 x E per
forward+backward); when another process holds a core every region waits for a descheduled thread. Padding every
expert to the largest one's row count needs one batched GEMM per projection, but pads 20-30% of the rows at
E=64. Buckets sit between the two: the experts are sorted by their row count (largest first, ties by index) and
cut into up to ``max_buckets`` buckets of equal size, each padded to its first (largest) expert's count; the
fewest buckets whose padding is at most ``WASTE`` of the rows are used, unless one bucket in the experts' own
order (no weight gather, see :data:`GATHER_ROWS`) is cheaper. At E=64 top-8 that is ~5 sorted buckets and ~4%
padding (30 GEMM regions instead of 384); at E=8 top-2 one bucket usually wins (~6% padding). ``torch.bmm``
on CPU splits a bucket's experts among the threads, so a bucket of 3 experts on 2 threads costs as much as one
of 4: bucket sizes are multiples of the thread count.

The weights are gathered once per call into the buckets' order (one copy of a projection's expert weights,
kept for the backward; none when the order is the experts' own, as with one bucket); the backward computes the
weight gradient in that order and writes it back to the experts' own in one pass. Every step is a fixed
sequence of ops decided by the row counts and the thread count alone: the same batch gives the same bits, run
after run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WASTE = 0.05
"""The padding (as a share of the computed rows) below which fewer buckets are preferred."""
MAX_BUCKETS = 8
"""Buckets of the "bucketed" kernel at most (the "padded" kernel is one bucket)."""
GATHER_ROWS = 40.0
"""What sorting the experts costs, in padded rows per expert: gathering its 3HF weights into the buckets' order
and writing its gradient back (18HF FLOPs per padded row forward+backward) measures ~13 rows on an idle 2-core
AVX2 CPU; the rest pays for the extra buckets' GEMM calls, each a parallel region that waits when another
process holds a core (in one busy-core measurement two sorted buckets at E=8 top-2 were ~10% slower than
one). Sorting pays at E=64 top-8 (~25% less padding) and not at E=8 top-2 (~3%)."""


@dataclass(frozen=True)
class ExpertBuckets:
    """Where each expert's rows live: bucket ``b`` holds the experts ``order[first:end]`` for ``(first, end,
    capacity)`` in ``bounds``, ``capacity`` rows each, buckets one after the other."""

    order: torch.Tensor                        # (E,) long: position -> expert
    bounds: tuple[tuple[int, int, int], ...]   # per bucket: (first position, end position, rows per expert)
    row_start: torch.Tensor                    # (E,) long: first row of each expert
    rows_per_expert: torch.Tensor              # (E,) long: its bucket's capacity
    zero_row: int                              # a row no assignment uses (every bucket layout has one)
    identity: bool                             # order is 0..E-1: bucket weights are views, no gather

    @property
    def num_rows(self) -> int:
        return sum((end - first) * cap for first, end, cap in self.bounds)


def _sorted_cut(c: list[int], max_buckets: int, total: int, threads: int) -> tuple[int, int, list[int]] | None:
    """(padded rows, experts per bucket, capacities) for the counts ``c``, sorted largest first, cut into
    equal-size buckets: the fewest of 2..``max_buckets`` buckets padding at most :data:`WASTE` of ``total``,
    else the cut with the fewest padded rows (None: no such cut). Buckets of at least ``threads`` experts hold a
    multiple of ``threads``."""
    e, best, seen = len(c), None, set()
    for nb in range(2, min(max_buckets, e) + 1):
        size = math.ceil(e / nb)
        if size > threads:
            size = math.ceil(size / threads) * threads
        if size in seen or math.ceil(e / size) < 2:
            continue                                    # the same cut as fewer buckets
        seen.add(size)
        caps = c[::size]                                # sorted: a bucket's first expert is its largest
        rows = sum(min(size, e - s) * cap for s, cap in zip(range(0, e, size), caps))
        if best is None or rows < best[0]:
            best = (rows, size, caps)
        if rows <= (1 + WASTE) * total:
            return rows, size, caps
    return best


def choose_buckets(counts: torch.Tensor, max_buckets: int, gather_rows: float | None = None,
                   threads: int | None = None) -> ExpertBuckets:
    """The bucket layout for ``counts`` (E,) rows per expert, at most ``max_buckets`` buckets.

    Two candidates: one bucket in the experts' own order (no weight gather), and the fewest of 2..``max_buckets``
    equal-size buckets of the experts sorted by count whose padded rows exceed the counts' sum by at most
    :data:`WASTE` (else the one with the fewest padded rows). The sorted one is used when its padded rows plus
    ``gather_rows`` (default :data:`GATHER_ROWS`) per expert, the price of gathering the weights and of the
    extra buckets, are fewer. A bucket's batched GEMM splits its experts among the ``threads`` (default: torch's
    CPU threads): on 2 threads a bucket of 3 experts costs as much as one of 4, so a bucket of at least
    ``threads`` experts holds a multiple of them.
    At least one row is left unused (the layout's zero row): when every expert fills its bucket, the last
    bucket gets one more row."""
    e, dev = counts.numel(), counts.device
    gather_rows = GATHER_ROWS if gather_rows is None else gather_rows
    threads = max(1, torch.get_num_threads() if threads is None else threads)
    own = counts.tolist()
    total = sum(own)
    order, size, caps = torch.arange(e, device=dev), e, [max(own)]
    rows = e * caps[0]
    if max_buckets > 1 and e > 1:
        by_count = torch.argsort(counts, descending=True, stable=True)
        cut = _sorted_cut(counts[by_count].tolist(), max_buckets, total, threads)
        if cut is not None and cut[0] + gather_rows * e < rows:
            rows, size, caps = cut
            order = by_count
    bounds = [[s, min(s + size, e), cap] for s, cap in zip(range(0, e, size), caps)]
    if rows == total:                                   # no unused row: make one
        bounds[-1][2] += 1
    per_pos = torch.tensor([cap for first, end, cap in bounds for _ in range(first, end)], device=dev)
    start_pos = torch.cumsum(per_pos, 0) - per_pos
    row_start, rows_per_expert = torch.empty_like(start_pos), torch.empty_like(per_pos)
    row_start[order], rows_per_expert[order] = start_pos, per_pos
    slack = rows_per_expert - counts
    free = int(torch.argmax(slack))                     # an expert with an unused row at the end of its block
    zero_row = int(row_start[free] + rows_per_expert[free] - 1)
    identity = max_buckets == 1 or bool(torch.equal(order, torch.arange(e, device=dev)))
    return ExpertBuckets(order, tuple(tuple(x) for x in bounds), row_start, rows_per_expert, zero_row, identity)


class _BucketedMatmul(torch.autograd.Function):
    """x (R, K) in the bucket layout, w (E, K, M) -> (R, M): one ``bmm`` per bucket, written in place."""

    @staticmethod
    def forward(ctx, x, w, buckets: ExpertBuckets):
        x = x.contiguous()
        out = x.new_empty(x.shape[0], w.shape[-1])
        # the weights in bucket order, gathered once (kept for the backward); a view when the order is the experts'
        wb = w if buckets.identity else w.index_select(0, buckets.order)
        for rows, shape, first, end in _spans(buckets):
            torch.bmm(x[rows].view(shape), wb[first:end], out=out[rows].view(shape))
        ctx.save_for_backward(x, wb, buckets.order)
        ctx.buckets = buckets
        return out

    @staticmethod
    def backward(ctx, grad):
        x, wb, order = ctx.saved_tensors
        b = ctx.buckets
        need_x, need_w = ctx.needs_input_grad[:2]
        grad = grad.contiguous()
        dx = torch.empty_like(x) if need_x else None
        dwb = torch.empty_like(wb) if need_w else None
        if need_w and any(cap == 0 for _, _, cap in b.bounds):
            dwb.zero_()                                 # experts of an empty bucket get no gradient
        for rows, shape, first, end in _spans(b):
            g = grad[rows].view(shape)
            if need_x:
                torch.bmm(g, wb[first:end].transpose(1, 2), out=dx[rows].view(shape))
            if need_w:
                torch.bmm(x[rows].view(shape).transpose(1, 2), g, out=dwb[first:end])
        dw = dwb if dwb is None or b.identity else torch.empty_like(dwb).index_copy_(0, order, dwb)
        return dx, dw, None


def _spans(b: ExpertBuckets):
    """Per non-empty bucket: its rows (a slice), their (experts, capacity, -1) shape and its positions."""
    r0 = 0
    for first, end, cap in b.bounds:
        n = (end - first) * cap
        if n:
            yield slice(r0, r0 + n), (end - first, cap, -1), first, end
        r0 += n


def bucketed_matmul(x: torch.Tensor, w: torch.Tensor, buckets: ExpertBuckets) -> torch.Tensor:
    """x (R, K) rows in ``buckets``' layout times each row's expert's w (E, K, M) -> (R, M)."""
    return _BucketedMatmul.apply(x, w, buckets)
