"""Every random stream of a rank (torch, CUDA, Python, NumPy) saved without pickle.

``rng/rank_<r>.safetensors`` holds the generator states as tensors (torch's and each CUDA device's byte
states, NumPy's MT19937 key) and the rest as JSON in the file's metadata (Python's Mersenne Twister state,
NumPy's position and cached Gaussian), so reading a checkpoint someone sent you runs no code.

Checkpoints written before this format have ``rng/rank_<r>.pt`` (a pickle). :func:`load_rng_state` reads those
with ``torch.load(weights_only=True)`` and NumPy's array types allow-listed, which executes nothing else; a file
that needs more is reported and skipped (the run then resumes with freshly seeded streams).
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("dsmoe.train")


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank}.safetensors"


def save_rng_state(folder: Path, rank: int) -> Path:
    """Write this process's RNG states to ``folder/rank_<rank>.safetensors``."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    if torch.cuda.is_available():
        tensors.update((f"cuda_{i}", s) for i, s in enumerate(torch.cuda.get_rng_state_all()))
    meta = {"python": json.dumps([version, list(mt), gauss]), "numpy": json.dumps([name, pos, has_gauss, cached])}
    path = rng_file(folder, rank)
    save_file(tensors, str(path), metadata=meta)
    return path


def _apply(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _read(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    version, mt, gauss = json.loads(meta["python"])
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    cuda = [t[f"cuda_{i}"] for i in range(sum(k.startswith("cuda_") for k in t))]
    return {"torch": t["torch"], "python": (version, tuple(mt), gauss), "cuda": cuda,
            "numpy": (name, t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached)}


def _read_legacy(path: Path) -> dict[str, Any]:
    reconstruct = getattr(np, "_core", np.core).multiarray._reconstruct
    with torch.serialization.safe_globals([reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]):
        return torch.load(path, weights_only=True)


def load_rng_state(folder: Path, rank: int) -> bool:
    """Restore this process's RNG states from ``folder`` (safetensors, or a legacy ``.pt``); False when the
    checkpoint has none for this rank or it cannot be read safely (then a warning names the file)."""
    path = rng_file(folder, rank)
    legacy = folder / f"rank_{rank}.pt"
    try:
        if path.exists():
            _apply(_read(path))
        elif legacy.exists():
            _apply(_read_legacy(legacy))
        else:
            return False
    except Exception as e:  # noqa: BLE001 - a bad RNG file must not stop a resume
        bad = path if path.exists() else legacy
        log.warning("%s: RNG state not restored (%s: %s); resuming with freshly seeded random streams",
                    bad, type(e).__name__, str(e).splitlines()[0][:200])
        return False
    return True
