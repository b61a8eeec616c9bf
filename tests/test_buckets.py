"""The bucket layout of padded experts and its batched GEMM, against a per-expert loop."""
import pytest
import torch

from dsmoe.moe.buckets import WASTE, bucketed_matmul, choose_buckets


def blocks(b):
    """Each expert's rows as (start, end) and the bucket it is in."""
    out = {}
    for i, (first, end, cap) in enumerate(b.bounds):
        for pos in range(first, end):
            e = int(b.order[pos])
            out[e] = (int(b.row_start[e]), int(b.row_start[e]) + cap, i)
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("counts,max_buckets", [
    ([10, 0, 3, 7, 7, 2, 9, 1], 8), ([10, 0, 3, 7, 7, 2, 9, 1], 1), ([4, 4, 4, 4], 8), ([5, 4, 0, 0], 2),
    ([int(c) for c in torch.randint(400, 620, (64,), generator=torch.Generator().manual_seed(0))], 8),
])
def test_layout_tiles_the_rows_and_keeps_a_zero_row(counts, max_buckets, threads):
    c = torch.tensor(counts)
    b = choose_buckets(c, max_buckets, gather_rows=0, threads=threads)   # free weight gathers: sorted if it pads less
    assert len(b.bounds) <= max_buckets
    sizes = [end - first for first, end, _ in b.bounds]
    assert all(n % threads == 0 for n in sizes[:-1] if n >= threads), f"{sizes}: a bucket's experts split evenly"
    spans = blocks(b)
    assert sorted(spans) == list(range(len(counts)))
    covered = sorted((s, t) for s, t, _ in spans.values())
    assert covered[0][0] == 0 and covered[-1][1] == b.num_rows
    assert all(t0 == s1 for (_, t0), (s1, _) in zip(covered, covered[1:])), "blocks must tile the rows"
    for e, (s, t, _) in spans.items():
        assert t - s == int(b.rows_per_expert[e]) >= counts[e]
    # the zero row is past the last row some expert uses
    assert any(s + counts[e] <= b.zero_row < t for e, (s, t, _) in spans.items())
    # buckets hold the experts sorted by count (one bucket: the experts' own order)
    if len(b.bounds) == 1:
        assert b.identity and b.order.tolist() == list(range(len(counts)))
    else:
        assert [counts[int(e)] for e in b.order] == sorted(counts, reverse=True)


def test_fewest_buckets_within_the_waste_bound():
    counts = torch.tensor([int(c) for c in torch.randint(400, 620, (64,), generator=torch.Generator().manual_seed(0))])
    one = choose_buckets(counts, 1)
    assert one.num_rows > (1 + WASTE) * counts.sum()            # one bucket pads too much here
    b = choose_buckets(counts, 8)
    assert b.num_rows <= (1 + WASTE) * counts.sum() and 1 < len(b.bounds) <= 8 and not b.identity
    fewer = choose_buckets(counts, len(b.bounds) - 1)
    assert len(fewer.bounds) == 1 or fewer.num_rows > (1 + WASTE) * counts.sum()   # no fewer buckets would do
    equal = choose_buckets(torch.full((8,), 5), 8)
    assert equal.bounds == ((0, 8, 6),), "equal counts: one bucket, one spare row per expert"


def test_one_bucket_when_sorting_saves_less_than_the_weight_gather():
    """E=8 top-2 over 4096 tokens pads ~6% in one bucket: sorting would save ~3% of the rows, less than
    gathering 8 experts' weights costs, so the experts keep their order (no gather); free gathers sort."""
    counts = torch.tensor([1008, 1085, 1017, 1027, 995, 1021, 1056, 983])
    b = choose_buckets(counts, 8)
    assert b.identity and len(b.bounds) == 1 and b.num_rows == 8 * 1085
    sorted_ = choose_buckets(counts, 8, gather_rows=0)
    assert not sorted_.identity and sorted_.num_rows < b.num_rows


def test_buckets_split_evenly_over_the_threads():
    """A bucket's batched GEMM splits its experts among the threads: with 2 threads the 64 experts go into
    buckets of 14+14+14+14+8 (one thread takes 13+13+13+13+12, whose odd buckets would idle one of two threads)."""
    counts = torch.tensor([int(c) for c in torch.randint(400, 620, (64,), generator=torch.Generator().manual_seed(0))])
    sizes = {t: [end - first for first, end, _ in choose_buckets(counts, 8, threads=t).bounds] for t in (1, 2, 4)}
    assert sizes[1] == [13, 13, 13, 13, 12] and sizes[2] == [14, 14, 14, 14, 8]
    assert all(n % 4 == 0 for n in sizes[4]), sizes[4]


@pytest.mark.parametrize("counts,max_buckets", [([6, 0, 3, 5, 5, 2, 4, 1], 8), ([6, 0, 3, 5], 1), ([5, 4, 0, 0], 2)])
def test_bucketed_matmul_equals_the_loop(counts, max_buckets):
    """Forward and both gradients equal one matmul per expert; experts without rows get a zero gradient."""
    g = torch.Generator().manual_seed(0)
    e, k, m = len(counts), 8, 12
    b = choose_buckets(torch.tensor(counts), max_buckets, gather_rows=0)
    x = torch.randn(b.num_rows, k, generator=g, requires_grad=True)
    w = torch.randn(e, k, m, generator=g, requires_grad=True)
    y = bucketed_matmul(x, w, b)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    in_row_order = sorted(blocks(b).items(), key=lambda kv: kv[1][0])
    ref = torch.cat([ref_x[s:t] @ ref_w[ex] for ex, (s, t, _) in in_row_order])
    ref.backward(gy)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-6, atol=1e-6)
    assert int(b.rows_per_expert.min()) == 0 or max_buckets != 2, "the [5, 4, 0, 0] case has an empty bucket"
    for ex in range(e):
        if int(b.rows_per_expert[ex]) == 0:
            assert torch.equal(w.grad[ex], torch.zeros_like(w.grad[ex]))
