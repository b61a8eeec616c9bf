"""How expert-parallel shards map to the unsharded ("global") layout that checkpoints store.

With expert parallelism of size P, group rank r holds global experts [r*E/P, (r+1)*E/P). Each MoE layer says
which it holds (``MoELayerBase.expert_shard``); two layouts exist:

- dsmoe's ``MoELayer`` stacks its local experts in one tensor per weight ([E/P, ...]): the global tensor is
  the concatenation of the P ranks' tensors along dim 0, under the same name;
- DeepSpeed's native layer keeps one module per local expert (``...deepspeed_experts.<j>.<weight>``, j local):
  rank r's expert j is global expert r*E/P + j, so the global layout renames it.

:func:`gather_global` (collective over the layer's expert-parallel group) turns a local tensor into its global
name(s) and tensor(s); :func:`local_part` reads this rank's part back out of a global state. Weights
(``checkpoint.full_state_dict``) and Adam moments (``optimizer_state``) both go through them, so the two stay
in one layout.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from dsmoe.moe import ExpertShard, moe_layers

_DS_EXPERT = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")


def expert_shards(model: nn.Module) -> dict[int, ExpertShard]:
    """``id(parameter) -> ExpertShard`` for every expert parameter sharded over an expert-parallel group of size
    > 1 (each MoE layer describes its own shard)."""
    out: dict[int, ExpertShard] = {}
    for layer in moe_layers(model):
        shard = layer.expert_shard()
        if shard is not None:
            out.update((id(p), shard) for p in shard.parameters)
    return out


def _renamed(name: str, shard: ExpertShard, rank: int) -> str:
    m = _DS_EXPERT.search(name)
    if m is None:
        raise ValueError(f"{name}: not a DeepSpeed expert parameter name (no '.deepspeed_experts.<j>.')")
    g = rank * shard.local_experts + int(m.group(2))
    return name[:m.start()] + f"{m.group(1)}{g}{m.group(3)}" + name[m.end():]


def gather_global(name: str, t: torch.Tensor, shard: ExpertShard | None) -> list[tuple[str, torch.Tensor]]:
    """Collective over ``shard.group``: the global (name, tensor) pairs this local tensor belongs to
    (``shard`` None: a replicated tensor, already global)."""
    if shard is None:
        return [(name, t)]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(shard.group))]
    dist.all_gather(parts, t.contiguous(), group=shard.group)
    if shard.stacked:
        return [(name, torch.cat(parts, 0))]
    return [(_renamed(name, shard, r), part) for r, part in enumerate(parts)]


def local_part(name: str, shard: ExpertShard | None, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """This rank's part of parameter ``name`` from a global state read through ``get(global_name)``."""
    if shard is None:
        return get(name)
    r = dist.get_rank(shard.group)
    if shard.stacked:
        full = get(name)
        return full[r * shard.local_experts:(r + 1) * shard.local_experts]
    return get(_renamed(name, shard, r))
