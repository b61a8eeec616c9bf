"""Local training and evaluation of the encoder classifier: what a client runs, and the centralised baseline.

A fresh Adam optimizer per call (a client's round); shuffling and dropout are seeded by the caller's ``seed``
(so a resumed federated run reproduces the uninterrupted one). With ``proximal_mu > 0`` the loss gets the
FedProx term mu/2 * ||w - w_global||^2.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsmoe.models import MoEEncoderForSequenceClassification

from .config import FederatedTrainConfig


@dataclass
class LocalTrainResult:
    num_examples: int
    """Training examples of this client (its FedAvg weight)."""
    steps: int
    """Optimizer steps taken."""
    loss: float
    """Mean task loss over the steps."""
    auxiliary_loss: float
    """Mean auxiliary (load-balancing) loss over the steps."""
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    """Per MoE layer (state-dict prefix): tokens routed to each expert during this training, summed."""


@dataclass
class EvalResult:
    num_examples: int
    accuracy: float
    macro_f1: float
    loss: float
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    """Per MoE layer: tokens routed to each expert on the evaluated data."""


def model_inputs(model: MoEEncoderForSequenceClassification, x: torch.Tensor, mask: torch.Tensor) -> dict:
    """Forward keyword arguments for a batch of token ids or (float16-stored) features."""
    if x.is_floating_point():
        return {"input_features": x.float(), "attention_mask": mask}
    return {"input_ids": x.long(), "attention_mask": mask}


def train_local(model: MoEEncoderForSequenceClassification, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
                cfg: FederatedTrainConfig, epochs: int, seed: int, proximal_mu: float = 0.0,
                optimizer: torch.optim.Optimizer | None = None) -> LocalTrainResult:
    """Train ``model`` in place for ``epochs`` passes over (x, mask, y) in shuffled batches of cfg.batch_size."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    names = model.moe_layer_names()
    tokens = [torch.zeros(model.config.num_experts, dtype=torch.long) for _ in names]
    n, steps, loss_sum, aux_sum = len(y), 0, 0.0, 0.0
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            out = model(**model_inputs(model, x[idx], mask[idx]), labels=y[idx])
            loss = out.loss
            if anchor is not None:
                prox = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
                loss = loss + 0.5 * proximal_mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            steps += 1
            loss_sum += float(out.task_loss.detach())
            aux_sum += float(out.auxiliary_loss.detach())
            for t, u in zip(tokens, out.expert_usage):
                t += u.cpu()
    return LocalTrainResult(num_examples=n, steps=steps, loss=loss_sum / max(steps, 1),
                            auxiliary_loss=aux_sum / max(steps, 1),
                            expert_tokens={k: t.tolist() for k, t in zip(names, tokens)})


@torch.no_grad()
def evaluate(model: MoEEncoderForSequenceClassification, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
             batch_size: int) -> EvalResult:
    """Accuracy, macro-F1 (over the model's classes) and mean loss on (x, mask, y), in eval mode."""
    model.eval()
    names = model.moe_layer_names()
    tokens = [torch.zeros(model.config.num_experts, dtype=torch.long) for _ in names]
    preds, loss_sum = [], 0.0
    for start in range(0, len(y), batch_size):
        sl = slice(start, start + batch_size)
        out = model(**model_inputs(model, x[sl], mask[sl]), labels=y[sl])
        preds.append(out.logits.argmax(-1))
        loss_sum += float(out.task_loss) * len(y[sl])
        for t, u in zip(tokens, out.expert_usage):
            t += u.cpu()
    pred = torch.cat(preds) if preds else y.new_zeros(0)
    return EvalResult(num_examples=len(y), accuracy=float((pred == y).float().mean()) if len(y) else 0.0,
                      macro_f1=macro_f1(pred, y, model.config.num_classes), loss=loss_sum / max(len(y), 1),
                      expert_tokens={k: t.tolist() for k, t in zip(names, tokens)})


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of F1 = 2 TP / (2 TP + FP + FN) over the classes that occur in the targets or the
    predictions (as scikit-learn's ``f1_score(average="macro")``)."""
    f1s = []
    for c in range(num_classes):
        tp = int(((pred == c) & (target == c)).sum())
        fp = int(((pred == c) & (target != c)).sum())
        fn = int(((pred != c) & (target == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0
