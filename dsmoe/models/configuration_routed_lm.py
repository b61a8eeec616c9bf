"""RoutedLMConfig: a Llama-style decoder whose FFNs can be token-level MoE layers (the DeepSeek-style MoE
transformer's options: shared, routed and null experts, capacity, group-limited routing, bias balancing, warmup)."""
from __future__ import annotations

import dataclasses
import math

from transformers import GenerationConfig, PreTrainedConfig

from dsmoe.moe.config import MoEConfig, OptionError

from dsmoe.suggest import did_you_mean

from .cache_compat import CACHE_NAME
from .moe_options import layer_kwargs, our_name

QK_NORMS = (None, "per_head", "full")
TOPK_METHODS = ("greedy", "noaux_tc")

class RoutedLMConfig(PreTrainedConfig):
    """Configuration of :class:`dsmoe.models.RoutedLMForCausalLM` (``model_type="dsmoe_routed_lm"``).

    Every field is checked at construction (also when loading a ``config.json``); a bad value raises
    ``ValueError`` naming the field and the value.
    """

    model_type = "dsmoe_routed_lm"
    keys_to_ignore_at_inference = [CACHE_NAME]

    # ---------------------------------------------------------------- transformer
    vocab_size: int = 32000
    """Number of token ids."""
    hidden_size: int = 2048
    """Model width H."""
    intermediate_size: int = 8192
    """Inner width of the dense SwiGLU FFN (dense layers and the MoE warmup path)."""
    num_hidden_layers: int = 16
    """Number of decoder layers."""
    num_attention_heads: int = 32
    """Query heads."""
    num_key_value_heads: int | None = None
    """Key/value heads (grouped-query attention); must divide num_attention_heads. Default: num_attention_heads."""
    head_dim: int | None = None
    """Width of one head. Default: hidden_size // num_attention_heads."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is meant for (RoPE itself has no hard limit)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    initializer_range: float = 0.02
    """Std of the normal init of all linear, embedding, router and expert weights."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the LM head."""
    attention_bias: bool = False
    """Biases on the q/k/v/o projections."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities (training only)."""
    sliding_window: int | None = None
    """Each token attends to itself and the previous ``sliding_window - 1`` tokens (Mistral/Mixtral); None = full."""
    qk_norm: str | None = None
    """None; "per_head": RMSNorm over each head of q and k (Qwen3); "full": RMSNorm over the whole q and k
    projections (OLMoE)."""
    clip_qkv: float | None = None
    """Clamp q, k, v to [-clip_qkv, clip_qkv] after the projections (OLMoE); None = no clamp."""
    use_cache: bool = True
    """Return the KV cache from forward by default (generation)."""
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    # ---------------------------------------------------------------- MoE placement
    use_moe: bool = True
    """False: every layer is dense (a plain Llama)."""
    moe_layer_indices: list[int] | None = None
    """Exactly these layers get an MoE FFN (with use_moe). Exclusive with first_k_dense_layers."""
    first_k_dense_layers: int = 0
    """Without moe_layer_indices: layers [0, k) stay dense, the rest are MoE (DeepSeek ``first_k_dense_replace``)."""

    # ---------------------------------------------------------------- experts
    n_routed_experts: int = 8
    """Routed experts E per MoE layer."""
    n_shared_experts: int = 0
    """Always-on experts (fused into one MLP of width n_shared_experts * moe_intermediate_size)."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(Linear(H, 1)(x)) (Qwen2-MoE)."""
    num_experts_per_tok: int = 2
    """Top-k choices per token, counted over routed + null experts."""
    moe_intermediate_size: int | None = None
    """Inner width of each expert. Default: intermediate_size."""
    use_null_expert: int | bool = 0
    """Number of null experts (choices that compute nothing); True means 1."""

    # ---------------------------------------------------------------- capacity
    expert_capacity_factor: float | None = None
    """None = dropless; else capacity = clamp(ceil(cf * tokens * k / E), min_expert_capacity, max_expert_capacity)."""
    eval_dropless: bool = True
    """Evaluate (eval mode: validation, generate) without capacity drops, so held-out numbers do not depend on the
    batch size or the number of ranks. False = use expert_capacity_factor at evaluation too."""
    warmup_capacity_factor: float | None = None
    """Capacity factor at step 0 of the MoE warmup, growing linearly to expert_capacity_factor by
    moe_warmup_steps. Default: expert_capacity_factor / 2. Ignored when dropless."""
    min_expert_capacity: int = 4
    """Lower bound of the per-expert capacity."""
    max_expert_capacity: int | None = None
    """Upper bound of the per-expert capacity (None = unbounded)."""

    # ---------------------------------------------------------------- routing
    scoring_func: str = "softmax"
    """Router scores: "softmax", "sigmoid" or "identity"."""
    topk_method: str = "greedy"
    """"greedy": top-k of the scores; "noaux_tc": DeepSeek-V3 aux-loss-free balancing (a per-expert bias added for
    selection only, updated by :meth:`RoutedLMForCausalLM.update_expert_bias` after each optimizer step)."""
    bias_update_rate: float = 1e-3
    """noaux_tc: bias += rate * sign(mean_load - load) per update."""
    n_group: int = 1
    """Group-limited routing: experts split into n_group groups ..."""
    topk_group: int = 1
    """... and each token picks experts from its best topk_group groups only."""
    norm_topk_prob: bool = True
    """Renormalise the k chosen weights to sum to 1."""
    router_scaling_factor: float = 1.0
    """Multiplies the routed weights after normalisation (DeepSeek-V3 routed_scaling_factor)."""
    router_jitter: float = 0.0
    """Multiplicative router-input noise U(1-eps, 1+eps) in training (Mixtral router_jitter_noise)."""
    learned_token_importance: bool = False
    """A Linear(H, 1) scores each token; the score is the drop priority under capacity limits and the MoE output
    is scaled by 2*sigmoid(score) (1 at init), which is how the scorer is trained."""
    router_reset_step: int | None = None
    """Re-initialise every router (weights and expert bias) once, at the first training step >= this."""
    moe_backend: str = "dsmoe"
    """"dsmoe" (own dispatcher, grouped GEMM) or "deepspeed" (deepspeed.moe.layer.MoE)."""
    dsmoe_slice: dict | None = None
    """Metadata: the time slice a slice expert was trained on ({"name", "start_year", "end_year"}), written by
    the trainer's slice-expert runs (``slices.ranges``) and read by expert mixtures; no effect on the model."""
    moe_expert_kernel: str = "auto"
    """dsmoe backend: how routed experts multiply their rows, "auto" (bucketed on CPU, grouped GEMM on GPU),
    "grouped", "bucketed", "padded", "adaptive" (on CPU, keeps whichever of grouped/bucketed its own timings
    favour; not bitwise reproducible) or "loop": see ``MoEConfig.expert_kernel``."""

    # ---------------------------------------------------------------- losses and schedules
    aux_loss_coef: float = 0.01
    """Weight of the batch-level load-balancing loss of each MoE layer."""
    seq_aux_loss_coef: float = 0.0
    """Weight of the sequence-level balance loss (DeepSeek-V3)."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss."""
    aux_loss_ramp_steps: int = 0
    """The summed aux loss is multiplied by min(1, step / aux_loss_ramp_steps); 0 = full weight from step 0."""
    moe_warmup_steps: int = 0
    """During [0, moe_warmup_steps) each MoE FFN mixes a dense SwiGLU path in; see RoutedFFN. 0 = no dense path."""

    def __post_init__(self, **kwargs):
        _check_unknown(type(self), kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if isinstance(self.use_null_expert, bool):
            self.use_null_expert = int(self.use_null_expert)
        if self.moe_layer_indices is not None:
            self.moe_layer_indices = sorted(set(self.moe_layer_indices)) if _all_ints(self.moe_layer_indices) \
                else self.moe_layer_indices
        self._validate()
        super().__post_init__(**kwargs)

    # ---------------------------------------------------------------- derived
    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers with an MoE FFN."""
        if not self.use_moe:
            return []
        if self.moe_layer_indices is not None:
            return list(self.moe_layer_indices)
        return list(range(self.first_k_dense_layers, self.num_hidden_layers))

    def moe_config(self) -> MoEConfig:
        """The :class:`dsmoe.moe.MoEConfig` of every MoE layer of this model (built through the option table of
        ``moe_options``; a bad value is reported under the RoutedLMConfig name the user wrote)."""
        try:
            cfg = MoEConfig(**layer_kwargs(self), activation="swiglu")
            if cfg.backend == "deepspeed":           # refuse what DeepSpeed's layer cannot do, at config time
                from dsmoe.moe.deepspeed_layer import check_deepspeed_config
                check_deepspeed_config(cfg)
            return cfg
        except OptionError as err:
            raise ValueError(err.text("RoutedLMConfig", our_name,
                                      lambda f: getattr(self, our_name(f), None))) from None

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"RoutedLMConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, "must be a positive integer")
        for name in ("first_k_dense_layers", "moe_warmup_steps", "aux_loss_ramp_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "must be a non-negative integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even (RoPE rotates pairs)")
        if not (self.rope_theta > 0):
            raise bad("rope_theta", "must be > 0")
        if not (self.rms_norm_eps > 0):
            raise bad("rms_norm_eps", "must be > 0")
        if not 0 <= self.attention_dropout < 1:
            raise bad("attention_dropout", "must be in [0, 1)")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise bad("sliding_window", "must be a positive integer or None")
        if self.qk_norm not in QK_NORMS:
            raise bad("qk_norm", f"must be one of {QK_NORMS}")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise bad("clip_qkv", "must be > 0 or None")
        if self.moe_layer_indices is not None:
            if not _all_ints(self.moe_layer_indices) or not all(
                    0 <= i < self.num_hidden_layers for i in self.moe_layer_indices):
                raise bad("moe_layer_indices", f"must be layer indices in [0, {self.num_hidden_layers})")
            if self.first_k_dense_layers:
                raise bad("first_k_dense_layers", "cannot be combined with moe_layer_indices; list the MoE layers")
        elif self.first_k_dense_layers > self.num_hidden_layers:
            raise bad("first_k_dense_layers", f"exceeds num_hidden_layers={self.num_hidden_layers}")
        if self.topk_method not in TOPK_METHODS:
            raise bad("topk_method", f"must be one of {TOPK_METHODS}")
        v = self.warmup_capacity_factor
        if v is not None and not (v > 0 and (math.isfinite(v) or v == math.inf)):
            raise bad("warmup_capacity_factor", "must be > 0 (or None)")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        if self.router_reset_step is not None and (
                not isinstance(self.router_reset_step, int) or self.router_reset_step < 0):
            raise bad("router_reset_step", "must be a non-negative integer or None")
        if self.use_moe:
            self.moe_config()   # the MoE options are checked once, by MoEConfig, and reported under our names


# keys transformers itself reads from a config's kwargs (or writes into config.json) besides the dataclass fields
_HF_KWARGS = {"torch_dtype", "name_or_path", "_name_or_path", "_commit_hash", "output_attentions",
              "attn_implementation", "experts_implementation", "per_layer_config", "_attn_implementation_internal",
              "_experts_implementation_internal", "num_labels", "rope_scaling", "rope_parameters", "model_type"}


def _check_unknown(cls, kwargs: dict) -> None:
    """Refuse keys that are no option of ``cls`` (a misspelt option would otherwise be stored and ignored)."""
    ours = {f.name for f in dataclasses.fields(cls)}
    known = ours | _HF_KWARGS | set(GenerationConfig._get_default_generation_params())
    for key in kwargs:
        if key not in known:
            raise ValueError(f"{cls.__name__}: unknown option {key!r}{did_you_mean(key, ours)} "
                             f"(every option is listed in the {cls.__name__} docstrings)")


def _all_ints(xs) -> bool:
    return isinstance(xs, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in xs)
