"""Aggregation rules over model state dicts: FedAvg and expert-aware FedAvg.

Plain functions of tensors (no Flower objects), so the Flower strategy and tests call the same code.

* :func:`fedavg`: every tensor is the average of the clients' tensors weighted by their example counts.
* :func:`expert_fedavg`: the routed experts of each MoE layer (the stacked ``<layer>.experts.w_in`` /
  ``w_out`` tensors, one row per expert) are averaged per expert over the clients whose tokens reached that
  expert, weighted by those token counts; everything else (attention, router, shared experts, head) is FedAvg.
  A client that routed nothing to an expert does not pull it back toward its stale copy. An expert no client
  used keeps the example-weighted average (which is the unchanged global copy, since nobody trained it).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

EXPERT_TENSORS = ("experts.w_in", "experts.w_out")
"""Suffixes (after a MoE layer's prefix) of the tensors that hold one row per routed expert."""

StateDict = Mapping[str, torch.Tensor]


def aggregation_weights(num_examples: Sequence[int]) -> list[float]:
    """Each client's FedAvg weight: its share of the examples."""
    if not num_examples:
        raise ValueError("aggregation needs at least one client")
    if any(n < 0 for n in num_examples) or sum(num_examples) <= 0:
        raise ValueError(f"num_examples={list(num_examples)}: must be non-negative with a positive sum")
    total = float(sum(num_examples))
    return [n / total for n in num_examples]


def fedavg(states: Sequence[StateDict], num_examples: Sequence[int]) -> dict[str, torch.Tensor]:
    """Example-weighted average of ``states`` (same keys and shapes); integer tensors are taken from the first."""
    if len(states) != len(num_examples):
        raise ValueError(f"fedavg: {len(states)} states but {len(num_examples)} example counts")
    weights = aggregation_weights(num_examples)
    _check_same_keys(states)
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for w, state in zip(weights, states):
            acc += w * state[key].to(torch.float64)
        out[key] = acc.to(first.dtype)
    return out


def expert_fedavg(states: Sequence[StateDict], num_examples: Sequence[int],
                  expert_tokens: Sequence[Mapping[str, torch.Tensor | Sequence[int]]]) -> dict[str, torch.Tensor]:
    """FedAvg, except that each routed expert is averaged over the clients that routed tokens to it.

    ``expert_tokens[c]`` maps each MoE layer's state-dict prefix (e.g. ``"layers.1.ffn.moe"``) to client c's
    (E,) token counts per expert of that layer in its local training.
    """
    if len(expert_tokens) != len(states):
        raise ValueError(f"expert_fedavg: {len(states)} states but {len(expert_tokens)} expert-token records")
    out = fedavg(states, num_examples)
    layers = set().union(*(t.keys() for t in expert_tokens))
    for layer in sorted(layers):
        missing = [c for c, t in enumerate(expert_tokens) if layer not in t]
        if missing:
            raise ValueError(f"expert_fedavg: client(s) {missing} report no expert tokens for MoE layer {layer!r}")
        tokens = torch.stack([torch.as_tensor(t[layer], dtype=torch.float64) for t in expert_tokens])   # (C, E)
        total = tokens.sum(0)                                                                          # (E,)
        used = total > 0
        share = torch.where(used, tokens / total.clamp_min(1.0), torch.zeros_like(tokens))             # (C, E)
        for suffix in EXPERT_TENSORS:
            key = f"{layer}.{suffix}"
            if key not in out:
                raise ValueError(f"expert_fedavg: expert tokens are given for {layer!r} but the state has no {key!r}")
            if out[key].shape[0] != tokens.shape[1]:
                raise ValueError(f"expert_fedavg: {key} has {out[key].shape[0]} experts, the token counts "
                                 f"{tokens.shape[1]}")
            acc = torch.zeros_like(out[key], dtype=torch.float64)
            for c, state in enumerate(states):
                acc += share[c].view(-1, *[1] * (acc.dim() - 1)) * state[key].to(torch.float64)
            fallback = out[key].to(torch.float64)
            mask = used.view(-1, *[1] * (acc.dim() - 1))
            out[key] = torch.where(mask, acc, fallback).to(out[key].dtype)
    return out


def expert_weights(expert_tokens: Sequence[Mapping[str, Sequence[int] | torch.Tensor]]) -> dict[str, list[list[float]]]:
    """Per MoE layer, each client's weight per expert under :func:`expert_fedavg`: [clients][experts]."""
    out = {}
    for layer in sorted(set().union(*(t.keys() for t in expert_tokens))):
        tokens = torch.stack([torch.as_tensor(t[layer], dtype=torch.float64) for t in expert_tokens])
        out[layer] = (tokens / tokens.sum(0).clamp_min(1.0)).tolist()
    return out


def _check_same_keys(states: Sequence[StateDict]) -> None:
    keys = set(states[0])
    for c, state in enumerate(states[1:], 1):
        if set(state) != keys:
            diff = sorted(keys.symmetric_difference(state))[:3]
            raise ValueError(f"client {c}'s state does not match client 0's (differing keys: {diff})")
        for k in keys:
            if state[k].shape != states[0][k].shape:
                raise ValueError(f"client {c}'s {k} has shape {list(state[k].shape)}, client 0's "
                                 f"{list(states[0][k].shape)}")
