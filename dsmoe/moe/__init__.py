"""Token-level Mixture-of-Experts: config, layer, router, experts, dispatchers."""
from .config import MoEConfig
from .dispatcher import AllToAllDispatcher, LocalDispatcher
from .layer import MoELayer, MoEOutput
from .router import Router

__all__ = ["MoEConfig", "MoELayer", "MoEOutput", "Router", "LocalDispatcher", "AllToAllDispatcher"]
