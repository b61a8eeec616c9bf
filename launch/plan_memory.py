#!/usr/bin/env python
"""Memory plan of gate training over three OLMo-7B-shape experts in bf16 (built on the meta device).

  python launch/plan_memory.py [--experts 3] [--shape olmo-7b|olmo-1b] [--dtype bf16] [--gpu-gib 80]
                               [--batches 1,2,4,8,16] [--seq-lens 512,1024,2048] [--json PATH]

Prints which (batch, sequence length) configurations fit the GPU; nothing is allocated.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = ("olmo-7b", "olmo-1b")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--shape", default="olmo-7b", choices=SHAPES)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--seq-lens", default="512,1024,2048")
    p.add_argument("--json", default=None, help="also write the plan here")
    a = p.parse_args(argv)
    from dsmoe.mixtures.memory_plan import OLMO_1B, OLMO_7B, MemoryPlanConfig, plan_memory
    try:
        batches = [int(x) for x in a.batches.split(",")]
        seq_lens = [int(x) for x in a.seq_lens.split(",")]
    except ValueError:
        print(f"dsmoe: error: --batches/--seq-lens: give comma-separated integers, got {a.batches!r} / "
              f"{a.seq_lens!r}", file=sys.stderr)
        return 2
    try:
        cfg = MemoryPlanConfig(expert=dict(OLMO_7B if a.shape == "olmo-7b" else OLMO_1B), num_experts=a.experts,
                               dtype=a.dtype, batches=batches, seq_lens=seq_lens, gpu_gib=a.gpu_gib)
        plan = plan_memory(cfg)
    except ValueError as e:
        print(f"dsmoe: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{a.experts} x {a.shape} experts, {a.dtype}, gate training")
    print(plan.format())
    if a.json:
        Path(a.json).write_text(json.dumps(plan.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
