"""Portable Adam state: the moments by parameter name, in the checkpoint's global layout.

DeepSpeed's own checkpoint (``deepspeed/``) stores the optimizer as ZeRO partitions of flat buffers, which only
the topology that wrote them can load. So that a run can also continue under another expert-parallel size,
world size or ZeRO stage *with* its optimizer moments, each checkpoint holds ``optimizer.safetensors``: for every
trainable parameter ``<name>.exp_avg`` and ``<name>.exp_avg_sq`` (and ``<name>.fp32``, the master weight, when
the model computes in bf16), unsharded and with experts by global index
(the layout of ``model/``, see ``expert_shards``), and the Adam step count in its metadata.

Reading and writing a parameter's moments goes through DeepSpeed's public
``safe_get/set_full_optimizer_state`` (ZeRO-1/2/3); without ZeRO the torch optimizer's state is used directly.
Adam's state is created lazily at the first step, so before writing into a fresh engine the state is created
here on the tensors the optimizer steps (ZeRO's flat fp32 partitions, or the parameters without ZeRO), as
torch's AdamW would, and ZeRO-1/2 are asked to link it to the parameters. The step count, which Adam's bias
correction reads, is the number of optimizer steps taken: the trainer's step.

The same per-parameter access lets the trainer overwrite parameters mid-run (router reset): :func:`set_param`
writes the weight ZeRO computes with *and* its fp32 master copy, :func:`zero_moments` clears its Adam state.

Covered: torch's AdamW (dsmoe's default) and DeepSpeed's CPU Adam (offload configs), which keep the same
state keys; :func:`portable` says whether an engine qualifies.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from .expert_shards import expert_shards, gather_global, local_part

FILE = "optimizer.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _adam_classes() -> tuple[type, ...]:
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    return torch.optim.AdamW, DeepSpeedCPUAdam


def portable(engine, zero_stage: int) -> bool:
    """True when the engine's optimizer is an AdamW this module can read and write: torch's (dsmoe's default)
    or DeepSpeed's CPU Adam (the offload configs)."""
    inner = engine.optimizer if zero_stage == 0 else getattr(engine.optimizer, "optimizer", None)
    return isinstance(inner, _adam_classes())


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """The unpartitioned shape (ZeRO-3 leaves ``p`` empty and keeps it in ``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


MASTER = "fp32"
"""Entry suffix of the fp32 master weight, stored when the model computes in lower precision (bf16), whose
weights in ``model/`` are rounded copies of it."""


def _get(engine, p: nn.Parameter, key: str | None, zero_stage: int) -> torch.Tensor:
    """The full Adam state ``key`` of ``p`` (None: the fp32 master weight). Collective under ZeRO."""
    if zero_stage == 0:
        return p if key is None else engine.optimizer.state[p][key]
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    return safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)


def _entries(p: nn.Parameter) -> list[tuple[str, str | None]]:
    """(entry suffix, state key) pairs stored for ``p``."""
    master = [(MASTER, None)] if p.dtype != torch.float32 else []
    return [(k, k) for k in MOMENTS] + master


def _relink(engine, zero_stage: int) -> None:
    """ZeRO-1/2 point each parameter at its slice of Adam's state once, right after the first optimizer step of
    the *first* parameter group (DeepSpeed 0.19 ``_optimizer_step``), when the other groups have no state yet;
    their parameters then stay unlinked and ``safe_get_full_optimizer_state`` fails for them. Linking again
    once every group has state fixes that; it only re-creates views."""
    if zero_stage in (1, 2):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def has_state(engine, zero_stage: int) -> bool:
    """Whether Adam's state exists yet (after the first optimizer step, or after :func:`load_moments`)."""
    inner = engine.optimizer if zero_stage == 0 else engine.optimizer.optimizer
    return any(st for st in inner.state.values())


def _write_partition(part: torch.Tensor, value: torch.Tensor, rank: int) -> None:
    """ZeRO-3 layout: rank r holds [r*n, (r+1)*n) of the flattened tensor, zero-padded at the end."""
    n = part.numel()
    chunk = value.flatten()[rank * n:(rank + 1) * n]
    part.data.zero_()
    part.data[:chunk.numel()].copy_(chunk)


def _set(engine, p: nn.Parameter, key: str | None, value: torch.Tensor, zero_stage: int) -> None:
    """Write the full ``value`` into Adam state ``key`` of ``p`` (key None: the fp32 master weight)."""
    if zero_stage == 0:
        (p if key is None else engine.optimizer.state[p][key]).data.copy_(value.reshape(p.shape))
    elif zero_stage == 3:
        # safe_set_full_*  slice this rank's partition without the padding ZeRO-3 adds to parameters smaller
        # than the partition count (a 1-element parameter on 2 ranks fails on rank 1), so slice here.
        zopt = engine.optimizer
        part, _ = zopt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
        _write_partition(part, value, zopt._get_param_partition_rank(p))
    else:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        if key is None:
            safe_set_full_fp32_param(p, value.flatten())
        else:
            safe_set_full_optimizer_state(p, value.flatten(), key)


@torch.no_grad()
def set_param(engine, p: nn.Parameter, value: torch.Tensor, zero_stage: int) -> None:
    """Overwrite parameter ``p`` with the full ``value`` (same on every rank): the copy the model computes with
    (under ZeRO-3 this rank's partition of it) and ZeRO's fp32 master copy, which the next step would
    otherwise copy back over it."""
    value = value.to(p.device)
    if zero_stage == 3:
        _write_partition(p.ds_tensor, value.to(p.ds_tensor.dtype), engine.optimizer._get_param_partition_rank(p))
    else:
        p.data.copy_(value.reshape(p.shape).to(p.dtype))
    if zero_stage:
        _set(engine, p, None, value.float(), zero_stage)


@torch.no_grad()
def zero_moments(engine, params: list[nn.Parameter], zero_stage: int) -> None:
    """Clear Adam's moments of ``params`` (no-op before the first step: there are none yet)."""
    if not has_state(engine, zero_stage):
        return
    _relink(engine, zero_stage)
    for p in params:
        if zero_stage == 0 and not engine.optimizer.state[p]:
            continue
        full = torch.zeros(_full_shape(p), device=p.device)
        for key in MOMENTS:
            _set(engine, p, key, full, zero_stage)


def gather_moments(engine, model: nn.Module, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Collective: the moments in the global layout on rank 0, None elsewhere. Call after an optimizer step
    (before the first one there is no state)."""
    _relink(engine, zero_stage)
    shards = expert_shards(model)
    out: dict[str, torch.Tensor] = {}
    for name, p in _trainable(model):
        for suffix, key in _entries(p):
            t = _get(engine, p, key, zero_stage).detach().reshape(_full_shape(p))
            pairs = gather_global(name, t, shards.get(id(p)))
            if dist.get_rank() == 0:
                out.update((f"{n}.{suffix}", v.to("cpu", torch.float32, copy=True).contiguous()) for n, v in pairs)
    return out if dist.get_rank() == 0 else None


def save_moments(moments: dict[str, torch.Tensor], step: int, folder: Path) -> None:
    from safetensors.torch import save_file
    save_file(moments, str(folder / FILE), metadata={"adam_step": str(step)})


def _ensure_state(engine, model: nn.Module, zero_stage: int, step: int) -> None:
    """Create Adam's state where ZeRO-1/2 or plain torch would only create it at the first step, and set the
    step count everywhere (Adam's bias correction reads it)."""
    if zero_stage == 0:
        inner, tensors = engine.optimizer, [p for _, p in _trainable(model)]
    elif zero_stage == 3:
        inner, tensors = engine.optimizer.optimizer, list(engine.optimizer.fp32_partitioned_groups_flat)
    else:
        inner, tensors = engine.optimizer.optimizer, list(engine.optimizer.single_partition_of_fp32_groups)
    for t in tensors:
        st = inner.state[t]
        if not st:                  # torch's AdamW counts steps in a tensor, DeepSpeed's CPU Adam in an int
            st["step"] = torch.tensor(0.0) if isinstance(inner, torch.optim.AdamW) else 0
            for key in MOMENTS:
                st[key] = torch.zeros_like(t, memory_format=torch.preserve_format)
    for st in inner.state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(step), dtype=st["step"].dtype, device=st["step"].device) \
                if torch.is_tensor(st["step"]) else step
    _relink(engine, zero_stage)


def load_moments(engine, model: nn.Module, zero_stage: int, folder: Path) -> int:
    """Write the moments of ``folder/optimizer.safetensors`` into this rank's optimizer; returns the Adam step.
    Raises KeyError naming a parameter the file lacks, ValueError naming an unreadable file."""
    path = folder / FILE
    shards = expert_shards(model)
    try:
        fh = safe_open(str(path), framework="pt")
        step = int(fh.metadata()["adam_step"])
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ValueError(f"{path}: unreadable ({e}); delete it to resume with fresh optimizer moments") from None
    with fh:
        names = set(fh.keys())

        def get(name: str) -> torch.Tensor:
            if name not in names:
                raise KeyError(f"{path}: no entry {name!r}; the model changed since this checkpoint")
            return fh.get_tensor(name)

        _ensure_state(engine, model, zero_stage, step)
        for name, p in _trainable(model):
            for suffix, key in _entries(p):
                value = local_part(name, shards.get(id(p)), lambda n: get(f"{n}.{suffix}"))
                _set(engine, p, key, value.to(p.device), zero_stage)
    return step
