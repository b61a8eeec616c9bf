"""The one way dsmoe starts ``deepspeed.comm``: :func:`init_deepspeed_comm`.

Why not plain ``deepspeed.init_distributed``: on the CPU accelerator DeepSpeed 0.19 builds its shared-memory
allreduce op (``deepspeed_shm_comm``) at start-up, and that op only ever serves ``inference_all_reduce``;
training collectives go through ``torch.distributed`` (gloo) either way. Building it costs three things a
CPU debug or test run should not pay:

- a 30-110 s JIT compile into ``~/.cache/torch_extensions``, repeated for every virtual environment, and
  guarded by a lock file that a killed build leaves behind, after which every later DeepSpeed start on the
  machine waits on that lock forever;
- when all ranks are local (``LOCAL_SIZE == WORLD_SIZE``, which the ``deepspeed`` launcher sets), one
  64 MiB segment per rank in RAM-backed ``/dev/shm`` (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``)
  that DeepSpeed never unlinks, so every run leaks RAM until reboot; a few hundred runs fill the machine.

So on the CPU accelerator dsmoe marks the op unavailable before DeepSpeed looks for it (``deepspeed.ops``
documents its compatible-ops table as editable). GPU accelerators never build it.
"""
from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"
SHM_OP = "deepspeed_shm_comm"


def shm_segment_names(port: int | str, addr: str = "127.0.0.1") -> list[Path]:
    """DeepSpeed CPU-allreduce segments of this user for one ``MASTER_ADDR``/``MASTER_PORT`` that exist now."""
    return sorted(SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_*"))


def init_deepspeed_comm(**kwargs) -> None:
    """``deepspeed.init_distributed(**kwargs)`` without DeepSpeed's CPU shared-memory op (module doc)."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__[SHM_OP] = False
    deepspeed.init_distributed(**kwargs)
