"""RoutedLM: a Llama-style causal LM whose FFNs are dense SwiGLU MLPs or dsmoe MoE layers (the DeepSeek-style
routed MoE transformer).

Per decoder layer: RMSNorm -> grouped-query attention (RoPE, optional QK-norm / sliding window / qkv clipping,
``F.scaled_dot_product_attention``) -> residual -> RMSNorm -> FFN -> residual. The FFN of an MoE layer is a
:class:`RoutedLMMoE`: an MoE layer (``dsmoe.moe.build_moe_layer``, either backend) plus the DeepSeek-style
training dynamics, all driven by the
training ``step`` passed to ``forward``:

* MoE warmup (``moe_warmup_steps = W``): out = (1 - a) * dense(x) + a * moe(x) with
  a = p + (1 - p) * sigmoid(w), p = min(1, step / W) and w a learnable scalar per layer (init -4, a ~ 0.02 at
  step 0). The ramp guarantees a = 1 at step W; the learned w lets a layer hand over to its experts earlier.
  From step W on the dense path is neither computed nor trained.
* Capacity warmup: in training, before step W, the capacity factor grows linearly from
  ``warmup_capacity_factor`` (default half) to ``expert_capacity_factor`` (passed per call to the MoE layer).
* Aux-loss ramp: the summed router losses are multiplied by min(1, step / aux_loss_ramp_steps).
* Learned token importance: s = Linear(H, 1)(x) is the drop priority under capacity limits, and the MoE output
  is scaled by 2 * sigmoid(s) (exactly 1 at its zero init), which is what trains the scorer.
* Router reset: at the first training step >= ``router_reset_step`` every router is re-initialised (weights
  normal(initializer_range), expert bias and load counters zero) once; a buffer records that it happened.

The step of the last training forward is kept in the persistent buffer ``model.moe_step``; a forward without
``step`` (evaluation, ``generate``) uses it, so a checkpoint evaluates the function it was trained to at that
point. Padding tokens (``attention_mask == 0``) are not routed: they use no capacity and do not enter the expert
counts (the sequence-level balance loss then treats the batch's real tokens as one sequence). No
process-group code here: expert parallelism is applied from outside (``MoELayerBase.apply_expert_parallel``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep

from dsmoe.moe import MLP, MoELayerBase, MoEStats, build_moe_layer

from .cache_compat import cache_kwargs, model_output, output_cache, pick_cache
from .configuration_routed_lm import RoutedLMConfig
from .moe_init import init_moe_module

DEBUG_LOG = logging.getLogger("dsmoe.debug")
"""Where :meth:`RoutedLMForCausalLM.set_debug` writes the routing statistics."""

WARMUP_MIX_INIT = -4.0
"""Initial value of each layer's learnable warmup logit w: a = sigmoid(-4) ~ 0.018 at step 0."""


RoutedLMModelOutput = model_output("RoutedLMModelOutput", [
    ("last_hidden_state", torch.FloatTensor), ("cache", Cache), ("aux_loss", torch.FloatTensor),
    ("moe_stats", list)], module=__name__, doc="""Output of :class:`RoutedLMModel`.

    ``last_hidden_state`` (B, T, H); the KV cache (``cache``, or ``past_key_values`` before transformers 5.24);
    ``aux_loss``: scalar, the MoE layers' router losses, summed and multiplied by the aux-loss ramp;
    ``moe_stats``: per MoE layer, a :class:`RoutedLMLayerStats`: the layer's :class:`dsmoe.moe.MoEStats`
    (tokens_per_expert, dropped_tokens, null_fraction, capacity, capacity_factor used, losses) plus
    ``moe_weight`` (the warmup mixing weight a).""")

