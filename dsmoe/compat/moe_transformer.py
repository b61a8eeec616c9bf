"""The DeepSpeed-style MoE transformer's names (``MoEModelConfig``, ``TransformerForCausalLM``) over RoutedLM.

Code written for that model runs on dsmoe with only its imports changed::

    from dsmoe.compat import MoEModelConfig, TransformerForCausalLM

``TransformerForCausalLM`` *is* :class:`dsmoe.models.RoutedLMForCausalLM`; ``MoEModelConfig`` is
:class:`dsmoe.models.RoutedLMConfig` that also accepts the two option names RoutedLM spells differently:

* ``use_bias_balancing=True`` selects the auxiliary-loss-free bias balancing (``topk_method="noaux_tc"``);
  ``False`` keeps the chosen ``topk_method`` and contradicts ``topk_method="noaux_tc"`` (an error).
* ``semantic_routing=False`` is accepted (the routing is not semantic); ``True`` is refused: dsmoe does not
  implement semantic-aware routing.

Every other option is a RoutedLMConfig option of the same name; a misspelt one is an error naming the closest
option. A saved model loads back as a RoutedLM (``AutoModelForCausalLM`` after ``import dsmoe``).
"""
from __future__ import annotations

from dsmoe.models import RoutedLMConfig, RoutedLMForCausalLM

TransformerForCausalLM = RoutedLMForCausalLM


class MoEModelConfig(RoutedLMConfig):
    """:class:`RoutedLMConfig` accepting ``use_bias_balancing`` and ``semantic_routing`` (module doc)."""

    def __post_init__(self, **kwargs):
        bias_balancing = kwargs.pop("use_bias_balancing", None)
        if bias_balancing is not None:
            if not isinstance(bias_balancing, bool):
                raise ValueError(f"MoEModelConfig.use_bias_balancing={bias_balancing!r}: expected True or False")
            if bias_balancing:
                self.topk_method = "noaux_tc"
            elif self.topk_method == "noaux_tc":
                raise ValueError("MoEModelConfig: use_bias_balancing=False contradicts topk_method='noaux_tc' "
                                 "(which is bias balancing); drop one of them")
        if kwargs.pop("semantic_routing", False):
            raise ValueError("MoEModelConfig.semantic_routing=True: semantic-aware routing is not implemented by "
                             "dsmoe; set semantic_routing=False (routing by the learned router, optionally with "
                             "n_group/topk_group group limits)")
        super().__post_init__(**kwargs)
