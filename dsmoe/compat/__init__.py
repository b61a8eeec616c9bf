"""Thin aliases with the names of the code dsmoe's features come from, over dsmoe's own classes.

``from dsmoe.compat import MoEModel, MoEInference``: the FFN merge under a prompt gate
(:class:`dsmoe.mixtures.FFNMergeForCausalLM`) with the original API's names and result keys.
"""
from .merge import MoEInference, MoEModel

__all__ = ["MoEModel", "MoEInference"]
