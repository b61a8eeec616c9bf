"""MoEEncoder: a Transformer encoder classifier whose feed-forward blocks can be dsmoe MoE layers.

Input: float features (B, T, input_dim) projected to the model width, or token ids (B, T) embedded; an
optional attention mask (B, T) with 1 for real positions. Then the positional encoding (sinusoidal, learned or
none), dropout, ``num_layers`` pre-norm encoder layers (LayerNorm -> multi-head self-attention over the
unmasked positions -> residual -> LayerNorm -> feed-forward or :class:`dsmoe.moe.MoELayer` -> residual), a final
LayerNorm, mean or CLS pooling and a linear classification head.

Padding positions are not routed: they use no expert capacity and do not enter the per-expert token counts
(``expert_usage``), which are what expert-aware federated aggregation weights the experts by. No process-group
code here. Shapes: B batch, T positions, H embedding_dim, E experts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import PreTrainedModel

from dsmoe.moe import MoELayerBase, build_moe_layer

from .cache_compat import model_output
from .configuration_moe_encoder import MoEEncoderConfig
from .moe_init import init_moe_module

MoEEncoderOutput = model_output("MoEEncoderOutput", [
    ("loss", torch.FloatTensor), ("logits", torch.FloatTensor), ("task_loss", torch.FloatTensor),
    ("auxiliary_loss", torch.FloatTensor), ("expert_usage", list), ("pooled", torch.FloatTensor)],
    module=__name__, doc="""Output of :class:`MoEEncoderForSequenceClassification`.

    ``loss``: task_loss + auxiliary_loss (when labels are given); ``logits`` (B, num_classes); ``task_loss``:
    cross-entropy of the labels; ``auxiliary_loss``: scalar, the MoE layers' router losses summed (zero without
    MoE or with random routing); ``expert_usage``: per MoE layer (in ``config.moe_layers`` order) the (E,) long
    count of token assignments each routed expert computed; ``pooled`` (B, H): the pooled sequence vector.""")


def moe_block(config: MoEEncoderConfig) -> MoELayerBase:
    """The one place this model constructs its MoE blocks (the layer of ``moe_backend``)."""
    return build_moe_layer(config.moe_config())


# ---------------------------------------------------------------------------------------------- building blocks
def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim) fixed sine/cosine positional encoding (Vaswani et al.); odd widths drop the last cosine."""
    pos = torch.arange(length, dtype=torch.float).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed table (no parameters; a non-persistent buffer)."""

    def __init__(self, config: MoEEncoderConfig):
        super().__init__()
        self.length, self.dim = config.max_seq_length, config.embedding_dim
        self.register_buffer("table", sinusoidal_table(self.length, self.dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[1]].to(x.dtype)


class LearnedPositionalEncoding(nn.Module):
    """Adds a trainable (max_seq_length, H) table."""

    def __init__(self, config: MoEEncoderConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.max_seq_length, config.embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.embedding.weight[: x.shape[1]].to(x.dtype)


POSITIONAL_ENCODING_CLASSES = {"sinusoidal": SinusoidalPositionalEncoding, "learned": LearnedPositionalEncoding}


class MoEEncoderAttention(nn.Module):
    """Bidirectional multi-head self-attention through ``F.scaled_dot_product_attention`` (its fused CPU/GPU
    kernels; dropout is applied to the block's output by the layer, not to the attention probabilities)."""

    def __init__(self, config: MoEEncoderConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embedding_dim, 3 * config.embedding_dim)
        self.out_proj = nn.Linear(config.embedding_dim, config.embedding_dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, H); key_mask (B, T) bool, True = may be attended to (None = all)."""
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]          # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, h))


class MoEEncoderFeedForward(nn.Module):
    """Dense position-wise block: Linear(H, ff_dim) -> GELU -> dropout -> Linear(ff_dim, H)."""

    def __init__(self, config: MoEEncoderConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.embedding_dim, config.ff_dim)
        self.fc_out = nn.Linear(config.ff_dim, config.embedding_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.dropout(F.gelu(self.fc_in(x))))


class MoEEncoderMoE(nn.Module):
    """MoE block of one layer: routes the real (unmasked) tokens through ``moe`` (a :class:`MoELayer`)."""

    def __init__(self, config: MoEEncoderConfig):
        super().__init__()
        self.moe = moe_block(config)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None):
        """x (B, T, H); token_mask (B, T) bool of the tokens to route. Returns (y, aux loss, tokens_per_expert)."""
        if token_mask is None:
            r = self.moe(x)
            y = r.hidden_states
        else:
            r = self.moe(x[token_mask])
            y = x.new_zeros(x.shape)
            y[token_mask] = r.hidden_states
        return y, r.aux_loss, r.stats.tokens_per_expert


class MoEEncoderLayer(nn.Module):
    """Pre-norm encoder layer: x + attn(LN(x)), then + ffn(LN(.)); the ffn is dense or MoE."""

    def __init__(self, config: MoEEncoderConfig, layer_idx: int):
        super().__init__()
        self.is_moe = layer_idx in config.moe_layers
        self.attn_norm = nn.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps)
        self.attn = MoEEncoderAttention(config)
        self.ffn_norm = nn.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps)
        self.ffn = MoEEncoderMoE(config) if self.is_moe else MoEEncoderFeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None):
        """Returns (x, aux loss or None, tokens_per_expert or None)."""
        x = x + self.dropout(self.attn(self.attn_norm(x), token_mask))
        h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.dropout(self.ffn(h)), None, None
        y, aux, usage = self.ffn(h, token_mask)
        return x + self.dropout(y), aux, usage


# ---------------------------------------------------------------------------------------------- models
class MoEEncoderPreTrainedModel(PreTrainedModel):
    config_class = MoEEncoderConfig
    config: MoEEncoderConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    _no_split_modules = ["MoEEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)       # Linear, Embedding (padding row 0), LayerNorm
        std = self.config.initializer_range
        if init_moe_module(module, std):
            return
        if isinstance(module, SinusoidalPositionalEncoding):
            init.copy_(module.table, sinusoidal_table(module.length, module.dim))
        elif isinstance(module, MoEEncoderForSequenceClassification) and module.cls_token is not None:
            init.normal_(module.cls_token, mean=0.0, std=std)


class MoEEncoderForSequenceClassification(MoEEncoderPreTrainedModel):
    """The encoder with its pooling and classification head (see the module docstring)."""

    def __init__(self, config: MoEEncoderConfig):
        super().__init__(config)
        h = config.embedding_dim
        self.input_proj = nn.Linear(config.input_dim, h) if config.input_dim is not None else None
        self.embed_tokens = (nn.Embedding(config.vocab_size, h, config.pad_token_id)
                             if config.vocab_size is not None else None)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, h)) if config.pooling == "cls" else None
        pe = POSITIONAL_ENCODING_CLASSES.get(config.positional_encoding)
        self.positional = pe(config) if pe is not None else None
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(MoEEncoderLayer(config, i) for i in range(config.num_layers))
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(h, config.num_classes)
        self.post_init()

    # ------------------------------------------------------------------ MoE helpers
    def moe_layer_names(self) -> list[str]:
        """Module names (state-dict prefixes) of the MoELayer of every MoE layer, in ``config.moe_layers`` order."""
        return [f"layers.{i}.ffn.moe" for i, layer in enumerate(self.layers) if layer.is_moe]

    def moe_layers(self) -> list[MoELayerBase]:
        return [layer.ffn.moe for layer in self.layers if layer.is_moe]

    # ------------------------------------------------------------------ forward
    def _embed(self, input_ids, input_features) -> torch.Tensor:
        if (input_ids is None) == (input_features is None):
            raise ValueError("pass exactly one of input_ids (token ids) and input_features (float features)")
        if input_features is not None:
            if self.input_proj is None:
                raise ValueError("this model reads token ids (MoEEncoderConfig.input_dim=None); pass input_ids")
            if input_features.dim() != 3 or input_features.shape[-1] != self.config.input_dim:
                raise ValueError(f"input_features must be [B, T, input_dim={self.config.input_dim}], "
                                 f"got {list(input_features.shape)}")
            return self.input_proj(input_features.to(self.input_proj.weight.dtype))
        if self.embed_tokens is None:
            raise ValueError("this model reads float features (MoEEncoderConfig.vocab_size=None); pass "
                             "input_features")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got {list(input_ids.shape)}")
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                input_features: torch.FloatTensor | None = None, labels: torch.LongTensor | None = None,
                **kwargs) -> MoEEncoderOutput:
        """``input_ids`` (B, T) or ``input_features`` (B, T, input_dim); ``attention_mask`` (B, T), 1 = real
        position (None = all real); ``labels`` (B,) class ids in [0, num_classes)."""
        x = self._embed(input_ids, input_features)                                   # (B, T, H)
        b, t, _ = x.shape
        mask = None if attention_mask is None else attention_mask.to(device=x.device).bool()
        if mask is not None and mask.shape != (b, t):
            raise ValueError(f"attention_mask must be [B, T] = {[b, t]}, got {list(mask.shape)}")
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, 1, -1).to(x.dtype), x], 1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(b, 1), mask], 1)
        if x.shape[1] > self.config.max_seq_length:
            raise ValueError(f"sequence of {x.shape[1]} positions exceeds MoEEncoderConfig.max_seq_length="
                             f"{self.config.max_seq_length}; truncate the input or raise max_seq_length")
        if mask is not None and bool(mask.all()):
            mask = None                                                               # nothing to hide
        if self.positional is not None:
            x = self.positional(x)
        x = self.embed_dropout(x)

        aux = x.new_zeros((), dtype=torch.float32)
        usage: list[torch.Tensor] = []
        for layer in self.layers:
            x, layer_aux, layer_usage = layer(x, mask)
            if layer_aux is not None:
                aux = aux + layer_aux.float()
                usage.append(layer_usage)
        x = self.norm(x)

        if self.cls_token is not None:
            pooled = x[:, 0]
        elif mask is None:
            pooled = x.mean(1)
        else:
            w = mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        logits = self.classifier(pooled)

        loss = task_loss = None
        if labels is not None:
            task_loss = F.cross_entropy(logits.float(), labels.to(logits.device))
            loss = task_loss + aux
        return MoEEncoderOutput(loss=loss, logits=logits, task_loss=task_loss, auxiliary_loss=aux,
                                expert_usage=usage, pooled=pooled)
