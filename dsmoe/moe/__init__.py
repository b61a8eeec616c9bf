"""Token-level Mixture-of-Experts: config, the layer interface and its backends, router, experts, dispatchers.

``build_moe_layer(cfg)`` returns the layer of ``cfg.backend``: :class:`MoELayer` (dsmoe's own dispatcher, null
experts, capacity limits) or DeepSpeed's native layer behind the same interface (:class:`MoELayerBase`).
"""
from .config import MoEConfig, OptionError
from .dispatcher import AllToAllDispatcher, LocalDispatcher
from .factory import backend_class, build_moe_layer
from .interface import ExpertShard, MoELayerBase, MoEOutput, moe_layers
from .layer import MoELayer
from .mlp import MLP
from .router import Router
from .stats import MoEStats

__all__ = ["MoEConfig", "OptionError", "MoELayerBase", "MoELayer", "MoEOutput", "MoEStats", "ExpertShard",
           "build_moe_layer", "backend_class", "moe_layers", "MLP", "Router", "LocalDispatcher",
           "AllToAllDispatcher"]
