#!/usr/bin/env python
"""Held-out perplexity of a checkpoint or HF folder on its run's validation split.

  python launch/eval.py runs/quickstart [--max-batches N] [data.key=value ...]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run output_dir, checkpoints/step_N folder, or HF folder")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's train.micro_batch_size")
    p.add_argument("--max-batches", type=int, default=None, help="default: the run's train.eval_batches (0 = all)")
    p.add_argument("overrides", nargs="*", help="data.key=value (e.g. data.year_min=1950 for a period)")
    a = p.parse_args(argv)
    import yaml
    from dsmoe.training.checkpoint import CheckpointError
    from dsmoe.training.export import evaluate_folder
    data = {}
    for o in a.overrides:
        k, _, v = o.partition("=")
        if not k.startswith("data.") or not v:
            print(f"dsmoe: error: {o}: only data.key=value overrides are accepted", file=sys.stderr)
            return 2
        data[k[5:]] = yaml.safe_load(v)
    try:
        res = evaluate_folder(a.model, data, a.batch_size, a.max_batches)
    except (CheckpointError, ValueError) as e:
        print(f"dsmoe: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
