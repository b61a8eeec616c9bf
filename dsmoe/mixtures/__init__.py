"""Mixtures of whole causal LMs over time slices (time-aware expert mixtures and period gates).

Importing this package registers ``model_type="dsmoe_expert_mixture"`` with ``AutoConfig`` and
``AutoModelForCausalLM`` (``import dsmoe`` does it), so ``AutoModelForCausalLM.from_pretrained(dir)`` loads a
saved :class:`ExpertMixtureForCausalLM`.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_expert_mixture import ExpertMixtureConfig
from .modeling_expert_mixture import ExpertMixtureForCausalLM, ExpertMixtureOutput, MixtureCache
from .placement import apply_expert_placement
from .router import PrefixRouter

AutoConfig.register(ExpertMixtureConfig.model_type, ExpertMixtureConfig, exist_ok=True)
AutoModelForCausalLM.register(ExpertMixtureConfig, ExpertMixtureForCausalLM, exist_ok=True)

__all__ = ["ExpertMixtureConfig", "ExpertMixtureForCausalLM", "ExpertMixtureOutput", "MixtureCache",
           "PrefixRouter", "apply_expert_placement"]
