"""A deliberately naive per-token MoE reference, independent of the layer's sort/dispatch machinery."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def naive_moe(layer, x: torch.Tensor, capacity_factor=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Recompute ``layer(x)`` token by token from its weights. Returns (out, tokens_per_expert, dropped)."""
    cfg = layer.cfg
    x2 = x.reshape(-1, cfg.hidden_size)
    n, e, k = x2.shape[0], cfg.num_experts, cfg.top_k
    r = layer.router(x2)
    assignments = [(t, s, int(r.topk_idx[t, s]), r.topk_weight[t, s]) for t in range(n) for s in range(k)
                   if int(r.topk_idx[t, s]) < e]
    dropped = 0
    if capacity_factor is not None:
        cap = max(math.ceil(capacity_factor * n * k / e), cfg.min_capacity)
        if cfg.max_capacity is not None:
            cap = min(cap, cfg.max_capacity)
        kept = []
        for ex in range(e):
            mine = [a for a in assignments if a[2] == ex]
            if cfg.drop_policy == "probs":
                mine.sort(key=lambda a: -float(a[3].detach()))       # stable: earlier assignment wins ties
            kept += mine[:cap]
            dropped += max(len(mine) - cap, 0)
        assignments = kept
    out = torch.zeros_like(x2)
    counts = torch.zeros(e, dtype=torch.long)
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    for t, _s, ex, w in assignments:
        h = x2[t] @ w_in[ex]
        if cfg.activation == "swiglu":
            g, u = h.split(cfg.expert_hidden_size)
            h = F.silu(g) * u
        else:
            h = F.gelu(h)
        out[t] = out[t] + w * (h @ w_out[ex])
        counts[ex] += 1
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x2)
    return out.view(x.shape), counts, dropped
