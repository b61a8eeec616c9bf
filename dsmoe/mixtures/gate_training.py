"""Train the router of a mixture over its frozen experts, and measure it as a slice classifier.

Two objectives:

* ``"mixture_nll"``: the mixture's next-token NLL in router mode plus the router regularisers of the config
  (entropy 0.01, load balance 0.01, z-loss 1e-4 by default: the time-aware mixture's router loss);
* ``"slice_ce"``: the router as a classifier of the gold slice (the period gate): cross-entropy of its logits
  at every read position (each causal prefix) against the sequence's slice.

Only the router's parameters are given to the optimizer; the experts stay frozen (``requires_grad=False``, run
under ``torch.no_grad()``) and hold no optimizer state. A small plain loop: the experts are not trained here.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

OBJECTIVES = ("mixture_nll", "slice_ce")


@dataclass
class GateTrainingConfig:
    """How the gate is trained."""

    objective: str = "mixture_nll"
    """"mixture_nll" (mixture NLL + router regularisers) or "slice_ce" (cross-entropy on the gold slices)."""
    steps: int = 100
    """Optimizer steps (the batches are cycled)."""
    lr: float = 3e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the router's gradient norm to this (0 = no clipping)."""

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"gate.objective={self.objective!r}: must be one of {OBJECTIVES}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"gate.steps={self.steps!r}: must be a positive integer")
        if not self.lr > 0:
            raise ValueError(f"gate.lr={self.lr!r}: must be > 0")
        if not self.weight_decay >= 0 or not self.grad_clip >= 0:
            raise ValueError("gate.weight_decay and gate.grad_clip must be >= 0")


@dataclass
class GateTrainingResult:
    """What :func:`train_gate` did."""

    objective: str
    losses: list[float] = field(default_factory=list)
    """Loss of every step."""
    seconds: float = 0.0
    tokens: int = 0
    """Input tokens seen (all steps)."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


@dataclass
class GateAccuracy:
    """The router as a slice classifier on held-out sequences (its prediction at the last read position)."""

    accuracy: float
    confusion: list[list[int]]
    """confusion[gold][predicted] counts."""
    sequences: int


def _batch_kwargs(batch: dict) -> dict:
    return {k: batch[k] for k in ("attention_mask", "prompt_mask") if batch.get(k) is not None}


def gate_loss(model, batch: dict, objective: str) -> torch.Tensor:
    """The training loss of one batch (``input_ids``, optional ``attention_mask``, ``prompt_mask``, ``date``,
    ``slice_labels``)."""
    ids = batch["input_ids"]
    if objective == "mixture_nll":
        labels = batch.get("labels", ids)
        return model(ids, labels=labels, mode="router", date=batch.get("date"), return_logits=False,
                     **_batch_kwargs(batch)).loss
    if batch.get("slice_labels") is None:
        raise ValueError("gate.objective='slice_ce' needs slice_labels (the gold slice of each sequence) in every "
                         "batch")
    _, router_logits, _, _ = model.gate(ids, batch.get("attention_mask"), None, "router",
                                        prompt_mask=batch.get("prompt_mask"))
    read = model.read_mask(ids, batch.get("attention_mask"), batch.get("prompt_mask"))
    gold = torch.as_tensor(batch["slice_labels"], device=ids.device)[:, None].expand_as(read)
    return F.cross_entropy(router_logits[read], gold[read])


def train_gate(model, batches: list[dict], config: GateTrainingConfig | None = None) -> GateTrainingResult:
    """Train ``model.router`` for ``config.steps`` steps over ``batches`` (cycled); the experts stay frozen."""
    config = config or GateTrainingConfig()
    if model.router is None:
        raise ValueError("train_gate: the mixture has no router; build it with use_router=True "
                         "(from_experts(..., router=True))")
    if not batches:
        raise ValueError("train_gate: no training batches")
    if any(p.requires_grad for e in model.experts for p in e.parameters()):
        raise ValueError("train_gate trains the router over frozen experts; call expert.requires_grad_(False)")
    params = list(model.router.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    result = GateTrainingResult(config.objective)
    model.train()
    t0 = time.perf_counter()
    for batch in itertools.islice(itertools.cycle(batches), config.steps):
        loss = gate_loss(model, batch, config.objective)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        result.losses.append(loss.item())
        result.tokens += batch["input_ids"].numel()
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result


@torch.no_grad()
def gate_posteriors(model, input_ids, attention_mask=None, prompt_mask=None) -> torch.Tensor:
    """[B, N] the router's posterior over slices after reading each whole sequence (no date: every slice)."""
    _, logits, _, _ = model.gate(input_ids, attention_mask, None, "router", prompt_mask=prompt_mask)
    read = model.read_mask(input_ids, attention_mask, prompt_mask)
    last = (read.long().cumsum(1).argmax(1))                        # last read position of each row
    return torch.softmax(logits[torch.arange(len(last)), last], -1)


def gate_accuracy(posteriors: torch.Tensor, gold: torch.Tensor, num_experts: int) -> GateAccuracy:
    """Accuracy and confusion matrix of argmax ``posteriors`` [S, N] against ``gold`` [S]."""
    pred = posteriors.argmax(-1)
    confusion = torch.zeros(num_experts, num_experts, dtype=torch.long)
    confusion.index_put_((gold.long(), pred.long()), torch.ones_like(pred, dtype=torch.long), accumulate=True)
    n = len(gold)
    return GateAccuracy(float((pred == gold).float().mean()) if n else float("nan"), confusion.tolist(), n)
