#!/usr/bin/env python
"""Export a dsmoe checkpoint as a Hugging Face folder.

  python launch/export.py CHECKPOINT_DIR OUT_DIR [--to mixtral|qwen3_moe]

CHECKPOINT_DIR: a run's output_dir (its latest checkpoint), a checkpoints/step_N folder, or an HF folder.
The result loads with ``import dsmoe; AutoModelForCausalLM.from_pretrained(OUT_DIR)``; with --to it is a
transformers Mixtral / Qwen3-MoE folder that loads without dsmoe.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy the run's tokenizer")
    p.add_argument("--to", choices=("mixtral", "qwen3_moe"), default=None,
                   help="write a transformers Mixtral / Qwen3-MoE checkpoint (loads without dsmoe)")
    a = p.parse_args(argv)
    from dsmoe.training.checkpoint import CheckpointError
    from dsmoe.training.export import export_hf
    try:
        if a.to is None:
            out = export_hf(a.checkpoint, a.out_dir, tokenizer=not a.no_tokenizer)
        else:
            from dsmoe.mixtures.moe_export import export_as
            out = export_as(a.checkpoint, a.out_dir, a.to, tokenizer=not a.no_tokenizer)
    except CheckpointError as e:
        print(f"dsmoe: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {a.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
