"""MoEEncoderConfig: a Transformer encoder classifier whose feed-forward blocks can be token-level MoE layers."""
from __future__ import annotations

from transformers import PreTrainedConfig

from dsmoe.moe.config import MoEConfig, OptionError

POSITIONAL_ENCODINGS = ("sinusoidal", "learned", "none")
POOLINGS = ("mean", "cls")
EXPERT_ACTIVATIONS = ("gelu", "swiglu")

# MoEConfig field -> the MoEEncoderConfig field it is built from (MoEConfig's errors are reported in our names)
_MOE_FIELD_NAMES = {
    "hidden_size": "embedding_dim", "expert_hidden_size": "ff_dim", "num_experts": "num_experts", "top_k": "top_k",
    "num_shared_experts": "num_shared_experts", "num_null_experts": "num_null_experts",
    "capacity_factor": "capacity_factor", "eval_capacity_factor": "eval_capacity_factor",
    "min_capacity": "min_capacity", "router_temperature": "temperature", "aux_loss_coef": "load_balance_weight",
    "z_loss_coef": "router_z_loss_weight", "activation": "expert_activation", "init_std": "initializer_range",
}


class MoEEncoderConfig(PreTrainedConfig):
    """Configuration of :class:`dsmoe.models.MoEEncoderForSequenceClassification` (``model_type="dsmoe_moe_encoder"``).

    The encoder reads either float features ``[B, T, input_dim]`` (projected to ``embedding_dim``) or token ids
    (``vocab_size``); set the one your data has (both may be set: forward then takes either). Every field is
    checked at construction (also when loading a ``config.json``); a bad value raises ``ValueError`` naming the
    field and the value.
    """

    model_type = "dsmoe_moe_encoder"

    # ---------------------------------------------------------------- inputs and head
    input_dim: int | None = 768
    """Width of float input features [B, T, input_dim]; None when the model reads token ids only."""
    vocab_size: int | None = None
    """Number of token ids for token input; None when the model reads float features only."""
    num_classes: int = 10
    """Number of output classes of the classification head."""
    pooling: str = "mean"
    """How the sequence becomes one vector: "mean" (over the unmasked positions) or "cls" (a learned token
    prepended to every sequence)."""
    pad_token_id: int | None = None
    """Padding id of token input (its embedding row starts at zero); the attention mask decides what is padding."""

    # ---------------------------------------------------------------- transformer
    embedding_dim: int = 256
    """Model width: every encoder layer maps [B, T, embedding_dim] -> [B, T, embedding_dim]."""
    num_layers: int = 6
    """Number of encoder layers."""
    num_heads: int = 8
    """Attention heads; must divide embedding_dim."""
    ff_dim: int | None = None
    """Inner width of the feed-forward block (and of each expert). Default: 4 * embedding_dim."""
    dropout: float = 0.1
    """Dropout on the embeddings and on the output of every attention and feed-forward block (training only)."""
    positional_encoding: str = "sinusoidal"
    """"sinusoidal" (fixed sine/cosine, no parameters), "learned" (a trainable table) or "none"."""
    max_seq_length: int = 512
    """Longest input sequence (the CLS token of pooling="cls" counts)."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    initializer_range: float = 0.02
    """Std of the normal init of all linear, embedding, router and expert weights."""

    # ---------------------------------------------------------------- mixture of experts
    use_moe: bool = False
    """Replace feed-forward blocks by MoE layers (dsmoe.moe.MoELayer)."""
    moe_layer_indices: list[int] | None = None
    """With use_moe: exactly these layers get an MoE block; None = every layer."""
    num_experts: int = 4
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts chosen per token (counted over routed + null experts)."""
    use_gating_network: bool = True
    """True: a learned router picks the top_k experts; False: each token goes to top_k experts chosen uniformly at
    random with weight 1/top_k (no gating network, no auxiliary loss)."""
    temperature: float = 1.0
    """Router logits are divided by this during training (below 1 sharpens the gate)."""
    load_balance_weight: float = 0.01
    """Weight of the load-balancing auxiliary loss of each MoE layer (added to the task loss)."""
    router_z_loss_weight: float = 0.0
    """Weight of the router z-loss of each MoE layer."""
    expert_activation: str = "gelu"
    """Expert MLP: "gelu" (as the dense block) or "swiglu"."""
    num_shared_experts: int = 0
    """Always-on experts added to the routed output (width num_shared_experts * ff_dim)."""
    num_null_experts: int = 0
    """Extra router choices that compute nothing (the token keeps its residual for that slot)."""
    capacity_factor: float | None = None
    """None = dropless; else each expert takes at most ceil(capacity_factor * tokens * top_k / num_experts)."""
    eval_capacity_factor: float | None = None
    """Capacity factor in eval mode; default: capacity_factor."""
    min_capacity: int = 4
    """Lower bound of the per-expert capacity."""

    def __post_init__(self, **kwargs):
        if self.ff_dim is None and isinstance(self.embedding_dim, int):
            self.ff_dim = 4 * self.embedding_dim
        if self.moe_layer_indices is not None and _all_ints(self.moe_layer_indices):
            self.moe_layer_indices = sorted(set(self.moe_layer_indices))
        self._validate()
        super().__post_init__(**kwargs)

    # ---------------------------------------------------------------- derived
    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers with an MoE block."""
        if not self.use_moe:
            return []
        if self.moe_layer_indices is None:
            return list(range(self.num_layers))
        return list(self.moe_layer_indices)

    def moe_config(self) -> MoEConfig:
        """The :class:`dsmoe.moe.MoEConfig` of every MoE layer of this model."""
        try:
            return MoEConfig(
                hidden_size=self.embedding_dim, expert_hidden_size=self.ff_dim, num_experts=self.num_experts,
                top_k=self.top_k, num_shared_experts=self.num_shared_experts, num_null_experts=self.num_null_experts,
                capacity_factor=self.capacity_factor, eval_capacity_factor=self.eval_capacity_factor,
                min_capacity=self.min_capacity, router_temperature=self.temperature,
                random_routing=not self.use_gating_network, aux_loss_coef=self.load_balance_weight,
                z_loss_coef=self.router_z_loss_weight, activation=self.expert_activation,
                init_std=self.initializer_range)
        except OptionError as err:   # name our field, not MoEConfig's
            name = lambda f: _MOE_FIELD_NAMES.get(f, f)  # noqa: E731
            raise ValueError(err.text("MoEEncoderConfig", name, lambda f: getattr(self, name(f), None))) from None

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"MoEEncoderConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("num_classes", "embedding_dim", "num_layers", "num_heads", "ff_dim", "max_seq_length",
                     "num_experts", "top_k"):
            if not _positive_int(getattr(self, name)):
                raise bad(name, "must be a positive integer")
        for name in ("input_dim", "vocab_size"):
            v = getattr(self, name)
            if v is not None and not _positive_int(v):
                raise bad(name, "must be a positive integer or None")
        if self.input_dim is None and self.vocab_size is None:
            raise bad("input_dim", "and vocab_size are both None; set input_dim for float features or vocab_size "
                                   "for token ids")
        if self.embedding_dim % self.num_heads:
            raise bad("num_heads", f"must divide embedding_dim={self.embedding_dim}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise bad("dropout", "must be in [0, 1)")
        if self.positional_encoding not in POSITIONAL_ENCODINGS:
            raise bad("positional_encoding", f"must be one of {POSITIONAL_ENCODINGS}")
        if self.pooling not in POOLINGS:
            raise bad("pooling", f"must be one of {POOLINGS}")
        if self.expert_activation not in EXPERT_ACTIVATIONS:
            raise bad("expert_activation", f"must be one of {EXPERT_ACTIVATIONS}")
        if self.pooling == "cls" and self.max_seq_length < 2:
            raise bad("max_seq_length", "must be >= 2 with pooling='cls' (the CLS token takes one position)")
        if not self.layer_norm_eps > 0:
            raise bad("layer_norm_eps", "must be > 0")
        if not self.temperature > 0:
            raise bad("temperature", "must be > 0")
        for name in ("load_balance_weight", "router_z_loss_weight"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        if self.moe_layer_indices is not None:
            if not _all_ints(self.moe_layer_indices) or not all(
                    0 <= i < self.num_layers for i in self.moe_layer_indices):
                raise bad("moe_layer_indices", f"must be layer indices in [0, num_layers={self.num_layers})")
        if self.use_moe:
            self.moe_config()   # the remaining MoE checks (top_k <= num_experts, capacity), under our field names


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _all_ints(xs) -> bool:
    return isinstance(xs, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in xs)
