"""Slice experts: one run per time slice of a dated corpus, a shared tokenizer, and an all-slices baseline.

A run config with ``slices.ranges`` (e.g. ``[1790-1849, 1850-1899, 1900-1949, 1950-2026]``) makes
``launch/train.py`` train, one after the other (or one per job-array task with ``slices.only``):

- ``OUTPUT/tokenizer/``: one tokenizer for every expert (a mixture needs one vocabulary), trained on the
  training documents of all slices together (the BPE of ``data.tokenizer: bpe``) or the one configured;
- ``OUTPUT/experts/<start>-<end>/``: an ordinary run (checkpoints, metrics, resume) on that slice's documents
  only (``data.year_min/year_max`` = the slice), and its HF folder ``.../hf`` (weights, tokenizer, and the slice
  in ``config.json`` under ``dsmoe_slice``: name, start_year, end_year), from which
  ``ExpertMixtureForCausalLM.from_experts(folders)`` takes the slices and names;
- ``OUTPUT/baseline/``: one model of the same config on all slices with the experts' total training steps
  (``train.max_steps`` x the number of slices), for the comparison.

The train/validation split is a hash of each document's id, so a slice's held-out documents are exactly the
all-slices held-out documents of its years. Re-running the command resumes the unfinished run and skips the
finished ones.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from .config import ConfigError, RunConfig, TimeSlice

log = logging.getLogger("dsmoe.train")
SLICE_KEY = "dsmoe_slice"          # the key ExpertMixtureForCausalLM.from_experts reads


def process_rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def run_dir(output_dir: str | Path, name: str) -> Path:
    """Where run ``name`` (a slice name or "baseline") trains: ``OUTPUT/baseline`` or ``OUTPUT/experts/<name>``."""
    return Path(output_dir) / "baseline" if name == "baseline" else Path(output_dir) / "experts" / name


def slice_run_config(cfg: RunConfig, name: str, tokenizer: Path) -> RunConfig:
    """The run config of one slice (or of ``"baseline"``)."""
    slices = cfg.slices.parsed()
    sub = copy.deepcopy(cfg)
    sub.slices = replace(cfg.slices, ranges=[], only=None)
    folder = str(run_dir(cfg.train.output_dir, name))
    if name == "baseline":
        lo, hi = slices[0].start, slices[-1].end
        sub.train = replace(cfg.train, output_dir=folder, max_steps=cfg.train.max_steps * len(slices))
    else:
        s = next(x for x in slices if x.name == name)
        lo, hi = s.start, s.end
        sub.train = replace(cfg.train, output_dir=folder)
    sub.data = replace(cfg.data, year_min=lo, year_max=hi, tokenizer=str(tokenizer))
    return sub


def shared_tokenizer(cfg: RunConfig) -> Path:
    """``OUTPUT/tokenizer``: trained once on all slices' training documents (rank 0 writes, others wait)."""
    from dsmoe.data import build_data

    slices = cfg.slices.parsed()
    folder = Path(cfg.train.output_dir) / "tokenizer"
    if process_rank() == 0 and not (folder / "tokenizer_config.json").exists():
        data_cfg = replace(cfg.data, year_min=slices[0].start, year_max=slices[-1].end)
        data = build_data(data_cfg, output_dir=Path(cfg.train.output_dir) / "tokenizer_data")
        tmp = folder.with_name(f"tokenizer.tmp{os.getpid()}")     # job-array tasks may race: each its own
        data.tokenizer.save_pretrained(str(tmp))
        if folder.exists() and not (folder / "tokenizer_config.json").exists():
            shutil.rmtree(folder)                # an incomplete folder from an interrupted first run
        try:
            tmp.rename(folder)
        except OSError:                          # another task got there first: the same tokenizer
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return folder


def export_expert(run_dir: Path, time_slice: TimeSlice | None) -> Path:
    """``run_dir/hf``: the final checkpoint as an HF folder with the tokenizer and (for an expert) its slice."""
    from .export import export_hf

    hf = run_dir / "hf"
    if not (hf / "config.json").exists():
        export_hf(run_dir, hf)
    if time_slice is not None:
        cfg_file = hf / "config.json"
        conf = json.loads(cfg_file.read_text())
        conf[SLICE_KEY] = {"name": time_slice.name, "start_year": time_slice.start, "end_year": time_slice.end}
        cfg_file.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return hf


def train_slices(cfg: RunConfig, debug: bool = False) -> dict[str, dict]:
    """Train the selected slice runs in order; returns {run name: its summary (+ ``hf``: the exported folder)}."""
    from .trainer import Trainer

    slices = {s.name: s for s in cfg.slices.parsed()}
    tokenizer = shared_tokenizer(cfg)
    results = {}
    selected = cfg.slices.selected()
    for name in selected:
        sub = slice_run_config(cfg, name, tokenizer)
        label = "baseline (all slices)" if name == "baseline" else f"slice {name}"
        log.info("== %s -> %s (%d steps)", label, sub.train.output_dir, sub.train.max_steps)
        try:
            summary = Trainer(sub, debug=debug).run()
        except ValueError as e:
            if "leave no documents" in str(e) and name != "baseline":
                i = list(slices).index(name)
                raise ConfigError(f"slices.ranges[{i}]={name}: no documents of data.source in these years; "
                                  f"remove or widen the slice") from None
            raise
        entry = dict(summary.__dict__)
        if process_rank() == 0 and not summary.stopped_early:
            entry["hf"] = str(export_expert(Path(sub.train.output_dir), slices.get(name)))
        results[name] = entry
        if summary.stopped_early:
            break
    if process_rank() == 0:
        root = Path(cfg.train.output_dir)
        index = root / "slices.json"
        old = json.loads(index.read_text()) if index.exists() else {}
        old.update(results)
        index.write_text(json.dumps(old, indent=1))
        # what a job script checks to decide on a requeue: stopped early = some selected run is unfinished
        stopped = any(r.get("stopped_early") for r in results.values()) or len(results) < len(selected)
        (root / "summary.json").write_text(json.dumps({"stopped_early": stopped, "runs": list(results)}, indent=1))
    return results
