"""Compatibility names: the class names other releases use, as thin aliases over dsmoe's implementations."""
from .timoe import TiMoE, TiMoEConfig

__all__ = ["TiMoE", "TiMoEConfig"]
