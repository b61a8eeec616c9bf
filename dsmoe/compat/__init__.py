"""Aliases with the original projects' names over dsmoe's classes (thin wrappers, never a second implementation)."""
from .transformer_moe import TransformerMoE, load_config

__all__ = ["TransformerMoE", "load_config"]
