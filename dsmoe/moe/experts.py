"""Routed experts with stacked weights: grouped GEMM, batched GEMMs over buckets of padded experts, or a loop."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .buckets import ExpertBuckets, bucketed_matmul
from .config import MoEConfig
from .mlp import MLP
from .swiglu import swiglu


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Where torch's grouped GEMM runs: CPU (fp32/bf16) and bf16 on Hopper+; 16-byte aligned rows."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.device.type != "cpu":
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and w.shape[-1] % align == 0


def _grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor | None):
    """x (N, K) rows grouped by expert (counts (E,)), w (E, K, M) -> (N, M)."""
    if offs is not None:
        return torch._grouped_mm(x, w, offs=offs)
    chunks = x.split(counts.tolist())
    return torch.cat([c @ w[e] for e, c in enumerate(chunks)]) if chunks else x.new_zeros(0, w.shape[-1])


class GroupedExperts(nn.Module):
    """E experts as stacked tensors: ``w_in`` (E, H, F) or (E, H, 2F) for SwiGLU [gate | up], ``w_out`` (E, F, H).

    How the rows are multiplied follows their layout: in buckets of padded experts (the layer's "bucketed",
    "padded" and, on CPU, "auto" kernels) one ``bmm`` per bucket and projection (:mod:`dsmoe.moe.buckets`);
    grouped by expert, ``torch._grouped_mm`` where it runs, else (and for ``expert_kernel="loop"``, the exact
    reference) one matmul per expert.
    """

    def __init__(self, cfg: MoEConfig, num_experts: int | None = None):
        super().__init__()
        e = cfg.num_experts if num_experts is None else num_experts
        h, f = cfg.hidden_size, cfg.expert_hidden_size
        self.activation = cfg.activation
        self.kernel = cfg.expert_kernel
        self.ffn = f
        n_in = 2 * f if cfg.activation == "swiglu" else f
        self.w_in = nn.Parameter(torch.empty(e, h, n_in))
        self.w_out = nn.Parameter(torch.empty(e, f, h))
        nn.init.normal_(self.w_in, std=cfg.init_std)
        nn.init.normal_(self.w_out, std=cfg.init_std)

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_weight: torch.Tensor | None = None,
                buckets: ExpertBuckets | None = None) -> torch.Tensor:
        """x (R, H) grouped by expert, counts (E_local,) long with sum R -> (R, H).

        ``row_weight`` (R,) scales each row before the down projection (the routing weights: a row of weight
        0 then gives exactly 0). ``buckets``: x is in that bucket layout instead (``counts`` unused).
        """
        if x.shape[0] == 0:
            # depend on x (so backward still runs the dispatcher's all-to-all, which every rank must join) and on
            # the weights (so every rank produces zero grads for them)
            return x * 0 + 0 * (self.w_in.sum() + self.w_out.sum())
        w_in, w_out = self.w_in.to(x.dtype), self.w_out.to(x.dtype)
        if buckets is not None:
            h = bucketed_matmul(x, w_in, buckets)
            return bucketed_matmul(self._activate(h, row_weight), w_out, buckets)
        offs = None
        if self.kernel != "loop" and grouped_mm_supported(x, w_in) \
                and grouped_mm_supported(x, w_out.transpose(1, 2)):
            offs = torch.cumsum(counts, 0).to(torch.int32)
        h = _grouped_matmul(x, w_in, counts, offs)
        return _grouped_matmul(self._activate(h, row_weight), w_out, counts, offs)

    def _activate(self, h: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
        if self.activation == "swiglu":
            return swiglu(h, row_weight)
        h = F.gelu(h)
        return h if row_weight is None else h * row_weight.to(h.dtype).unsqueeze(1)


class SharedExperts(MLP):
    """Always-on dense MLP (the fused shared experts) with an optional sigmoid gate (Qwen2-MoE)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg.hidden_size, cfg.shared_hidden, cfg.activation)
        self.gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gate else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out
