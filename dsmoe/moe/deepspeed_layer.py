"""``backend="deepspeed"``: the MoELayer interface over DeepSpeed's native ``deepspeed.moe.layer.MoE``.

``build_moe_layer(cfg)`` returns a :class:`DeepSpeedMoELayer` when ``cfg.backend == "deepspeed"``. It exists so a
model can be trained with DeepSpeed's own gate, capacity-padded all-to-all and expert checkpoint format
(ZeRO-1/2 only: DeepSpeed refuses native MoE under ZeRO-3), e.g. as a reference for the dsmoe backend.

Only options DeepSpeed implements are accepted; anything else raises ``ValueError`` naming the
``MoEConfig`` field (see :func:`check_deepspeed_config`). Semantics decided here, read off
``deepspeed/moe/sharded_moe.py`` (0.19):

* Routing is softmax top-k without a router bias, temperature or scaling. The 2nd expert of top-2 is chosen
  deterministically (``top2_2nd_expert_sampling=False``), like dsmoe; DeepSpeed's default samples it.
* Weights: top_k == 1 scales the expert output by the softmax probability, so ``norm_topk_prob`` must be
  False; top_k >= 2 renormalises the chosen probabilities, so it must be True. After a capacity drop
  DeepSpeed renormalises over the choices that *survived* (a token keeping one of two experts gets weight 1);
  dsmoe keeps the pre-drop weights.
* Drop order (capacity_factor set): DeepSpeed has no purely position-based order, so ``drop_policy="position"``
  is refused. ``"probs"`` is accepted and means DeepSpeed's own order, which depends on top_k: k=1 drops
  uniformly random tokens (Random Token Selection), k=2 keeps all first choices before any second choice and
  earlier tokens first within each, k>=3 keeps the highest softmax probabilities (dsmoe ranks by the
  normalised weight instead, which can order tokens differently). Dropless (capacity_factor None) routing is
  identical to dsmoe's.
* ``aux_loss = aux_loss_coef * l_aux`` with DeepSpeed's balance loss. For k=1 and k>=3 it equals dsmoe's
  ``load_balance_loss``; for k=2 DeepSpeed counts only the first choice in the load fraction.
* Shared experts are refused (``num_shared_experts``): use ``use_residual=True`` (PR-MoE, a dense MLP mixed by a
  learned 2-way softmax, not added) or ``backend="dsmoe"``. No null experts, z/entropy/sequence losses,
  sigmoid scores, group-limited routing, bias balancing or random routing. ``router_jitter`` is refused:
  ``noisy_gate_policy="Jitter"`` is DeepSpeed's (fixed eps 0.01); ``"RSample"`` is top_k == 1 only.
* With top_k == 1 DeepSpeed asserts there are at least ``min_capacity`` tokens per rank, even dropless.

Stats: the gate's routes are captured by a forward hook, so ``tokens_per_expert`` counts the *computed*
assignments (after dropping) summed over the EP group, exactly like dsmoe, and ``dropped_tokens`` is the
number of dropped assignments over the EP group. ``routed_per_expert`` is DeepSpeed's ``exp_counts`` (before
dropping) summed over the group. ``router_logits`` is None (DeepSpeed does not expose them).

Distributed state: with ep_size 1 (no :meth:`DeepSpeedMoELayer.apply_expert_parallel`) forward and backward
need no process group at all, so single-process debugging works without ``init_distributed``;
``deepspeed.initialize`` later creates DeepSpeed's ``ep_size_1`` groups itself. ``apply_expert_parallel``
needs torch.distributed initialised (``deepspeed.init_distributed()``; a torch-initialised group is adopted).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups as ds_groups
from torch import nn

from ..deepspeed_comm import init_deepspeed_comm
from .config import MoEConfig, OptionError
from .interface import KEEP, ExpertShard, MoELayerBase, MoEOutput
from .mlp import MLP
from .stats import MoEStats


def _bad(cfg: MoEConfig, name: str, why: str) -> OptionError:
    return OptionError("MoEConfig", name, lambda f: getattr(cfg, f),
                       f"is not supported with backend='deepspeed': {why}")


def check_deepspeed_config(cfg: MoEConfig) -> None:
    """Raise ``ValueError`` naming the first field of ``cfg`` that DeepSpeed's native MoE cannot honour."""
    if cfg.num_null_experts > 0:
        raise _bad(cfg, "num_null_experts", "DeepSpeed has no null experts; use backend='dsmoe'")
    if cfg.score_func != "softmax":
        raise _bad(cfg, "score_func", "DeepSpeed's gate is softmax only")
    if cfg.num_groups > 1:
        raise _bad(cfg, "num_groups", "DeepSpeed has no group-limited routing; use backend='dsmoe'")
    if cfg.bias_balancing:
        raise _bad(cfg, "bias_balancing", "DeepSpeed has no aux-loss-free bias balancing; use backend='dsmoe'")
    if cfg.random_routing:
        raise _bad(cfg, "random_routing", "DeepSpeed always routes with its gate; use backend='dsmoe'")
    if cfg.num_shared_experts > 0:
        raise _bad(cfg, "num_shared_experts", "DeepSpeed has no additive shared experts; use use_residual=True "
                   "for PR-MoE (a dense MLP mixed by a learned coefficient) or backend='dsmoe'")
    if cfg.shared_hidden > 0:
        raise _bad(cfg, "shared_expert_hidden_size", "DeepSpeed has no shared experts; use use_residual=True "
                   "or backend='dsmoe'")
    for name in ("seq_aux_loss_coef", "z_loss_coef", "entropy_loss_coef"):
        if getattr(cfg, name):
            raise _bad(cfg, name, "DeepSpeed computes only its load-balancing loss (aux_loss_coef); "
                       "set it to 0 or use backend='dsmoe'")
    if cfg.router_bias:
        raise _bad(cfg, "router_bias", "DeepSpeed's gate has no bias")
    if cfg.router_temperature != 1.0:
        raise _bad(cfg, "router_temperature", "DeepSpeed's gate has no temperature")
    if cfg.router_jitter:
        raise _bad(cfg, "router_jitter", "use noisy_gate_policy='Jitter' (DeepSpeed's fixed eps 0.01)")
    if cfg.routed_scaling_factor != 1.0:
        raise _bad(cfg, "routed_scaling_factor", "DeepSpeed does not scale the routed weights")
    if cfg.max_capacity is not None:
        raise _bad(cfg, "max_capacity", "DeepSpeed has no upper bound on the expert capacity")
    if cfg.noisy_gate_policy not in (None, "Jitter", "RSample"):
        raise _bad(cfg, "noisy_gate_policy", "must be None, 'Jitter' or 'RSample'")
    if cfg.noisy_gate_policy == "RSample" and cfg.top_k != 1:
        raise _bad(cfg, "noisy_gate_policy", "DeepSpeed applies 'RSample' only with top_k=1 (it would be ignored)")
    if cfg.top_k == 1 and cfg.norm_topk_prob:
        raise _bad(cfg, "norm_topk_prob", "with top_k=1 DeepSpeed scales the expert output by the softmax "
                   "probability; set norm_topk_prob=False")
    if cfg.top_k >= 2 and not cfg.norm_topk_prob:
        raise _bad(cfg, "norm_topk_prob", "with top_k>=2 DeepSpeed always renormalises the chosen weights")
    train_dropless = cfg.capacity_factor is None or math.isinf(cfg.capacity_factor)
    ecf = cfg.eval_capacity_factor
    if ecf is not None and train_dropless != math.isinf(ecf):
        raise _bad(cfg, "eval_capacity_factor", "DeepSpeed's drop_tokens is one flag for training and eval: "
                   "dropless in one mode means dropless in both")
    if not train_dropless and cfg.drop_policy == "position":
        raise _bad(cfg, "drop_policy", "DeepSpeed never drops purely by position (k=1: random tokens, "
                   "k=2: second choices first, k>=3: lowest probability); use 'probs' (= DeepSpeed's order)")


