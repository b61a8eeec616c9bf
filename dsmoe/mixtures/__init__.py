"""Model mixtures built from several trained models.

* the FFN merge (:class:`FFNMergeForCausalLM`): N fine-tunes of one base mixed FFN-by-FFN under a prompt gate
  (:mod:`dsmoe.mixtures.gating`);
* Branch-Train-MiX (:func:`btx_merge`): the fine-tunes' FFNs become the experts of token-level MoE layers of a
  :class:`dsmoe.models.RoutedLMForCausalLM`.

Importing this package registers ``model_type="dsmoe_ffn_merge"`` with ``AutoConfig`` and
``AutoModelForCausalLM`` (``import dsmoe`` does it).
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .btx import btx_merge
from .configuration_ffn_merge import FFNMergeConfig
from .ffn_merge import FFNMergeCausalLMOutput, FFNMergeForCausalLM, MergedFFN
from .gating import FrozenEncoder, GatingConfig, GatingMLP, load_gate, train_gating

AutoConfig.register(FFNMergeConfig.model_type, FFNMergeConfig, exist_ok=True)
AutoModelForCausalLM.register(FFNMergeConfig, FFNMergeForCausalLM, exist_ok=True)

__all__ = ["FFNMergeConfig", "FFNMergeForCausalLM", "FFNMergeCausalLMOutput", "MergedFFN", "GatingConfig",
           "GatingMLP", "FrozenEncoder", "train_gating", "load_gate", "btx_merge"]
