"""The interface every MoE layer backend implements, and what its callers (models, trainer, checkpoints) use.

Shapes: (N)umber of local tokens, (H)idden size, (E) routed experts, (P) expert-parallel group size.

A backend is a subclass of :class:`MoELayerBase` (dsmoe's own :class:`dsmoe.moe.MoELayer`, DeepSpeed's native
layer in :class:`dsmoe.moe.deepspeed_layer.DeepSpeedMoELayer`); :func:`dsmoe.moe.build_moe_layer` picks it from
``MoEConfig.backend``. Callers ask the layer through this interface and never check which backend they hold.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .config import MoEConfig
from .stats import MoEStats

KEEP = object()
"""Default of ``forward(capacity_factor=...)``: use the configured capacity factor."""


@dataclass
class MoEOutput:
    hidden_states: torch.Tensor
    """Same shape as the input."""
    aux_loss: torch.Tensor
    """Scalar: weighted sum of the enabled router losses (0 when none is enabled)."""
    stats: MoEStats
    """What this forward did (detached)."""
    router_logits: torch.Tensor | None = None
    """(N, E + null) fp32 router logits of the local tokens (None where the backend does not expose them)."""


@dataclass(frozen=True)
class ExpertShard:
    """Which global experts this rank holds and how their tensors are laid out (for checkpoints).

    Group rank r of a group of size P holds global experts [r*E/P, (r+1)*E/P).
    """

    group: object
    """The layer's expert-parallel process group."""
    local_experts: int
    """E/P: experts held by each rank."""
    stacked: bool
    """True: the local experts are stacked in one tensor per weight ([E/P, ...]; the global tensor is the
    concatenation over ranks, same name); False: one module per local expert whose name carries the local
    index (``...deepspeed_experts.<j>.<weight>``; the global name carries the global index)."""
    parameters: tuple[nn.Parameter, ...]
    """This rank's expert parameters."""


class MoELayerBase(nn.Module, ABC):
    """A Mixture-of-Experts FFN mapping [B, T, H] or [N, H] to the same shape."""

    zero3_compatible: ClassVar[bool] = True
    """Whether DeepSpeed ZeRO stage 3 may partition this backend's parameters."""

    cfg: MoEConfig
    router: nn.Module
    """The module holding the router's parameters (what a router reset re-initialises)."""

    @abstractmethod
    def forward(self, x: torch.Tensor, capacity_factor=KEEP, token_priority: torch.Tensor | None = None,
                ) -> MoEOutput:
        """``capacity_factor`` overrides the configured one for this call (None = dropless);
        ``token_priority`` (x's leading shape) replaces the router weight as the drop order."""

    @abstractmethod
    def apply_expert_parallel(self, group) -> "MoELayerBase":
        """Shard the routed experts over ``group`` (size P; P = 1 leaves the layer as it is)."""

    @property
    @abstractmethod
    def expert_parallel_size(self) -> int:
        """P: ranks sharing this layer's experts (1 = unsharded)."""

    @abstractmethod
    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's routed-expert parameters (the ones expert parallelism shards)."""

    @abstractmethod
    def expert_shard(self) -> ExpertShard | None:
        """How this rank's experts map to the global ones; None when the layer is not sharded (P = 1)."""

    def update_expert_bias(self, group=None) -> torch.Tensor | None:
        """Aux-loss-free balancing step after each optimizer step; None for backends without it."""
        return None

    def check_input(self, x: torch.Tensor) -> None:
        h = self.cfg.hidden_size
        if x.shape[-1] != h or x.dim() not in (2, 3):
            raise ValueError(f"MoELayer expects input [B, T, {h}] or [N, {h}] (MoEConfig.hidden_size={h}), "
                             f"got {list(x.shape)}")


def moe_layers(model: nn.Module) -> list[MoELayerBase]:
    """Every MoE layer of ``model`` (any backend), in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayerBase)]
