"""The one dense feed-forward block: SwiGLU ``down(silu(gate(x)) * up(x))`` or GELU ``down(gelu(up(x)))``.

Parameter names follow transformers (``gate_proj``, ``up_proj``, ``down_proj``), so weights map one to one onto
Llama / Mixtral / Qwen MLPs. Used for shared experts, DeepSpeed-backend experts and RoutedLM's dense FFNs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .swiglu import swiglu

ACTIVATIONS = ("swiglu", "gelu")


class MLP(nn.Module):
    """hidden_size -> ffn_size -> hidden_size, without biases by default.

    ``fused=True`` (SwiGLU only) computes gate and up with one ``gate_up_proj`` Linear(H, 2F) [gate | up]: one
    matmul instead of two, and the fused SwiGLU (:func:`dsmoe.moe.swiglu.swiglu`) after it: the fastest dense FFN,
    used as the speed ceiling in benchmarks.
    """

    def __init__(self, hidden_size: int, ffn_size: int, activation: str = "swiglu", bias: bool = False,
                 fused: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP activation={activation!r}: must be one of {ACTIVATIONS}")
        if fused and activation != "swiglu":
            raise ValueError("MLP fused=True: only the SwiGLU MLP has a gate to fuse")
        self.activation, self.ffn_size = activation, ffn_size
        if fused:
            self.gate_up_proj = nn.Linear(hidden_size, 2 * ffn_size, bias=bias)
        else:
            self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=bias) if activation == "swiglu" else None
            self.up_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=bias)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down_proj(swiglu(self.gate_up_proj(x)))
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))
