"""DeepSpeed process groups and expert-parameter tagging: the only place that touches DeepSpeed's private
expert-parallel attributes.

What DeepSpeed 0.19 reads, and why it is set here (tested by the multi-process training tests on every upgrade):

- ``deepspeed.utils.groups._create_expert_and_data_parallel(P)`` must run before ``deepspeed.initialize``: it makes
  the ``ep_size_P`` expert groups (consecutive ranks) and their expert-data-parallel groups.
- Every expert parameter carries ``allreduce=False`` and ``group_name="ep_size_P"`` (the engine then reduces its
  gradient over the expert-data-parallel group only, and ZeRO-1/2 keep it in its own optimizer group built by
  ``split_params_into_different_moe_groups_for_optimizer``).
- Under ZeRO-3 also ``ds_zero_placement_family="autoep_expert"``, ``ds_zero_partition_group_name`` and
  ``ds_zero_partition_process_group`` (read by ``runtime/zero/partition_parameters.py``): stage 3 then partitions
  expert parameters over the expert-data-parallel group instead of the whole world.
- ``engine.has_moe_layers`` is set only for DeepSpeed's own MoE classes (see :func:`engine_knows_dsmoe_layers`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dsmoe.deepspeed_comm import init_deepspeed_comm
from dsmoe.moe import moe_layers
from dsmoe.ports import free_port

from .lm import NO_DECAY


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launched: bool
    """True under a launcher (deepspeed/torchrun/srun); False in debug mode (world size 1, no launcher)."""


def init_distributed() -> DistInfo:
    """Join the launcher's process group, or create a world of one (debug mode) on the same code path."""
    from deepspeed.accelerator import get_accelerator

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_deepspeed_comm(verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    acc = get_accelerator()
    if acc.device_name() == "cuda":
        acc.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device, launched)


def setup_expert_parallel(model: nn.Module, ep_size: int, zero_stage: int) -> None:
    """Create DeepSpeed's expert/expert-data groups for ``ep_size`` and shard every MoE layer over them.

    Must run after :func:`init_distributed` and before ``deepspeed.initialize`` (ZeRO-3 partitions parameters
    inside initialize, reading the attributes set here).
    """
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    edp_group = groups._get_expert_data_parallel_group(name)
    for layer in moe_layers(model):
        layer.apply_expert_parallel(ep_group)
        for p in layer.expert_parameters():
            p.allreduce = False
            p.group_name = name
            if zero_stage == 3:           # (backends that are not zero3_compatible are refused at config time)
                p.ds_zero_placement_family = "autoep_expert"
                p.ds_zero_partition_group_name = name
                p.ds_zero_partition_process_group = edp_group


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay / no-decay (norms, biases, 1-d params), each split into dense and per-EP-group
    expert groups as DeepSpeed's ZeRO requires."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or n.endswith(".bias") or getattr(p, NO_DECAY, False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


@contextmanager
def engine_knows_dsmoe_layers(zero_stage: int):
    """While active, DeepSpeed engines treat dsmoe's own MoE layers as MoE layers.

    DeepSpeed 0.19 sets ``engine.has_moe_layers`` only for its own ``MoE``/AutoEP classes; without it the engine
    builds no expert-gradient buckets and ZeRO-1/2 would partition expert parameters like dense ones. We set it
    right after ``_configure_distributed_model`` (which broadcasts by the per-parameter ``allreduce``/``group_name``
    attributes, so sharded experts are never overwritten) and before the optimizer is configured.
    Under ZeRO-3 the flag stays off: stage 3 partitions and reduces expert parameters by their ``ds_zero_*``
    attributes (set in :func:`setup_expert_parallel`), and with the flag on it would demand AutoEP layers.
    """
    if zero_stage == 3:
        yield
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._configure_distributed_model

    def configure(self, module):
        original(self, module)
        ours = moe_layers(module)
        if ours and not self.has_moe_layers:
            self.has_moe_layers = True
            self.num_experts = [m.cfg.num_experts for m in ours]

    DeepSpeedEngine._configure_distributed_model = configure
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = original
