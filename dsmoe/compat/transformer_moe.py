"""The configurable Transformer+MoE encoder under its original names: ``load_config`` and ``TransformerMoE``.

Thin aliases over :class:`dsmoe.models.MoEEncoderConfig` / :class:`dsmoe.models.MoEEncoderForSequenceClassification`
so code written for the original interface runs with only its imports changed::

    from dsmoe.compat import load_config, TransformerMoE
    config = load_config(overrides={"data": {"input_dim": 768, "num_classes": 10},
                                    "transformer": {"embedding_dim": 256, "num_layers": 6, "use_moe": True}})
    model = TransformerMoE(config)
    out = model(x)                     # x: (batch, seq_len, input_dim) floats
    out["logits"], out["auxiliary_loss"]

``load_config`` returns the nested sections ``data``, ``transformer``, ``moe`` and ``training`` filled with the
defaults below; an unknown section or key raises ``ValueError`` naming it (nothing is silently ignored).
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from dsmoe.models.configuration_moe_encoder import MoEEncoderConfig
from dsmoe.models.modeling_moe_encoder import MoEEncoderForSequenceClassification

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"input_dim": 768, "num_classes": 10, "vocab_size": None},
    "transformer": {"embedding_dim": 256, "num_layers": 6, "num_heads": 8, "ff_dim": None, "dropout": 0.1,
                    "positional_encoding": "sinusoidal", "max_seq_length": 512, "use_moe": False,
                    "moe_layer_indices": None, "pooling": "mean"},
    "moe": {"num_experts": 4, "top_k": 2, "use_gating_network": True, "temperature": 1.0,
            "load_balance_weight": 0.01, "num_shared_experts": 0, "num_null_experts": 0, "capacity_factor": None},
    "training": {"learning_rate": 1e-3, "batch_size": 32, "local_epochs": 1, "weight_decay": 0.0},
}
"""Every section and key ``load_config`` knows, with its default."""

_MODEL_SECTIONS = ("data", "transformer", "moe")
"""Sections whose keys are :class:`MoEEncoderConfig` fields of the same name."""


def load_config(path: str | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict]:
    """The nested configuration (``data``, ``transformer``, ``moe``, ``training``): defaults, then ``overrides``
    merged per section. ``path`` (a YAML file with the same sections) is merged before the overrides."""
    config = copy.deepcopy(DEFAULTS)
    layers = []
    if path is not None:
        import yaml
        with open(path, encoding="utf-8") as f:
            layers.append(yaml.safe_load(f) or {})
    layers.append(overrides or {})
    for layer in layers:
        if not isinstance(layer, dict):
            raise ValueError(f"load_config: overrides must be a dict of sections, got {type(layer).__name__}")
        for section, values in layer.items():
            if section not in config:
                raise ValueError(f"load_config: unknown section {section!r} (known: {', '.join(DEFAULTS)})")
            if not isinstance(values, dict):
                raise ValueError(f"load_config: section {section!r} must be a dict, got {values!r}")
            for key, value in values.items():
                if key not in config[section]:
                    raise ValueError(f"load_config: unknown key {section}.{key} "
                                     f"(known: {', '.join(DEFAULTS[section])})")
                config[section][key] = value
    return config


def encoder_config(config: dict[str, dict[str, Any]]) -> MoEEncoderConfig:
    """The :class:`MoEEncoderConfig` of a ``load_config`` dictionary."""
    return MoEEncoderConfig(**{k: v for s in _MODEL_SECTIONS for k, v in config.get(s, {}).items()})


class TransformerMoE(MoEEncoderForSequenceClassification):
    """:class:`MoEEncoderForSequenceClassification` built from a ``load_config`` dictionary, whose forward returns
    a dict with ``logits``, ``auxiliary_loss`` and ``expert_usage`` (and ``loss`` with labels)."""

    def __init__(self, config: dict[str, dict[str, Any]] | MoEEncoderConfig):
        super().__init__(config if isinstance(config, MoEEncoderConfig) else encoder_config(config))

    def forward(self, inputs: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> dict[str, Any]:
        """``inputs``: float features (B, T, input_dim) or token ids (B, T); ``mask`` (B, T), 1 = real position."""
        if inputs is not None and not inputs.is_floating_point():
            kwargs["input_ids"] = inputs
        elif inputs is not None:
            kwargs["input_features"] = inputs
        out = super().forward(attention_mask=mask if mask is not None else kwargs.pop("attention_mask", None),
                              labels=labels, **kwargs)
        return {k: v for k, v in out.items()}
