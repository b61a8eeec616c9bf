"""Memory plan of gate training over large frozen experts, built on the ``meta`` device (no weights allocated).

Counted exactly: the experts' weights (every parameter and buffer of the real transformers model, built on
``meta`` in the plan's dtype) and the router's parameters, gradients and AdamW moments (fp32).
Estimated by formula (per step, experts run one after another under ``torch.no_grad()``):

* the experts' outputs kept for the mixture: each expert's logits [B, T, V] in the model dtype, upcast to fp32,
  and their log-softmax in fp32 (3 tensors of B*T*V per expert, the first freed after the upcast: counted as
  2 fp32 copies + 1 model-dtype copy);
* the transient activations of one expert forward (no grad, so one layer at a time): hidden states and the
  FFN's inner activations, ~ B*T*(4*H + 3*F) elements in the model dtype, plus the fp32 router activations;
* a fixed allowance for the CUDA context and allocator fragmentation (``overhead_gib``).

The plan says which (batch, sequence length) configurations fit a GPU of ``gpu_gib``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM

GIB = 2**30
OLMO_7B = {"model_type": "olmo", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
           "num_attention_heads": 32, "vocab_size": 50304, "max_position_embeddings": 2048}
"""The OLMo-7B shape (allenai/OLMo-7B-hf)."""
OLMO_1B = {"model_type": "olmo", "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
           "num_attention_heads": 16, "vocab_size": 50304, "max_position_embeddings": 2048}
"""The OLMo-1B shape (allenai/OLMo-1B-hf)."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class MemoryPlanConfig:
    """What to plan for."""

    expert: dict = field(default_factory=lambda: dict(OLMO_7B))
    """The config keys of one expert (with ``model_type``)."""
    num_experts: int = 3
    """Experts held on the GPU."""
    dtype: str = "bf16"
    """Dtype of the expert weights: "bf16", "fp16" or "fp32"."""
    router_embed_dim: int = 64
    """The router's embedding width."""
    router_hidden_size: int = 256
    """The router's hidden width (0 = one Linear)."""
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Micro-batch sizes to plan."""
    seq_lens: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    """Sequence lengths to plan."""
    gpu_gib: float = 80.0
    """GPU memory (GiB) a configuration must fit in."""
    overhead_gib: float = 3.0
    """Allowance for the CUDA context and fragmentation."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: must be one of {sorted(DTYPES)}")
        if "model_type" not in self.expert:
            raise ValueError("expert: give the expert's config keys with its model_type (e.g. olmo)")
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts!r}: must be >= 1")


@dataclass
class MemoryRow:
    batch: int
    seq_len: int
    logits_gib: float
    activations_gib: float
    total_gib: float
    fits: bool


@dataclass
class MemoryPlan:
    expert_params: int
    """Parameters of one expert."""
    expert_weights_gib: float
    """All experts' weights."""
    router_params: int
    router_training_gib: float
    """Router weights + grads + two AdamW moments, fp32."""
    gpu_gib: float
    rows: list[MemoryRow]

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [f"experts: {self.expert_weights_gib:.2f} GiB of weights ({self.expert_params / 1e9:.3f} B params "
                 f"each); router: {self.router_params / 1e6:.2f} M params, {self.router_training_gib:.3f} GiB "
                 f"with grads and AdamW; GPU {self.gpu_gib:.0f} GiB",
                 f"{'batch':>6}{'seq':>7}{'logits GiB':>12}{'activ GiB':>11}{'total GiB':>11}  fits"]
        for r in self.rows:
            lines.append(f"{r.batch:>6}{r.seq_len:>7}{r.logits_gib:>12.2f}{r.activations_gib:>11.2f}"
                         f"{r.total_gib:>11.2f}  {'yes' if r.fits else 'no'}")
        return "\n".join(lines)


def meta_model_bytes(expert: dict, dtype: torch.dtype) -> tuple[int, int]:
    """(parameters, bytes of parameters + buffers) of an expert built on the meta device."""
    values = dict(expert)
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return params, nbytes


def plan_memory(cfg: MemoryPlanConfig) -> MemoryPlan:
    """The plan of ``cfg`` (see the module docstring)."""
    dtype = DTYPES[cfg.dtype]
    params, nbytes = meta_model_bytes(cfg.expert, dtype)
    e = cfg.expert
    v, h, f = e["vocab_size"], e["hidden_size"], e.get("intermediate_size", 4 * e["hidden_size"])
    d, hr, n = cfg.router_embed_dim, cfg.router_hidden_size, cfg.num_experts
    router_params = v * d + (d * hr + hr + hr * n + n if hr else d * n + n)
    router_bytes = router_params * 4 * 4
    size = torch.finfo(dtype).bits // 8
    weights = n * nbytes
    rows = []
    for b in cfg.batches:
        for t in cfg.seq_lens:
            logits = n * b * t * v * (2 * 4 + size)
            act = b * t * (4 * h + 3 * f) * size + b * t * (d + hr + n) * 4 * 3
            total = weights + router_bytes + logits + act + cfg.overhead_gib * GIB
            rows.append(MemoryRow(b, t, logits / GIB, act / GIB, total / GIB, total <= cfg.gpu_gib * GIB))
    return MemoryPlan(params, weights / GIB, router_params, router_bytes / GIB, cfg.gpu_gib, rows)
