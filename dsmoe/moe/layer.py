"""MoELayer: router -> (null / capacity filter) -> row plan -> dispatcher -> experts -> combine (+ shared).

dsmoe's own backend of :class:`dsmoe.moe.interface.MoELayerBase`. Shapes: (N)umber of local tokens, (H)idden
size, (E) routed experts, (k) choices per token, (P) expert-parallel group size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import losses
from .capacity import expert_capacity, keep_within_capacity
from .config import MoEConfig
from .dispatcher import AllToAllDispatcher, LocalDispatcher, TokenDispatcher
from .buckets import MAX_BUCKETS
from .experts import GroupedExperts, SharedExperts
from .interface import KEEP, ExpertShard, MoELayerBase, MoEOutput
from .kernel_choice import KernelChooser
from .router import Router
from .row_plan import combine_rows, gather_rows, plan_rows
from .stats import MoEStats

LAYOUT_BUCKETS = {"padded": 1, "bucketed": MAX_BUCKETS}   # the kernels with the bucket layout: buckets at most


class MoELayer(MoELayerBase):
    """A Mixture-of-Experts FFN with routed, shared and null experts and optional capacity limits.

    Build one with :func:`dsmoe.moe.build_moe_layer` (which picks the backend of ``cfg.backend``) or directly.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if cfg.backend != "dsmoe":
            raise ValueError(f"MoEConfig.backend={cfg.backend!r}: MoELayer is the 'dsmoe' backend; build the layer "
                             f"with dsmoe.moe.build_moe_layer(cfg)")
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg)
        self.shared_experts = SharedExperts(cfg) if cfg.shared_hidden > 0 else None
        self.dispatcher: TokenDispatcher = LocalDispatcher(cfg.num_experts)
        self.kernel_chooser = KernelChooser() if cfg.expert_kernel == "adaptive" else None

    # ------------------------------------------------------------------ parallelism
    def apply_expert_parallel(self, group=None) -> "MoELayer":
        """Shard the routed experts over ``group`` (size P): rank r keeps experts [r*E/P, (r+1)*E/P)."""
        p, r = dist.get_world_size(group), dist.get_rank(group)
        e = self.cfg.num_experts
        if e % p:
            raise ValueError(f"num_experts={e} is not divisible by the expert-parallel group size {p}")
        if self.cfg.expert_kernel in ("padded", "bucketed") and p > 1:
            raise ValueError(f"MoEConfig.expert_kernel={self.cfg.expert_kernel!r} needs every expert on one rank, "
                             f"but the expert-parallel group has {p} ranks: use 'auto', 'grouped' or 'adaptive'")
        if self.experts.num_experts != e:
            raise RuntimeError("apply_expert_parallel was already applied to this layer")
        if p == 1:
            return self
        el = e // p
        with torch.no_grad():
            for name in ("w_in", "w_out"):
                full = getattr(self.experts, name)
                shard = nn.Parameter(full[r * el:(r + 1) * el].clone(), requires_grad=full.requires_grad)
                setattr(self.experts, name, shard)
        self.dispatcher = AllToAllDispatcher(e, group)
        return self

    @property
    def expert_parallel_size(self) -> int:
        return self.dispatcher.world_size

    @property
    def local_expert_range(self) -> tuple[int, int]:
        el = self.dispatcher.num_local_experts
        return self.dispatcher.rank * el, (self.dispatcher.rank + 1) * el

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def expert_shard(self) -> ExpertShard | None:
        if self.expert_parallel_size == 1:
            return None
        return ExpertShard(self.dispatcher.group, self.dispatcher.num_local_experts, True,
                           tuple(self.expert_parameters()))

    def update_expert_bias(self, group=None):
        """Aux-loss-free balancing step; call after each optimizer step (dsmoe's trainer does)."""
        return self.router.update_bias(group)

    # ------------------------------------------------------------------ forward
    def _pick_kernel(self, x: torch.Tensor) -> str | None:
        """"bucketed", "padded" or "grouped" where the layout is the layer's to choose (every expert on this
        rank), else None. "auto" is bucketed on CPU, grouped elsewhere."""
        if self.expert_parallel_size > 1:
            return None
        kernel = self.cfg.expert_kernel
        on_cpu = x.device.type == "cpu"
        if kernel == "adaptive":
            return self.kernel_chooser.pick() if on_cpu else "grouped"
        if kernel == "auto":
            return "bucketed" if on_cpu else "grouped"
        return kernel if kernel in ("padded", "bucketed") else "grouped"

    def forward(self, x: torch.Tensor, capacity_factor=KEEP, token_priority: torch.Tensor | None = None,
                ) -> MoEOutput:
        """x: (B, T, H) or (N, H). ``capacity_factor`` overrides the configured one for this call (warmup);
        ``token_priority`` (same leading shape as x) replaces the router weight as the drop order."""
        cfg = self.cfg
        self.check_input(x)
        shape = x.shape
        x2 = x.reshape(-1, cfg.hidden_size)
        n, k, e = x2.shape[0], cfg.top_k, cfg.num_experts

        r = self.router(x2)
        aux, loss_stats = self._aux_losses(r, shape)

        flat_expert = r.topk_idx.reshape(-1)
        flat_weight = r.topk_weight.reshape(-1)
        keep = flat_expert < e                          # null choices never leave the router
        n_null = (~keep).sum()

        if capacity_factor is KEEP:
            capacity_factor = cfg.capacity_factor
            if not self.training and cfg.eval_capacity_factor is not None:
                capacity_factor = cfg.eval_capacity_factor
        cap = expert_capacity(n, k, e, capacity_factor, cfg.min_capacity, cfg.max_capacity)
        n_dropped = n_null.new_zeros(())
        if cap is not None:
            real = keep.nonzero().squeeze(1)
            if token_priority is not None:
                prio = token_priority.reshape(-1).float()[real // k]
            elif cfg.drop_policy == "probs":
                prio = flat_weight.detach()[real]
            else:
                prio = -(real // k).float()
            kept = keep_within_capacity(flat_expert[real], prio, e, cap)
            keep[real[~kept]] = False
            n_dropped = (~kept).sum()

        # dropless without null experts computes every slot: no filtering (and no host sync)
        filtered = cap is not None or cfg.num_null_experts > 0
        kernel = self._pick_kernel(x2)
        timer = self.kernel_chooser.timer(kernel, n * k) if self.kernel_chooser is not None and kernel else None
        plan = plan_rows(flat_expert, keep if filtered else None, e, k, LAYOUT_BUCKETS.get(kernel))
        counts = plan.routed_counts

        rows = gather_rows(x2, plan)
        if timer is not None:
            rows = timer.input(rows)
        d = self.dispatcher.dispatch(rows, plan.counts)
        shared = self.shared_experts(x2) if self.shared_experts is not None else None  # overlaps the exchange
        d.wait()
        # the routing weights are applied once, where it is cheaper: by the experts before their down projection
        # when it is narrower than the hidden size (and the rows stay on this rank), else by the combine; either
        # way the combine is a sum over the k choices by gathers only: deterministic, no zero-filled buffers
        in_experts = cfg.expert_hidden_size < cfg.hidden_size and self.expert_parallel_size == 1
        y = self.experts(d.tokens, d.counts, plan.row_weights(flat_weight) if in_experts else None, plan.buckets)
        if timer is not None:
            y = timer.output(y)
        y = self.dispatcher.combine(y, d)
        out = combine_rows(y, plan, None if in_experts else flat_weight)
        if shared is not None:
            out = out + shared

        stats_vec = torch.cat([counts, torch.stack([n_dropped, n_null, n_null.new_tensor(flat_expert.numel())])])
        stats_vec = self.dispatcher.all_reduce(stats_vec)
        stats = MoEStats(tokens_per_expert=stats_vec[:e], dropped_tokens=int(stats_vec[e]),
                         null_fraction=float(stats_vec[e + 1]) / max(int(stats_vec[e + 2]), 1), capacity=cap,
                         capacity_factor=capacity_factor, **loss_stats)
        return MoEOutput(out.view(shape), aux, stats, r.logits)

    def _aux_losses(self, r, shape) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the enabled router losses, and each unweighted (for :class:`MoEStats`)."""
        cfg = self.cfg
        aux = r.logits.new_zeros(())
        stats: dict[str, torch.Tensor] = {}
        if cfg.random_routing:
            return aux, stats
        if cfg.aux_loss_coef:
            lb = losses.load_balance_loss(r.probs, r.topk_idx, cfg.num_experts)
            aux = aux + cfg.aux_loss_coef * lb
            stats["load_balance_loss"] = lb.detach()
        if cfg.seq_aux_loss_coef:
            b = shape[0] if len(shape) == 3 else 1
            seq = losses.load_balance_loss(r.probs.view(b, -1, cfg.num_choices),
                                           r.topk_idx.view(b, -1, cfg.top_k), cfg.num_experts)
            aux = aux + cfg.seq_aux_loss_coef * seq
            stats["seq_balance_loss"] = seq.detach()
        if cfg.z_loss_coef:
            z = losses.z_loss(r.logits)
            aux = aux + cfg.z_loss_coef * z
            stats["z_loss"] = z.detach()
        if cfg.entropy_loss_coef:
            ent = losses.entropy_loss(r.probs)
            aux = aux + cfg.entropy_loss_coef * ent
            stats["entropy_loss"] = ent.detach()
        return aux, stats

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, block: nn.Module, hf_config) -> "MoELayer":
        """Build a layer holding the weights of a transformers MoE block (Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE)."""
        from .hf import layer_from_hf
        return layer_from_hf(cls, block, hf_config)

    def to_hf(self, block: nn.Module) -> nn.Module:
        """Write this layer's weights back into a transformers MoE block of the matching family."""
        from .hf import layer_to_hf
        return layer_to_hf(self, block)