RoutedLMCausalLMOutput = model_output("RoutedLMCausalLMOutput", [
    ("loss", torch.FloatTensor), ("logits", torch.FloatTensor), ("cache", Cache), ("lm_loss", torch.FloatTensor),
    ("aux_loss", torch.FloatTensor), ("expert_usage", list), ("imbalances", torch.Tensor), ("moe_stats", list)],
    module=__name__, doc="""Output of :class:`RoutedLMForCausalLM`.

    ``loss``: lm_loss + aux_loss (when labels are given); ``logits`` (B, T, V); the KV cache (``cache``, or
    ``past_key_values`` before transformers 5.24); ``lm_loss``: next-token cross-entropy (labels are shifted
    inside, -100 is ignored); ``aux_loss``: see :class:`RoutedLMModelOutput`, zero without MoE layers;
    ``expert_usage``: per MoE layer, tokens_per_expert (E,), the assignments each routed expert computed;
    ``imbalances`` (num MoE layers,): max / mean of tokens_per_expert (1 = perfectly balanced);
    ``moe_stats``: see :class:`RoutedLMModelOutput`.""")


# ---------------------------------------------------------------------------------------------- building blocks
class RoutedLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class RoutedLMRotaryEmbedding(nn.Module):
    """Default RoPE: cos/sin (B, T, head_dim) of the positions, halves rotated as in Llama."""

    def __init__(self, config: RoutedLMConfig):
        super().__init__()
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, nh, T, d), k (B, nkv, T, d), cos/sin (B, T, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class RoutedLMAttention(nn.Module):
    """Grouped-query causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: RoutedLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.dropout = config.attention_dropout
        self.qk_norm, self.clip_qkv = config.qk_norm, config.clip_qkv
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        if self.qk_norm == "per_head":      # Qwen3: over each head's dim
            self.q_norm = RoutedLMRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RoutedLMRMSNorm(self.head_dim, config.rms_norm_eps)
        elif self.qk_norm == "full":        # OLMoE: over the whole projection
            self.q_norm = RoutedLMRMSNorm(self.num_heads * self.head_dim, config.rms_norm_eps)
            self.k_norm = RoutedLMRMSNorm(self.num_kv_heads * self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (z.clamp(-self.clip_qkv, self.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, -1, self.head_dim)
        k = k.view(b, t, -1, self.head_dim)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)   # (B, n, T, d)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # attention_mask: None (plain causal: is_causal when T > 1; a single query sees the whole cache),
        # a bool (True = attend) or an additive float (B, 1, T, S) mask from transformers' mask helpers.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=attention_mask is None and t > 1, scale=self.scaling,
            enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class RoutedLMMLP(MLP):
    """Dense SwiGLU FFN of width ``intermediate_size``: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: RoutedLMConfig):
        super().__init__(config.hidden_size, config.intermediate_size)


@dataclass
class RoutedLMLayerStats(MoEStats):
    """:class:`dsmoe.moe.MoEStats` of one RoutedLM MoE layer, plus the warmup mixing weight."""

    moe_weight: float | torch.Tensor = 1.0
    """Share a of the MoE path in the layer's FFN output (below 1 during ``moe_warmup_steps``)."""


