"""dsmoe: distributed expert-parallel Mixture-of-Experts training on PyTorch and DeepSpeed."""
__version__ = "0.1.0"
