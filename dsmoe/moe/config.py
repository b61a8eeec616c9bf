"""Typed configuration of one MoE layer."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

SCORE_FUNCS = ("softmax", "sigmoid", "identity")
DROP_POLICIES = ("probs", "position")
ACTIVATIONS = ("swiglu", "gelu")
BACKENDS = ("dsmoe", "deepspeed")
EXPERT_KERNELS = ("auto", "grouped", "bucketed", "padded", "adaptive", "loop")
GROUP_SCORES = ("top2_sum", "max")


class OptionError(ValueError):
    """A bad option value that knows which option(s) it is about, so a config that builds :class:`MoEConfig`
    from its own options (e.g. ``RoutedLMConfig``) can report it in its own names (:meth:`text`).

    ``why`` may refer to other options as ``{name}`` placeholders (listed in ``related``); they are written as
    ``Owner.name=value``.
    """

    def __init__(self, owner: str, field: str, values: Callable[[str], Any], why: str, related: tuple = ()):
        self.field, self.why, self.related = field, why, tuple(related)
        super().__init__(self.text(owner, lambda f: f, values))

    def text(self, owner: str, name: Callable[[str], str], value: Callable[[str], Any]) -> str:
        """The message with options renamed by ``name`` and their values read through ``value``."""
        rel = {f: f"{owner}.{name(f)}={value(f)!r}" for f in self.related}
        return f"{owner}.{name(self.field)}={value(self.field)!r}: {self.why.format(**rel)}"


@dataclass
class MoEConfig:
    """Configuration of a :class:`dsmoe.moe.MoELayer`.

    Every field is validated in ``__post_init__``; a bad value raises :class:`OptionError` (a ``ValueError``)
    naming the field.
    """

    hidden_size: int
    """Model width H: the layer maps [.., H] -> [.., H]."""
    expert_hidden_size: int
    """Inner width F of each routed expert."""
    num_experts: int
    """Number of routed (real, computing) experts E."""
    top_k: int = 2
    """Choices per token, counted over routed + null experts."""
    num_shared_experts: int = 0
    """Always-on experts computed on the local rank and added to the routed output (DeepSeek style)."""
    shared_expert_hidden_size: int | None = None
    """Inner width of the fused shared expert; default ``num_shared_experts * expert_hidden_size``."""
    shared_expert_gate: bool = False
    """Scale the shared output by ``sigmoid(Linear(H, 1)(x))`` (Qwen2-MoE)."""
    num_null_experts: int = 0
    """Extra router choices that compute nothing: the token keeps only its residual for that slot."""
    capacity_factor: float | None = None
    """None = dropless; else capacity = clamp(ceil(cf * local_tokens * top_k / E), min, max)."""
    eval_capacity_factor: float | None = None
    """Capacity factor used in eval mode; default: ``capacity_factor``."""
    min_capacity: int = 4
    """Lower bound of the per-expert capacity."""
    max_capacity: int | None = None
    """Upper bound of the per-expert capacity (None = unbounded)."""
    drop_policy: str = "probs"
    """Which overflow assignments are dropped: "probs" (lowest weight first) or "position" (latest tokens first)."""
    score_func: str = "softmax"
    """Router scores: "softmax", "sigmoid" or "identity" (raw logits)."""
    num_groups: int = 1
    """Group-limited routing: experts are split into this many groups ..."""
    topk_groups: int = 1
    """... and each token picks its experts from its best ``topk_groups`` groups only."""
    group_score: str = "top2_sum"
    """Group score: "top2_sum" (DeepSeek-V3) or "max" (DeepSeek-V2)."""
    norm_topk_prob: bool = True
    """Renormalise the k chosen weights to sum to 1 (null choices included)."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed weights after normalisation (DeepSeek-V3)."""
    router_bias: bool = False
    """Give the router's linear layer a bias term."""
    router_temperature: float = 1.0
    """Router logits are divided by this during training."""
    router_jitter: float = 0.0
    """Multiplicative input noise U(1-eps, 1+eps) on the router input during training (Switch)."""
    random_routing: bool = False
    """Ignore the router: choose k experts uniformly at random with weight 1/k (no gating network)."""
    bias_balancing: bool = False
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to scores for selection only."""
    bias_update_rate: float = 1e-3
    """Bias update after each optimizer step: bias += rate * sign(mean_load - load)."""
    aux_loss_coef: float = 0.0
    """Weight of the batch-level load-balancing loss (Switch/GShard; null experts pooled)."""
    seq_aux_loss_coef: float = 0.0
    """Weight of the sequence-level balance loss (DeepSeek-V3); needs [B, T, H] input."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss mean(logsumexp(logits)^2) (ST-MoE)."""
    entropy_loss_coef: float = 0.0
    """Weight of the mean router entropy (positive = encourage confident routing)."""
    activation: str = "swiglu"
    """Expert MLP: "swiglu" or "gelu"."""
    backend: str = "dsmoe"
    """"dsmoe" (own dispatcher) or "deepspeed" (deepspeed.moe.layer.MoE)."""
    expert_kernel: str = "auto"
    """How the routed experts multiply their rows: "grouped" (torch's grouped GEMM where it runs, else a loop:
    no padding, one GEMM per expert), "bucketed" (experts sorted by load into at most 8 buckets, each padded to
    its largest expert, the fewest buckets that pad <= 5% of the rows: one batched GEMM per bucket; on CPU as
    fast as grouped when idle and faster when other processes share the cores), "padded" (one bucket),
    "adaptive" (on CPU, times grouped and bucketed on the layer's own calls and keeps the faster, re-checking
    now and then; not bitwise reproducible; grouped on GPU), "loop" (exact per-expert matmuls) or "auto"
    (bucketed on CPU, grouped on GPU). Every kernel but "adaptive" gives the same bits for the same batch.
    Under expert parallelism the rows arrive grouped by expert: "auto" and "adaptive" run grouped there, and
    "bucketed" and "padded" are refused."""
    use_residual: bool = False
    """backend="deepspeed" only: PR-MoE residual MLP mixed by a learned coefficient."""
    noisy_gate_policy: str | None = None
    """backend="deepspeed" only: None, "Jitter" or "RSample"."""
    init_std: float = 0.02
    """Std of the normal init of router and expert weights."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str, *related: str) -> OptionError:
            return OptionError("MoEConfig", name, lambda f: getattr(self, f), why, related)

        for name in ("hidden_size", "expert_hidden_size", "num_experts", "top_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        for name in ("num_shared_experts", "num_null_experts", "min_capacity"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "must be a non-negative integer")
        if self.top_k > self.num_experts + self.num_null_experts:
            raise bad("top_k", "exceeds {num_experts} + {num_null_experts}", "num_experts", "num_null_experts")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)) and v != math.inf:
                raise bad(name, "must be > 0 (or None for dropless)")
        if self.max_capacity is not None and self.max_capacity < max(self.min_capacity, 1):
            raise bad("max_capacity", "is below {min_capacity}", "min_capacity")
        for name, allowed in (("drop_policy", DROP_POLICIES), ("score_func", SCORE_FUNCS),
                              ("activation", ACTIVATIONS), ("backend", BACKENDS),
                              ("expert_kernel", EXPERT_KERNELS), ("group_score", GROUP_SCORES)):
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {allowed}")
        if self.num_groups <= 0 or self.num_experts % self.num_groups:
            raise bad("num_groups", "must divide {num_experts}", "num_experts")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise bad("topk_groups", "must be in [1, {num_groups}]", "num_groups")
        if self.num_groups > 1 and self.top_k > self.topk_groups * (self.num_experts // self.num_groups) + self.num_null_experts:
            raise bad("top_k", "exceeds the experts reachable in {topk_groups} of {num_groups} groups (+ null "
                      "experts)", "topk_groups", "num_groups")
        if self.router_temperature <= 0:
            raise bad("router_temperature", "must be > 0")
        if not 0 <= self.router_jitter < 1:
            raise bad("router_jitter", "must be in [0, 1)")
        if self.shared_expert_hidden_size is not None and self.shared_expert_hidden_size <= 0:
            raise bad("shared_expert_hidden_size", "must be positive")
        if self.backend == "dsmoe":
            if self.use_residual:
                raise bad("use_residual", "PR-MoE residual is backend='deepspeed' only; use num_shared_experts")
            if self.noisy_gate_policy is not None:
                raise bad("noisy_gate_policy", "is backend='deepspeed' only; use router_jitter")

    @property
    def num_choices(self) -> int:
        """Router outputs: routed experts followed by null experts."""
        return self.num_experts + self.num_null_experts

    @property
    def shared_hidden(self) -> int:
        if self.shared_expert_hidden_size is not None:
            return self.shared_expert_hidden_size
        return self.num_shared_experts * self.expert_hidden_size

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
