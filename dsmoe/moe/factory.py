"""``build_moe_layer(cfg)``: the MoE layer of ``cfg.backend``."""
from __future__ import annotations

from .config import MoEConfig
from .interface import MoELayerBase


def backend_class(backend: str) -> type[MoELayerBase]:
    """The layer class of a backend name ("dsmoe" or "deepspeed"; DeepSpeed is imported only when asked for)."""
    if backend == "dsmoe":
        from .layer import MoELayer
        return MoELayer
    if backend == "deepspeed":
        from .deepspeed_layer import DeepSpeedMoELayer
        return DeepSpeedMoELayer
    raise ValueError(f"MoEConfig.backend={backend!r}: must be 'dsmoe' or 'deepspeed'")


def build_moe_layer(cfg: MoEConfig) -> MoELayerBase:
    """A new MoE layer of ``cfg.backend`` (weights initialised from the torch RNG)."""
    return backend_class(cfg.backend)(cfg)