DeepSpeedExpertMLP = MLP
"""One expert, hidden_size -> expert_hidden_size -> hidden_size, without biases (HF naming)."""


class _NativeMoE(MoE):
    """DeepSpeed's MoE whose ``set_deepspeed_parallelism`` may be called again (the engine calls it in
    ``deepspeed.initialize`` after :meth:`DeepSpeedMoELayer.apply_expert_parallel` already wired the group;
    DeepSpeed's gate asserts on a second call)."""

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        if self.deepspeed_moe.ep_group is not None:
            return
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)


class DeepSpeedMoELayer(MoELayerBase):
    """The MoE-layer interface (:class:`~dsmoe.moe.interface.MoELayerBase`) over ``deepspeed.moe.layer.MoE``
    (see the module docstring).

    The DeepSpeed module is ``self.moe``; its expert parameters are tagged by DeepSpeed itself
    (``allreduce=False``, ``group_name="ep_size_N"``). Construction initialises all ``num_experts`` experts
    from the torch RNG (same seed on every rank => same global experts);
    :meth:`apply_expert_parallel` rebuilds the DeepSpeed module with ``ep_size = P`` keeping this rank's experts.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if cfg.backend != "deepspeed":
            raise ValueError(f"MoEConfig.backend={cfg.backend!r}: DeepSpeedMoELayer needs backend='deepspeed'")
        check_deepspeed_config(cfg)
        self.cfg = cfg
        self._ep_applied = False
        self._gate_out: tuple | None = None
        self.moe = self._build(ep_size=1)
        std = cfg.init_std
        with torch.no_grad():
            self.gate.wg.weight.normal_(std=std)
            for expert in self.experts:                     # global expert order
                for lin in (expert.gate_proj, expert.up_proj, expert.down_proj):
                    if lin is not None:
                        lin.weight.normal_(std=std)
            if cfg.use_residual:
                for m in self.moe.mlp.modules():
                    if isinstance(m, nn.Linear):
                        m.weight.normal_(std=std)
                self.moe.coefficient.weight.normal_(std=std)
                self.moe.coefficient.bias.zero_()

    # ------------------------------------------------------------------ construction
    def _build(self, ep_size: int) -> _NativeMoE:
        cfg = self.cfg
        dropless = cfg.capacity_factor is None or math.isinf(cfg.capacity_factor)
        cf = 1.0 if dropless else float(cfg.capacity_factor)
        ecf = cf if dropless or cfg.eval_capacity_factor is None else float(cfg.eval_capacity_factor)
        moe = _NativeMoE(hidden_size=cfg.hidden_size,
                         expert=DeepSpeedExpertMLP(cfg.hidden_size, cfg.expert_hidden_size, cfg.activation),
                         num_experts=cfg.num_experts, ep_size=ep_size, k=cfg.top_k, capacity_factor=cf,
                         eval_capacity_factor=ecf, min_capacity=cfg.min_capacity, use_residual=cfg.use_residual,
                         noisy_gate_policy=cfg.noisy_gate_policy, drop_tokens=not dropless, use_rts=True,
                         use_tutel=False, enable_expert_tensor_parallelism=False, top2_2nd_expert_sampling=False)
        moe.deepspeed_moe.gate.register_forward_hook(self._capture_gate)
        return moe

    def _capture_gate(self, module, args, output) -> None:
        self._gate_out = output

    zero3_compatible = False          # DeepSpeed refuses its native MoE under ZeRO stage 3

    @property
    def router(self) -> nn.Module:
        """DeepSpeed's gate (its ``wg.weight`` is the router weight)."""
        return self.gate

    @property
    def gate(self) -> nn.Module:
        """DeepSpeed's ``TopKGate``; its ``wg.weight`` (E, H) is the router weight."""
        return self.moe.deepspeed_moe.gate

    @property
    def experts(self) -> nn.ModuleList:
        """This rank's experts (:class:`DeepSpeedExpertMLP`), local index order."""
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    # ------------------------------------------------------------------ parallelism
    def apply_expert_parallel(self, group=None) -> "DeepSpeedMoELayer":
        """Shard the experts over ``group`` (size P, default: the world): group rank r keeps global experts
        [r*E/P, (r+1)*E/P). Call after ``deepspeed.init_distributed()`` and before building the optimizer /
        ``deepspeed.initialize``; collective (all ranks of the world must call it, since DeepSpeed creates
        its ``ep_size_P`` groups over the whole world).

        ``group`` must be DeepSpeed's own expert-parallel group for P (``ep_size_P``: consecutive ranks
        [i*P, (i+1)*P) by default), else ``ValueError``.
        """
        import deepspeed

        if self._ep_applied:
            raise RuntimeError("apply_expert_parallel was already applied to this layer")
        if not dist.is_initialized():
            raise RuntimeError("apply_expert_parallel needs torch.distributed: call deepspeed.init_distributed() "
                               "first")
        if not deepspeed.comm.is_initialized():          # torch-initialised: let deepspeed.comm adopt it
            init_deepspeed_comm(dist_backend=dist.get_backend())
        group = group if group is not None else dist.group.WORLD
        p, world = dist.get_world_size(group), dist.get_world_size()
        e = self.cfg.num_experts
        if e % p:
            raise ValueError(f"MoEConfig.num_experts={e} is not divisible by the expert-parallel group size {p}")
        if world % p:
            raise ValueError(f"expert-parallel group size {p} does not divide the world size {world} "
                             "(DeepSpeed tiles the world with ep_size groups)")
        new = self._build(ep_size=p) if p > 1 else self.moe
        new.set_deepspeed_parallelism()                  # creates or reuses DeepSpeed's ep_size_{p} groups
        ds_ranks = list(ds_groups._get_expert_parallel_group_ranks(new.expert_group_name))
        ranks = dist.get_process_group_ranks(group)
        if ds_ranks != ranks:
            raise ValueError(f"the expert-parallel group (ranks {ranks}) is not DeepSpeed's "
                             f"'{new.expert_group_name}' group for this rank (ranks {ds_ranks}); pass that group, "
                             "e.g. deepspeed.utils.groups._get_expert_parallel_group('ep_size_P')")
        if new is not self.moe:
            el, r = e // p, dist.get_rank(group)
            old_experts = self.experts
            with torch.no_grad():
                pairs = [(new.deepspeed_moe.gate, self.gate)]
                pairs += [(new.deepspeed_moe.experts.deepspeed_experts[j], old_experts[r * el + j]) for j in range(el)]
                if self.cfg.use_residual:
                    pairs += [(new.mlp, self.moe.mlp), (new.coefficient, self.moe.coefficient)]
                for dst, src in pairs:
                    for (nd, pd), (ns, ps) in zip(dst.named_parameters(), src.named_parameters(), strict=True):
                        assert nd == ns, (nd, ns)
                        pd.data = ps.detach().clone()
                        pd.requires_grad_(ps.requires_grad)
            self.moe = new
        self._ep_applied = True
        return self

    @property
    def expert_parallel_size(self) -> int:
        return self.moe.ep_size

    @property
    def local_expert_range(self) -> tuple[int, int]:
        el = self.moe.num_local_experts
        group = self.moe.deepspeed_moe.ep_group
        r = dist.get_rank(group) if self.expert_parallel_size > 1 else 0
        return r * el, (r + 1) * el

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def expert_shard(self) -> ExpertShard | None:
        if self.expert_parallel_size == 1:
            return None
        return ExpertShard(self.moe.deepspeed_moe.ep_group, self.moe.num_local_experts, False,
                           tuple(self.expert_parameters()))

    @property
    def capacity_factor(self) -> float | None:
        """Training capacity factor (None = dropless). Setting it changes DeepSpeed's gate persistently;
        setting None makes evaluation dropless too (DeepSpeed has one drop_tokens flag)."""
        return self.gate.capacity_factor if self.gate.drop_tokens else None

    @capacity_factor.setter
    def capacity_factor(self, value: float | None) -> None:
        dropless = value is None or math.isinf(value)
        self.gate.drop_tokens = not dropless
        self.gate.capacity_factor = 1.0 if dropless else float(value)
        if dropless:
            self.gate.eval_capacity_factor = 1.0

    @contextmanager
    def _capacity_override(self, capacity_factor):
        if capacity_factor is KEEP:
            yield
            return
        gate = self.gate
        saved = gate.capacity_factor, gate.eval_capacity_factor, gate.drop_tokens
        dropless = capacity_factor is None or math.isinf(capacity_factor)
        gate.drop_tokens = not dropless
        gate.capacity_factor = gate.eval_capacity_factor = 1.0 if dropless else float(capacity_factor)
        try:
            yield
        finally:
            gate.capacity_factor, gate.eval_capacity_factor, gate.drop_tokens = saved

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, capacity_factor=KEEP, token_priority: torch.Tensor | None = None,
                ) -> MoEOutput:
        """x: (B, T, H) or (N, H). ``capacity_factor`` overrides the configured one for this call (all ranks of
        the EP group must agree). ``token_priority`` is not supported (DeepSpeed's gate picks the drop order)."""
        cfg = self.cfg
        self.check_input(x)
        if token_priority is not None:
            raise ValueError("token_priority is not supported with backend='deepspeed'")
        n = x.numel() // cfg.hidden_size
        if cfg.top_k == 1 and n < cfg.min_capacity:
            raise ValueError(f"MoEConfig.min_capacity={cfg.min_capacity}: DeepSpeed's top-1 gate needs at least "
                             f"min_capacity tokens per rank, got {n}")
        e = cfg.num_experts
        self._gate_out = None
        with self._capacity_override(capacity_factor):
            out, l_aux, _ = self.moe(x)
            drop_tokens = self.gate.drop_tokens
            cf_used = (self.gate.capacity_factor if self.training else self.gate.eval_capacity_factor) \
                if drop_tokens else None
        g, self._gate_out = self._gate_out, None
        if g is None:
            raise RuntimeError("DeepSpeed's gate did not run (forward hook missing)")
        if len(g) == 7:     # sparse routes: (l_aux, C, E, indices[k, S] (-1 = dropped), locations, gates, exp_counts)
            cap, idx, routed = int(g[1]), g[3].detach().reshape(-1).long(), g[6]
            kept = torch.bincount(idx[idx >= 0], minlength=e)
        else:               # dense (older DeepSpeed): (l_aux, combine_weights[S, E, C], dispatch_mask, exp_counts)
            cap, routed = g[2].shape[-1], g[3]
            kept = g[2].sum(dim=(0, 2))
        vec = torch.cat([kept.to(torch.long), routed.detach().to(kept.device, torch.long)])
        if self.expert_parallel_size > 1:
            vec = vec.clone()
            dist.all_reduce(vec, group=self.moe.deepspeed_moe.ep_group)
        tokens_per_expert, routed_per_expert = vec[:e], vec[e:]
        stats = MoEStats(tokens_per_expert=tokens_per_expert,
                         dropped_tokens=int(routed_per_expert.sum() - tokens_per_expert.sum()), null_fraction=0.0,
                         capacity=cap if drop_tokens else None,
                         capacity_factor=cf_used,
                         routed_per_expert=routed_per_expert,
                         load_balance_loss=l_aux.detach() if cfg.aux_loss_coef else None)
        aux = cfg.aux_loss_coef * l_aux if cfg.aux_loss_coef else l_aux.new_zeros(()).detach()
        return MoEOutput(out, aux, stats, None)
