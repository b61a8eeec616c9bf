"""Write a RoutedLM (for instance a Branch-Train-MiX merge) as a standard transformers MoE checkpoint.

``export_as(src, out, "mixtral")`` gives a ``MixtralForCausalLM`` folder (``"qwen3_moe"``: Qwen3-MoE) whose logits
equal the RoutedLM's; it loads with plain ``transformers.AutoModelForCausalLM`` (no dsmoe needed). A model the
family cannot express (a shared expert, dense layers for Mixtral, QK-norm for Qwen3-MoE, ...) is refused with
the reasons, before anything is written.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dsmoe.models import RoutedLMConfig
from dsmoe.models.interop import family_problems, to_hf
from dsmoe.training.checkpoint import CheckpointError
from dsmoe.training.export import resolve_model_folder

EXPORT_FAMILIES = ("mixtral", "qwen3_moe")


def export_as(src: str | Path, out_dir: str | Path, family: str, tokenizer: bool = True) -> Path:
    """Convert the RoutedLM at ``src`` (a run's output_dir, a checkpoint or an HF folder) to ``family`` and write it
    to ``out_dir`` (which must not exist or be empty), with the source folder's tokenizer when it has one."""
    import dsmoe  # noqa: F401  (registers RoutedLM with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if family not in EXPORT_FAMILIES:
        raise CheckpointError(f"--to {family}: choose one of {', '.join(EXPORT_FAMILIES)}")
    folder = resolve_model_folder(src)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new OUT_DIR (nothing was overwritten)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if model.config.model_type != RoutedLMConfig.model_type:
        raise CheckpointError(f"{folder}: holds a {model.config.model_type!r} model; --to converts a dsmoe RoutedLM "
                              f"({RoutedLMConfig.model_type})")
    problems = family_problems(model)[family]
    if problems:
        raise CheckpointError(f"--to {family}: {folder} cannot be written as {family} ({'; '.join(problems)})")
    hf = to_hf(model)
    if hf.config.model_type != family:
        raise CheckpointError(f"--to {family}: {folder} converts to {hf.config.model_type}, not {family}")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    hf.save_pretrained(tmp)
    if tokenizer:
        try:
            AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
        except (OSError, ValueError):
            pass                                    # the source folder has no tokenizer: weights only
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
