"""Mixture math on local tensors: the time mask, gate weights in log space, and the two combiners.

Shapes: (B)atch, (T)ime positions, (N) experts, (V)ocabulary. Weights live in log space, ``log_w`` [B, T, N],
with ``-inf`` for an expert that gets weight exactly zero (time-masked or not chosen), so a zero-weight expert
never enters the mixture, not even as a uniform distribution. The weight at position t is applied to the experts'
prediction made at t (of token t+1).
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def usable_experts(slices: list[list[int]], date, batch_size: int, policy: str,
                   device: torch.device | None = None) -> torch.Tensor:
    """[B, N] bool: which experts a query ``date`` may use (all of them without a date).

    ``date``: None, an int, or a LongTensor [B] (one date per row). ``policy`` "start": an expert is usable if its
    slice starts at or before the date; "end": if its slice ends at or before the date. A date that leaves no
    usable expert raises ValueError naming the date and the earliest slice.
    """
    n = len(slices)
    if date is None:
        return torch.ones(batch_size, n, dtype=torch.bool, device=device)
    dates = torch.as_tensor(date, dtype=torch.long, device=device)
    if dates.dim() == 0:
        dates = dates.expand(batch_size)
    if dates.shape != (batch_size,):
        raise ValueError(f"date: expected an int or a tensor of {batch_size} dates (one per row), got shape "
                         f"{tuple(dates.shape)}")
    column = 0 if policy == "start" else 1
    bound = torch.tensor([s[column] for s in slices], dtype=torch.long, device=dates.device)   # (N,)
    usable = bound[None, :] <= dates[:, None]                                                    # (B, N)
    if not bool(usable.any(-1).all()):
        first = dates[~usable.any(-1)].min().item()
        edge = "starts" if policy == "start" else "ends"
        raise ValueError(f"date={first} leaves no usable expert: the earliest slice {slices[0]} {edge} in "
                         f"{slices[0][column]} (date_policy={policy!r}); use a later date or no date")
    return usable


def slice_of_year(slices: list[list[int]], years: torch.Tensor) -> torch.Tensor:
    """[B] index of the slice containing each year; ValueError for a year in no slice."""
    starts = torch.tensor([s[0] for s in slices], device=years.device)
    ends = torch.tensor([s[1] for s in slices], device=years.device)
    inside = (starts[None] <= years[:, None]) & (years[:, None] <= ends[None])                  # (B, N)
    if not bool(inside.any(-1).all()):
        y = years[~inside.any(-1)][0].item()
        raise ValueError(f"date={y} lies in no slice ({slices}); oracle mode needs the year of each document "
                         "inside a slice, or pass slice_labels")
    return inside.float().argmax(-1)


def equal_log_weights(allowed: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, T, N]: uniform over the allowed experts of each row ([B, N] bool), -inf elsewhere."""
    count = allowed.sum(-1, keepdim=True).float()                                               # (B, 1)
    log_w = torch.where(allowed, -torch.log(count), torch.full_like(count, NEG_INF))
    return log_w[:, None, :].expand(-1, seq_len, -1)


def one_hot_log_weights(index: torch.Tensor, num_experts: int, seq_len: int | None = None) -> torch.Tensor:
    """Weight 1 on ``index`` ([B] or [B, T]), -inf elsewhere: [B, T, N]."""
    if index.dim() == 1:
        index = index[:, None].expand(-1, seq_len)
    log_w = torch.full((*index.shape, num_experts), NEG_INF, device=index.device)
    return log_w.scatter(-1, index[..., None], 0.0)


def router_log_weights(logits: torch.Tensor, allowed: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """[B, T, N] log-softmax of router ``logits`` over the allowed experts ([B, N]), optionally keeping only the
    ``top_k`` best of them per position (renormalised); every other expert gets -inf."""
    masked = logits.masked_fill(~allowed[:, None, :], NEG_INF)
    if top_k is not None and top_k < masked.shape[-1]:
        kth = masked.topk(top_k, dim=-1).values[..., -1:]                                        # (B, T, 1)
        masked = masked.masked_fill(masked < kth, NEG_INF)
    return torch.log_softmax(masked, dim=-1)


def mix_log_probs(log_w: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``logsumexp_k(log w_k + log p_k)``: log_w [B, T, N], log_p [N, B, T] or [N, B, T, V] -> [B, T(, V)].

    Experts with ``log_w = -inf`` contribute an exact zero, whatever their ``log_p`` (which must be finite)."""
    w = log_w.permute(2, 0, 1)                                                                   # (N, B, T)
    if log_p.dim() == 4:
        w = w[..., None]
    return torch.logsumexp(w + log_p, dim=0)


def mix_logits(log_w: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k * logits_k``: log_w [B, T, N], logits [N, B, T, V] -> [B, T, V] (not yet normalised)."""
    w = log_w.exp().permute(2, 0, 1)[..., None]                                                  # (N, B, T, 1)
    return (w * logits).sum(0)


def entropy_of(log_w: torch.Tensor) -> torch.Tensor:
    """Entropy of each weight distribution [..., N] (zero-weight experts count 0)."""
    p = log_w.exp()
    return -(p * log_w.clamp_min(-1e30)).sum(-1)


def nll_to_ppl(nll_sum: float, tokens: int) -> float:
    """Token-weighted perplexity from a summed NLL (nats) over ``tokens`` scored tokens."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")
