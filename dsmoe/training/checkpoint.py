"""dsmoe checkpoints: one format for every topology.

``<output_dir>/checkpoints/step_00000100/``
  ``model/``              an HF folder (config.json + model.safetensors) with experts gathered by global index:
                          loadable by ``AutoModelForCausalLM.from_pretrained`` and by any expert-parallel size
  ``optimizer.safetensors``  Adam's moments (and bf16 runs' fp32 master weights) in the layout of ``model/``
                          (``optimizer_state``): every resume, on any topology, continues from it
  ``rng/rank_<r>.safetensors``  every rank's RNG states (``rng_state``)
  ``trainer_state.json``  step, data position, topology; written last, so its presence marks a complete save
  ``deepspeed/``          only for an optimizer whose state dsmoe cannot read (``optimizer_state.portable``):
                          DeepSpeed's own engine checkpoint, a pickle-based format, for a same-topology resume

Everything dsmoe itself writes and reads is safetensors or JSON: resuming from a checkpoint of dsmoe's own
optimizers (torch's AdamW, DeepSpeed's CPU Adam) unpickles nothing, so a checkpoint someone sent you runs no code.
``<output_dir>/checkpoints/latest`` names the newest complete checkpoint.

Saves are atomic: everything is written into ``step_N.tmp`` and renamed into place, and ``latest`` is replaced
with ``os.replace``; a kill during a save leaves the previous checkpoint and ``latest`` untouched.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .expert_shards import expert_shards, gather_global
from .optimizer_state import gather_moments, has_state, save_moments
from .rng_state import save_rng_state

STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir`` (``latest``, else the newest with a state file)."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_FILE).exists():
            return cand
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / STATE_FILE).exists())
    return done[-1] if done else None


def full_state_dict(model: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Collective: the unsharded model state on rank 0 (None elsewhere), experts gathered by global index."""
    shards = expert_shards(model)
    ctx = _gathered(list(model.parameters())) if zero_stage == 3 else nullcontext()
    out: dict[str, torch.Tensor] = {}
    with ctx:
        for name, t in model.state_dict(keep_vars=True).items():     # persistent entries only
            pairs = gather_global(name, t.detach(), shards.get(id(t)))
            if dist.get_rank() == 0:
                out.update((n, v.to("cpu", copy=True).contiguous()) for n, v in pairs)
    return out if dist.get_rank() == 0 else None


def _gathered(params):
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def save_hf_folder(state: dict[str, torch.Tensor], config, folder: Path) -> None:
    """Write config.json + model.safetensors (tied lm_head dropped, as transformers does)."""
    folder.mkdir(parents=True, exist_ok=True)
    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)


def load_hf_state(folder: Path) -> dict[str, torch.Tensor]:
    f = folder / "model.safetensors"
    if not f.exists():
        raise CheckpointError(f"{f}: missing; the checkpoint is incomplete - delete {folder.parent} to start over "
                              f"or point train.output_dir elsewhere")
    try:
        return load_file(str(f))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{f}: unreadable ({e}); delete {folder.parent} to fall back to an older checkpoint")


def save_checkpoint(engine, model, step: int, output_dir: str | os.PathLike, trainer_state: dict[str, Any],
                    zero_stage: int, keep: int, moments: bool = False, engine_state: bool = False) -> Path:
    """Collective. Returns the final checkpoint path. ``moments``: write the portable Adam moments
    (``optimizer_state.portable(engine)`` must hold); ``engine_state``: also write DeepSpeed's own engine
    checkpoint (for optimizers that are not portable)."""
    rank = dist.get_rank()
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        (tmp / "rng").mkdir()
    dist.barrier()
    state = full_state_dict(model, zero_stage)
    adam = gather_moments(engine, model, zero_stage) if moments and has_state(engine, zero_stage) else None
    if engine_state:
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
    save_rng_state(tmp / "rng", rank)
    if rank == 0:
        save_hf_folder(state, model.config, tmp / "model")
        if adam is not None:
            save_moments(adam, step, tmp)
    dist.barrier()
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / "latest")
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    f = ckpt / STATE_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({e}); delete {ckpt} to resume from the previous checkpoint")
