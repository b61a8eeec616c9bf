"""The causal prefix router: gate logits at position t from the tokens at positions <= t only.

The router embeds every token it may read, keeps a running mean of those embeddings over the prefix (tokens it
must not read, such as padding or a prompt prefix that states the year, are left out of the mean), and maps
each prefix mean to one logit per expert with a Linear (the time-aware mixture's router) or a Linear-ReLU-Linear
(the period gate). Its logits at t weight the experts' predictions of token t+1, so the router never sees the
token it helps to predict. A position with nothing read yet gets the logits of an empty prefix (the head's bias).

For generation the running sum and count are carried between calls in a :class:`RouterState`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RouterState:
    """Running prefix statistics of each row: ``total`` [B, D] summed embeddings, ``count`` [B] tokens read."""

    total: torch.Tensor
    count: torch.Tensor


class PrefixRouter(nn.Module):
    """Router over ``num_experts`` on mean-pooled causal prefixes of a ``vocab_size`` vocabulary."""

    def __init__(self, vocab_size: int, num_experts: int, embed_dim: int, hidden_size: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        if hidden_size:
            self.head = nn.Sequential(nn.Linear(embed_dim, hidden_size), nn.ReLU(), nn.Linear(hidden_size, num_experts))
        else:
            self.head = nn.Linear(embed_dim, num_experts)

    def forward(self, input_ids: torch.Tensor, read_mask: torch.Tensor | None = None,
                state: RouterState | None = None) -> tuple[torch.Tensor, RouterState]:
        """Logits [B, T, N] and the state after the last position. ``read_mask`` [B, T] (True = the router
        reads this token); ``state``: the prefix read by earlier calls (generation)."""
        e = self.embed(input_ids)                                                   # (B, T, D)
        m = torch.ones_like(input_ids, dtype=e.dtype) if read_mask is None else read_mask.to(e.dtype)
        total = torch.cumsum(e * m[..., None], dim=1)                               # (B, T, D)
        count = torch.cumsum(m, dim=1)                                              # (B, T)
        if state is not None:
            total = total + state.total[:, None, :]
            count = count + state.count[:, None]
        pooled = total / count.clamp_min(1.0)[..., None]
        return self.head(pooled), RouterState(total[:, -1].detach(), count[:, -1].detach())
