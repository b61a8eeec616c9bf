#!/usr/bin/env python
"""Federated training of the Transformer+MoE encoder on BBC News in Flower's simulation.  Parse -> build -> run.

  python launch/train_federated.py --config launch/configs/federated_bbc.yaml [section.key=value ...]
  python launch/train_federated.py --config launch/configs/federated_bbc.yaml --centralised   # the baseline

Re-running the same command resumes after the newest round checkpoint in train.output_dir. On several machines
the same apps run under a Flower deployment (SuperLink + SuperNodes): see docs/federated.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "federated_bbc.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config (default: %(default)s)")
    p.add_argument("--centralised", action="store_true",
                   help="train the centralised baseline (union of the clients' data) instead")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. federation.num_rounds=10 data.alpha=0.3")
    args = p.parse_intermixed_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="[dsmoe] %(message)s")
    logging.getLogger("dsmoe").setLevel(logging.INFO)

    from dsmoe.federated import load_federated_config, run_centralised, run_federated_simulation
    from dsmoe.training.checkpoint import CheckpointError
    from dsmoe.training.config import ConfigError

    try:
        cfg = load_federated_config(args.config, args.overrides)
        if args.centralised:
            run_centralised(cfg)
        else:
            run_federated_simulation(cfg, verbose=args.verbose)
    except (ConfigError, CheckpointError) as e:
        print(f"dsmoe: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
