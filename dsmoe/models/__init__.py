"""Hugging Face compatible models built on dsmoe.moe.

Importing this package registers ``model_type="dsmoe_routed_lm"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM`` (``import dsmoe`` does it), so ``AutoModelForCausalLM.from_pretrained(dir)`` loads a
saved :class:`RoutedLMForCausalLM`; and ``model_type="dsmoe_moe_encoder"`` with ``AutoConfig`` and
``AutoModelForSequenceClassification`` (:class:`MoEEncoderForSequenceClassification`).
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_routed_lm import RoutedLMConfig
from .interop import from_hf, to_hf, upcycle
from .modeling_routed_lm import (RoutedLMCausalLMOutput, RoutedLMForCausalLM, RoutedLMModel, RoutedLMModelOutput,
                                 RoutedLMPreTrainedModel)

AutoConfig.register(RoutedLMConfig.model_type, RoutedLMConfig, exist_ok=True)
AutoModel.register(RoutedLMConfig, RoutedLMModel, exist_ok=True)
AutoModelForCausalLM.register(RoutedLMConfig, RoutedLMForCausalLM, exist_ok=True)

from .configuration_moe_encoder import MoEEncoderConfig  # noqa: E402
from .modeling_moe_encoder import MoEEncoderForSequenceClassification, MoEEncoderOutput  # noqa: E402

AutoConfig.register(MoEEncoderConfig.model_type, MoEEncoderConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MoEEncoderConfig, MoEEncoderForSequenceClassification, exist_ok=True)

__all__ = ["RoutedLMConfig", "RoutedLMModel", "RoutedLMForCausalLM", "RoutedLMPreTrainedModel",
           "RoutedLMModelOutput", "RoutedLMCausalLMOutput", "from_hf", "to_hf", "upcycle",
           "MoEEncoderConfig", "MoEEncoderForSequenceClassification", "MoEEncoderOutput"]
