"""Mixtures built from several trained models.

* time-aware expert mixtures (:class:`ExpertMixtureForCausalLM`): whole causal LMs, one per time slice, mixed in
  log-probability or logit space under a causal prefix router, with experts trained on later text masked for a
  query date;
* the FFN merge (:class:`FFNMergeForCausalLM`): N fine-tunes of one base mixed FFN-by-FFN under a prompt gate
  (:mod:`dsmoe.mixtures.gating`);
* Branch-Train-MiX (:func:`btx_merge`): the fine-tunes' FFNs become the experts of token-level MoE layers of a
  :class:`dsmoe.models.RoutedLMForCausalLM`.

Importing this package registers ``model_type="dsmoe_expert_mixture"`` and ``"dsmoe_ffn_merge"`` with
``AutoConfig`` and ``AutoModelForCausalLM`` (``import dsmoe`` does it).
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .btx import btx_merge
from .configuration_expert_mixture import ExpertMixtureConfig
from .configuration_ffn_merge import FFNMergeConfig
from .ffn_merge import FFNMergeCausalLMOutput, FFNMergeForCausalLM, MergedFFN
from .gating import FrozenEncoder, GatingConfig, GatingMLP, load_gate, train_gating
from .modeling_expert_mixture import ExpertMixtureForCausalLM, ExpertMixtureOutput, MixtureCache
from .placement import apply_expert_placement
from .router import PrefixRouter

for _config, _model in ((ExpertMixtureConfig, ExpertMixtureForCausalLM), (FFNMergeConfig, FFNMergeForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)

__all__ = ["ExpertMixtureConfig", "ExpertMixtureForCausalLM", "ExpertMixtureOutput", "MixtureCache",
           "PrefixRouter", "apply_expert_placement", "FFNMergeConfig", "FFNMergeForCausalLM",
           "FFNMergeCausalLMOutput", "MergedFFN", "GatingConfig", "GatingMLP", "FrozenEncoder", "train_gating",
           "load_gate", "btx_merge"]
