"""Router auxiliary losses. All take fp32 router tensors of one layer and return scalars."""
from __future__ import annotations

import torch


def load_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard balance loss over [..., N, C] probs and [..., N, k] choices, null experts pooled.

    Routed experts i < E contribute f_i * P_i; the C - E null experts count as one bucket, contributing
    f_null * P_null / n_null. This equals the standard loss over C choices when null load is spread evenly,
    does not care how it is spread among the (identical) null experts, and is minimised by a null share of
    n_null / C. Scaled by C so a uniform router scores 1. Leading dims are batched (averaged).
    """
    c = probs.shape[-1]
    counts = torch.zeros(*topk_idx.shape[:-2], c, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(-1, topk_idx.flatten(-2), torch.ones_like(topk_idx.flatten(-2), dtype=probs.dtype))
    f = counts / (topk_idx.shape[-2] * topk_idx.shape[-1])
    p = probs.mean(-2)
    loss = (f[..., :num_experts] * p[..., :num_experts]).sum(-1)
    n_null = c - num_experts
    if n_null:
        loss = loss + f[..., num_experts:].sum(-1) * p[..., num_experts:].sum(-1) / n_null
    return (loss * c).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition of the router logits."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def entropy_loss(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the per-token routing distribution."""
    return -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1).mean()
