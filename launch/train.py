#!/usr/bin/env python
"""Train a RoutedLM.  Parse -> build -> train.

  python launch/train.py                                   # quick start: debug mode, packaged data, CPU ok
  python launch/train.py --config launch/configs/X.yaml --debug [section.key=value ...]
  deepspeed --num_gpus 8 launch/train.py --config launch/configs/X.yaml parallel.expert_parallel_size=8
  python launch/train.py --config X.yaml slices.ranges=[1790-1849,1850-1949,1950-2026]   # one expert per slice

Re-running the same command resumes from the newest checkpoint in train.output_dir.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML run config (default: {DEFAULT_CONFIG.relative_to(Path.cwd()) if DEFAULT_CONFIG.is_relative_to(Path.cwd()) else DEFAULT_CONFIG})")
    p.add_argument("--debug", action="store_true", help="one process without a launcher (GPU if present, else CPU)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_routed_experts=16 train.max_steps=100")
    args = p.parse_args(argv)
    launched = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="[dsmoe] %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from dsmoe.training.config import ConfigError, load_config
    from dsmoe.training.checkpoint import CheckpointError

    overrides = list(args.overrides)
    debug = args.debug or not launched
    if debug and not any(o.startswith("deepspeed=") for o in overrides) and args.debug:
        overrides.append("deepspeed=ds_configs/debug.json")
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
        if cfg.slices.ranges:                      # slice experts (+ baseline), then their mixture and its table
            from dsmoe.mixtures.time_pipeline import run_time_mixture
            summary = run_time_mixture(cfg, debug=args.debug)
        else:
            from dsmoe.training.trainer import Trainer
            summary = Trainer(cfg, debug=args.debug).run()
    except (ConfigError, CheckpointError) as e:
        print(f"dsmoe: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0 if summary else 1


if __name__ == "__main__":
    code = main()
    if "RANK" in os.environ:
        # Under a launcher, leave without interpreter teardown: every output is written and closed by now, and a
        # native helper thread (ZeRO-3 CPU offload) still alive at teardown can abort the process ("terminate
        # called without an active exception"), turning a finished run into a failed one.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
