"""Thin aliases with the names of the code dsmoe's model families come from, over dsmoe's own classes.

Code written for those models runs on dsmoe with only its import lines changed; an option dsmoe does not
implement is refused with an error that says so.

- ``MoEModelConfig``, ``TransformerForCausalLM``: the DeepSeek-style routed MoE transformer (RoutedLM).
- ``load_config``, ``TransformerMoE``: the Transformer+MoE encoder classifier for federated learning
  (:class:`dsmoe.models.MoEEncoderForSequenceClassification`).
- ``TiMoEConfig``, ``TiMoE``: the time-aware mixture of GPT experts (:class:`dsmoe.mixtures.ExpertMixtureForCausalLM`).
- ``MoEModel``, ``MoEInference``: the FFN merge under a prompt gate (:class:`dsmoe.mixtures.FFNMergeForCausalLM`)
  with the original API's names and result keys.
"""
from .merge import MoEInference, MoEModel
from .moe_transformer import MoEModelConfig, TransformerForCausalLM
from .timoe import TiMoE, TiMoEConfig
from .transformer_moe import TransformerMoE, load_config

__all__ = ["MoEModelConfig", "TransformerForCausalLM", "load_config", "TransformerMoE", "TiMoEConfig", "TiMoE",
           "MoEModel", "MoEInference"]
