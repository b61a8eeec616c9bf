"""FFNMergeConfig: N causal LMs sharing one trunk, mixed FFN-by-FFN under a prompt gate."""
from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig

ROUTING_MODES = ("weighted_sum", "select_one")


class FFNMergeConfig(PreTrainedConfig):
    """Configuration of :class:`dsmoe.mixtures.FFNMergeForCausalLM` (``model_type="dsmoe_ffn_merge"``).

    Bad values raise ``ValueError`` naming the field and the value (also when loading a ``config.json``).
    """

    model_type = "dsmoe_ffn_merge"

    trunk_config: dict | None = None
    """The config (``to_dict()``) of the merged models' architecture, e.g. a Llama config; attention, embeddings
    and norms are built from it once, the FFN of every decoder layer N times."""
    num_models: int = 2
    """N, the number of merged models (FFNs per layer, classes of the gate)."""
    routing_mode: str = "weighted_sum"
    """"weighted_sum": every FFN output is sum_i p_i * FFN_i(h); "select_one": only the FFN of the most probable
    model runs (per sequence)."""
    ffn_name: str = "mlp"
    """Attribute of each decoder layer holding its FFN."""
    gating_arch: dict | None = None
    """Architecture of the prompt gate (input_dim, num_classes, hidden_dims, dropout); None = no gate, so
    ``forward`` needs ``gating_probs``."""
    gating_encoder: str | None = None
    """HF folder of the frozen encoder the gate reads (its weights are not part of the merge)."""
    encoder_max_length: int = 256
    """Encoder tokens per prompt when the gate classifies it."""
    model_names: list[str] | None = None
    """Names (e.g. source folders) of the merged models, in gate-class order; informational."""

    def __post_init__(self, **kwargs):
        if self.trunk_config is None:
            self.trunk_config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32,
                                 "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        self._validate()
        super().__post_init__(**kwargs)
        # generation reads these from the top-level config
        for key in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "max_position_embeddings"):
            if key in self.trunk_config and getattr(self, key, None) is None:
                setattr(self, key, self.trunk_config[key])

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"FFNMergeConfig.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.trunk_config, dict) or "model_type" not in self.trunk_config:
            raise bad("trunk_config", "must be the to_dict() of an HF causal-LM config (with model_type)")
        if not isinstance(self.num_models, int) or isinstance(self.num_models, bool) or self.num_models < 1:
            raise bad("num_models", "must be a positive integer")
        if self.routing_mode not in ROUTING_MODES:
            raise bad("routing_mode", f"must be one of {ROUTING_MODES}")
        if self.gating_arch is not None:
            classes = self.gating_arch.get("num_classes") if isinstance(self.gating_arch, dict) else None
            if classes != self.num_models:
                raise bad("gating_arch", f"the gate has {classes} classes but num_models={self.num_models}; "
                                         f"train the gate on one dataset per merged model")
        if self.model_names is not None and len(self.model_names) != self.num_models:
            raise bad("model_names", f"needs one name per model (num_models={self.num_models})")

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The trunk's config: what generation sizes the KV cache by (layers, heads)."""
        return self.trunk()

    def trunk(self) -> PreTrainedConfig:
        """The trunk's HF config object."""
        d = dict(self.trunk_config)
        return AutoConfig.for_model(d.pop("model_type"), **d)
