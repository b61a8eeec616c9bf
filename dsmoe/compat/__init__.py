"""The seeds' own class names as thin aliases over dsmoe's implementations (see each module)."""
from .timoe import TiMoE, TiMoEConfig

__all__ = ["TiMoE", "TiMoEConfig"]
