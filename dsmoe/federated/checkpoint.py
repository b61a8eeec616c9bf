"""Per-round checkpoints of the global model: ``<output_dir>/checkpoints/round_XXXX/``.

Each holds ``model.safetensors`` (the global weights after that round), ``config.json`` (the model's config, so
``AutoModelForSequenceClassification.from_pretrained(folder)`` loads it) and ``state.json`` (the round and a
fingerprint of the run config). A folder is written under a temporary name and renamed, so a crash never leaves
a half-written round and no finished round is ever overwritten.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dsmoe.data.cache import write_dir_atomically
from dsmoe.training.checkpoint import CheckpointError

ROUND_DIR = re.compile(r"^round_(\d{4,})$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def round_dir(output_dir: str | Path, server_round: int) -> Path:
    return checkpoint_dir(output_dir) / f"round_{server_round:04d}"


def save_round(output_dir: str | Path, server_round: int, state: dict[str, torch.Tensor], model_config,
               fingerprint: str) -> Path:
    """Write the global model after ``server_round``; an existing folder of that round is kept as it is."""
    folder = round_dir(output_dir, server_round)

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        model_config.to_json_file(str(tmp / "config.json"))
        (tmp / "state.json").write_text(json.dumps({"round": server_round, "fingerprint": fingerprint}))

    write_dir_atomically(folder, fill)
    return folder


def latest_round(output_dir: str | Path) -> tuple[int, Path] | None:
    """(round, folder) of the newest complete checkpoint, or None."""
    root = checkpoint_dir(output_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = ROUND_DIR.match(p.name)
            if m and (p / "state.json").is_file() and (p / "model.safetensors").is_file():
                found.append((int(m.group(1)), p))
    return max(found) if found else None


def check_resumable(folder: Path, fingerprint: str) -> None:
    """Refuse a round checkpoint written by a run with another configuration (one line naming the fix)."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'state.json'}: unreadable ({e}); delete {folder} to resume from the "
                              "round before") from None
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"train.output_dir={folder.parent.parent}: holds a run with another model/data/"
                              "federation/train configuration; use a new train.output_dir or the same config")


def load_round(folder: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """The global weights of a round checkpoint (after :func:`check_resumable`)."""
    check_resumable(folder, fingerprint)
    try:
        return load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'model.safetensors'}: unreadable ({e}); delete {folder} to resume from "
                              "the round before") from None
