"""Top-k router: scores, group-limited selection, aux-loss-free bias, noise and random routing."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig


class RouterOutput(NamedTuple):
    """A NamedTuple so ZeRO-3 can hook its tensors (it re-gathers the router weight for backward through them)."""

    topk_idx: torch.Tensor      # (N, k) long, values in [0, E + n_null); >= E means a null expert
    topk_weight: torch.Tensor   # (N, k) fp32 weights applied to the expert outputs
    probs: torch.Tensor         # (N, C) fp32 per-token routing distribution (for the balance losses)
    logits: torch.Tensor        # (N, C) fp32 raw router logits


class Router(nn.Module):
    """Linear router over E routed + n_null null choices.

    ``expert_bias`` (DeepSeek-V3 aux-loss-free balancing) is a persistent buffer added to the scores of the
    routed experts for *selection only*; the weights come from the unbiased scores. ``load_accum`` counts the
    selections since the last :meth:`update_bias` call.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_choices, cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_choices)) if cfg.router_bias else None
        nn.init.normal_(self.weight, std=cfg.init_std)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)
        self.register_buffer("load_accum", torch.zeros(cfg.num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        cfg = self.cfg
        n = x.shape[0]
        if self.training and cfg.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
        logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        if self.training and cfg.router_temperature != 1.0:
            logits = logits / cfg.router_temperature
        if cfg.score_func == "softmax":
            scores = logits.softmax(-1)
        elif cfg.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits
        probs = scores if cfg.score_func == "softmax" else _normalise(scores)

        if cfg.random_routing:
            topk_idx = torch.rand(n, cfg.num_choices, device=x.device).topk(cfg.top_k, dim=-1).indices
            weight = torch.full((n, cfg.top_k), 1.0 / cfg.top_k, device=x.device)
            return RouterOutput(topk_idx, weight * cfg.routed_scaling_factor, probs, logits)

        choice = scores.detach()
        if cfg.bias_balancing:
            choice = torch.cat([choice[:, : cfg.num_experts] + self.expert_bias, choice[:, cfg.num_experts:]], -1)
        if cfg.num_groups > 1:
            choice = self._limit_groups(choice)
        topk_idx = choice.topk(cfg.top_k, dim=-1).indices
        weight = scores.gather(1, topk_idx)
        if cfg.norm_topk_prob:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        weight = weight * cfg.routed_scaling_factor
        if self.training and cfg.bias_balancing:
            with torch.no_grad():
                real = topk_idx[topk_idx < cfg.num_experts]
                self.load_accum += torch.bincount(real, minlength=cfg.num_experts).to(self.load_accum.dtype)
        return RouterOutput(topk_idx, weight, probs, logits)

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask routed experts outside each token's best ``topk_groups`` groups (null experts stay eligible)."""
        cfg = self.cfg
        n, e = choice.shape[0], cfg.num_experts
        grouped = choice[:, :e].view(n, cfg.num_groups, e // cfg.num_groups)
        if cfg.group_score == "top2_sum" and grouped.shape[-1] >= 2:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.max(-1).values
        top_groups = group_scores.topk(cfg.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        masked = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, e)
        return torch.cat([masked, choice[:, e:]], -1)

    @torch.no_grad()
    def update_bias(self, group=None) -> torch.Tensor | None:
        """Apply bias += rate * sign(mean_load - load) from the loads seen since the last call; reset them.

        ``group``: process group whose ranks' loads are summed first (the data-parallel world), or None.
        Returns the load used, or None when bias balancing is off.
        """
        if not self.cfg.bias_balancing:
            return None
        load = self.load_accum.clone()
        if group is not None or (torch.distributed.is_available() and torch.distributed.is_initialized()):
            torch.distributed.all_reduce(load, group=group)
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.load_accum.zero_()
        return load


def _normalise(scores: torch.Tensor) -> torch.Tensor:
    s = scores.clamp_min(0)
    return s / (s.sum(-1, keepdim=True) + 1e-20)
