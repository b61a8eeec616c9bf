"""dsmoe: distributed expert-parallel Mixture-of-Experts training on PyTorch and DeepSpeed."""
__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers model_type "dsmoe_routed_lm" with transformers' Auto classes)
from . import mixtures  # noqa: E402,F401  (registers "dsmoe_expert_mixture" and "dsmoe_ffn_merge")