class TokenImportance(nn.Linear):
    """Linear(H, 1) token scorer of ``learned_token_importance``; zero-initialised (every gate starts at 1)."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1, bias=False)
        nn.init.zeros_(self.weight)


class RoutedLMMoE(nn.Module):
    """MoE FFN of one layer: ``moe`` (an MoE layer of ``config.moe_backend``), the dense warmup path
    ``warmup_mlp`` with its mixing logit ``warmup_logit`` (``moe_warmup_steps``), and the token scorer
    ``importance`` (``learned_token_importance``); see the module doc."""

    def __init__(self, config: RoutedLMConfig):
        super().__init__()
        self.moe = build_moe_layer(config.moe_config())
        self.warmup_steps = config.moe_warmup_steps
        if self.warmup_steps:
            self.warmup_mlp = RoutedLMMLP(config)
            self.warmup_logit = nn.Parameter(torch.full((1,), WARMUP_MIX_INIT))  # 1-d: DeepSpeed broadcasts bytes
        else:
            self.warmup_mlp, self.warmup_logit = None, None
        self.importance = TokenImportance(config.hidden_size) if config.learned_token_importance else None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None, progress: float, moe_kwargs: dict):
        """x (B, T, H); token_mask (B, T) bool of the tokens to route (None = all); progress = min(1, step / W).
        Returns (out (B, T, H), aux loss, stats)."""
        score = self.importance(x).squeeze(-1) if self.importance is not None else None      # (B, T)
        if token_mask is None:
            r = self.moe(x, token_priority=score, **moe_kwargs)
            y = r.hidden_states
        else:
            r = self.moe(x[token_mask], token_priority=None if score is None else score[token_mask], **moe_kwargs)
            y = x.new_zeros(x.shape)
            y[token_mask] = r.hidden_states
        if score is not None:
            y = y * (2 * torch.sigmoid(score)).unsqueeze(-1).to(y.dtype)
        moe_weight = 1.0
        if self.warmup_mlp is not None and progress < 1:
            a = progress + (1 - progress) * torch.sigmoid(self.warmup_logit)
            y = (1 - a).to(y.dtype) * self.warmup_mlp(x) + a.to(y.dtype) * y
            moe_weight = a.detach().squeeze()
        stats = RoutedLMLayerStats(**vars(r.stats), moe_weight=moe_weight)
        return y, r.aux_loss, stats


class RoutedLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: RoutedLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = RoutedLMAttention(config, layer_idx)
        self.is_moe = layer_idx in config.moe_layers
        self.mlp = RoutedLMMoE(config) if self.is_moe else RoutedLMMLP(config)
        self.input_layernorm = RoutedLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RoutedLMRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache: Cache | None = None, token_mask=None, progress: float = 1.0,
                moe_kwargs: dict | None = None):
        """Returns (hidden_states, aux_loss or None, stats or None)."""
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask, cache)
        x = self.post_attention_layernorm(h)
        if not self.is_moe:
            return h + self.mlp(x), None, None
        y, aux, stats = self.mlp(x, token_mask, progress, moe_kwargs or {})
        return h + y, aux, stats


# ---------------------------------------------------------------------------------------------- models
class RoutedLMPreTrainedModel(PreTrainedModel):
    config_class = RoutedLMConfig
    config: RoutedLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RoutedLMDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)       # Linear, Embedding (padding row 0), *RMSNorm
        std = self.config.initializer_range
        if init_moe_module(module, std):
            return
        if isinstance(module, RoutedLMMoE):
            if module.warmup_logit is not None:
                init.constant_(module.warmup_logit, WARMUP_MIX_INIT)
        elif isinstance(module, TokenImportance):
            init.zeros_(module.weight)
        elif isinstance(module, RoutedLMRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, RoutedLMModel):
            init.zeros_(module.moe_step)
            init.zeros_(module.router_reset_done)


class RoutedLMModel(RoutedLMPreTrainedModel):
    def __init__(self, config: RoutedLMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(RoutedLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RoutedLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RoutedLMRotaryEmbedding(config)
        self.register_buffer("moe_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("router_reset_done", torch.zeros((), dtype=torch.bool))
        self.gradient_checkpointing = False
        self.post_init()

    def moe_layers(self) -> list[MoELayerBase]:
        return [layer.mlp.moe for layer in self.layers if layer.is_moe]

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, use_cache: bool | None = None,
                step: int | None = None, past_key_values: Cache | None = None, **kwargs) -> RoutedLMModelOutput:
        """``cache``: the KV cache (``past_key_values`` is accepted too, as transformers < 5.24 passes it)."""
        cache = pick_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("RoutedLMModel.forward: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        t = inputs_embeds.shape[1]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(t, device=inputs_embeds.device) + past).unsqueeze(0)

        make_mask = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = make_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                position_ids=position_ids, **cache_kwargs(cache))
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask[:, -t:].to(device=inputs_embeds.device, dtype=torch.bool)
            token_mask = None if bool(real.all()) else real
        progress, aux_scale, moe_kwargs = self._moe_schedule(step)

        h = inputs_embeds
        position_embeddings = self.rotary_emb(h, position_ids)
        aux_loss = h.new_zeros((), dtype=torch.float32)
        moe_stats = []
        for layer in self.layers:
            h, aux, stats = layer(h, position_embeddings=position_embeddings, attention_mask=causal_mask,
                                  cache=cache, token_mask=token_mask, progress=progress,
                                  moe_kwargs=moe_kwargs)
            if stats is not None:
                aux_loss = aux_loss + aux
                moe_stats.append(stats)
        return RoutedLMModelOutput(last_hidden_state=self.norm(h), **cache_kwargs(cache),
                                   aux_loss=aux_loss * aux_scale, moe_stats=moe_stats)

    def _moe_schedule(self, step: int | None) -> tuple[float, float, dict]:
        """(warmup progress p, aux-loss scale, per-call MoELayer kwargs) at ``step``; records the step."""
        cfg = self.config
        if step is not None and self.training:
            self.moe_step.fill_(step)
        if not cfg.moe_layers or not (cfg.moe_warmup_steps or cfg.aux_loss_ramp_steps
                                      or cfg.router_reset_step is not None):
            return 1.0, 1.0, {}
        s = int(step) if step is not None else int(self.moe_step)
        if (self.training and cfg.router_reset_step is not None and s >= cfg.router_reset_step
                and not bool(self.router_reset_done)):
            self.reset_routers()
        w, ramp = cfg.moe_warmup_steps, cfg.aux_loss_ramp_steps
        progress = min(1.0, s / w) if w else 1.0
        aux_scale = min(1.0, s / ramp) if ramp else 1.0
        moe_kwargs = {}
        cf = cfg.expert_capacity_factor
        if self.training and progress < 1 and cf is not None and not math.isinf(cf):
            start = cfg.warmup_capacity_factor if cfg.warmup_capacity_factor is not None else cf / 2
            moe_kwargs["capacity_factor"] = start + (cf - start) * progress
        return progress, aux_scale, moe_kwargs

    def _routers(self) -> list[nn.Module]:
        return [moe.router for moe in self.moe_layers()]

    @torch.no_grad()
    def router_reset_values(self, generator: torch.Generator | None = None) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Fresh values (fp32, CPU) for every router parameter: weights normal(0, initializer_range), vectors 0.
        Shapes are the full ones, also for ZeRO-3-partitioned parameters (``ds_shape``); a shared ``generator``
        gives every rank the same values."""
        std = self.config.initializer_range
        out = []
        for router in self._routers():
            for p in router.parameters():
                shape = tuple(getattr(p, "ds_shape", p.shape))
                v = torch.randn(shape, generator=generator) * std if len(shape) > 1 else torch.zeros(shape)
                out.append((p, v))
        return out

    @torch.no_grad()
    def reset_router_buffers(self) -> None:
        """Zero every router's expert bias and load counts, and record that the reset happened."""
        for router in self._routers():
            for name, b in router.named_buffers():
                if name in ("expert_bias", "load_accum"):
                    b.zero_()
        self.router_reset_done.fill_(True)

    @torch.no_grad()
    def reset_routers(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise every router: weights normal(initializer_range), biases, expert bias and load counts 0.
        Writes the parameters in place, which suits a plain optimizer; dsmoe's trainer resets through the
        DeepSpeed engine instead (master weights and Adam moments too) before the model would."""
        for p, v in self.router_reset_values(generator):
            p.copy_(v.to(p))
        self.reset_router_buffers()


class RoutedLMForCausalLM(RoutedLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RoutedLMConfig):
        super().__init__(config)
        self.model = RoutedLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, step: int | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_expert_usage: bool = True, past_key_values: Cache | None = None,
                **kwargs) -> RoutedLMCausalLMOutput:
        """``step``: the training step (drives the MoE warmup, capacity warmup, aux-loss ramp and router reset;
        None = the last recorded training step). ``labels`` (B, T) are the input ids themselves (shifted
        inside), -100 = ignore. ``output_expert_usage=False`` leaves ``expert_usage`` and ``imbalances`` None.
        ``cache`` is the KV cache (``past_key_values`` is accepted too, as transformers < 5.24 passes it).
        ``kwargs`` go to the loss (e.g. ``num_items_in_batch``)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=pick_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
                         step=step)
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        lm_loss = loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = lm_loss + out.aux_loss.to(lm_loss.device)
        usage = [s.tokens_per_expert for s in out.moe_stats]
        imbalances = None
        if usage:
            loads = torch.stack([u.float() for u in usage])                     # (L_moe, E)
            imbalances = loads.max(-1).values / loads.mean(-1).clamp_min(1e-9)
        if self._debug_every:
            self._log_routing(out.moe_stats, imbalances, out.aux_loss)
        if not output_expert_usage:
            usage, imbalances = None, None
        return RoutedLMCausalLMOutput(loss=loss, logits=logits, **cache_kwargs(output_cache(out)),
                                      lm_loss=lm_loss, aux_loss=out.aux_loss, expert_usage=usage,
                                      imbalances=imbalances, moe_stats=out.moe_stats)

    # ------------------------------------------------------------------ debugging
    _debug_every = 0
    _debug_calls = 0

    def set_debug(self, enabled: bool = True, every: int = 1) -> None:
        """Debug switch (off by default): log per-MoE-layer routing statistics of every ``every``-th forward
        to the ``dsmoe.debug`` logger at INFO level (expert load min/max share and imbalance, null share,
        dropped assignments, capacity, warmup mixing weight, aux loss). Adds a stderr handler when logging
        is not configured. The trainer's debug mode turns it on with ``every = train.log_every``."""
        if every < 1:
            raise ValueError(f"set_debug: every={every!r} must be >= 1")
        self._debug_every = every if enabled else 0
        self._debug_calls = 0
        if enabled:
            DEBUG_LOG.setLevel(logging.INFO)
            if not DEBUG_LOG.hasHandlers():
                DEBUG_LOG.addHandler(logging.StreamHandler())

    def _log_routing(self, moe_stats: list[dict], imbalances: torch.Tensor | None, aux_loss: torch.Tensor) -> None:
        self._debug_calls += 1
        if (self._debug_calls - 1) % self._debug_every:
            return
        mode = "train" if self.training else "eval"
        DEBUG_LOG.info("forward %d (%s, step %d): aux_loss %.4g", self._debug_calls, mode, int(self.model.moe_step),
                       float(aux_loss.detach()))
        for i, (layer, st) in enumerate(zip(self.config.moe_layers, moe_stats)):
            load = st.tokens_per_expert.float()
            share = load / load.sum().clamp_min(1)
            DEBUG_LOG.info("  layer %d: expert share min %.3f max %.3f (uniform %.3f, imbalance %.2f), null %.3f, "
                           "dropped %d, capacity %s, moe_weight %.3f", layer, float(share.min()), float(share.max()),
                           1 / share.numel(), float(imbalances[i]), st.null_fraction, st.dropped_tokens,
                           st.capacity, float(st.moe_weight))

    # ------------------------------------------------------------------ MoE helpers
    def moe_layers(self) -> list[MoELayerBase]:
        """The MoE layer (either backend) of every MoE layer, in depth order."""
        return self.model.moe_layers()

    def update_expert_bias(self, group=None) -> list:
        """Aux-loss-free balancing (topk_method="noaux_tc"): call after each optimizer step. ``group``: the
        data-parallel group whose loads are summed (see :meth:`dsmoe.moe.MoELayerBase.update_expert_bias`)."""
        return [moe.update_expert_bias(group) for moe in self.moe_layers()]

    # ------------------------------------------------------------------ HF interop (see interop.py)
    @classmethod
    def from_hf(cls, model: nn.Module, **config_overrides) -> "RoutedLMForCausalLM":
        """Convert a transformers Llama / Mixtral / Qwen3-MoE / OLMoE causal LM (same logits)."""
        from .interop import from_hf
        return from_hf(model, **config_overrides)

    @classmethod
    def upcycle(cls, model: nn.Module, n_routed_experts: int, num_experts_per_tok: int,
                **moe_kwargs) -> "RoutedLMForCausalLM":
        """A dense model whose MLPs become MoE layers of identical experts (see :func:`interop.upcycle`)."""
        from .interop import upcycle
        return upcycle(model, n_routed_experts, num_experts_per_tok, **moe_kwargs)

    def to_hf(self) -> PreTrainedModel:
        """The matching transformers model (Llama / Mixtral / Qwen3-MoE / OLMoE) with the same logits."""
        from .interop import to_hf
        return to_hf(self)
