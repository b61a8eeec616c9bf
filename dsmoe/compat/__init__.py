"""Thin aliases with the names the original codes of dsmoe's model families use, over dsmoe's own classes.

Code written for those models runs on dsmoe with only its import lines changed; an option dsmoe does not
implement is refused with an error that says so.

- ``MoEModelConfig``, ``TransformerForCausalLM``: the DeepSeek-style routed MoE transformer (RoutedLM).
"""
from .moe_transformer import MoEModelConfig, TransformerForCausalLM

__all__ = ["MoEModelConfig", "TransformerForCausalLM"]
