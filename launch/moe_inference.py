#!/usr/bin/env python
"""Generate text with an FFN merge: the gate classifies the prompt, the merged FFNs produce the continuation.

  python launch/moe_inference.py --saved_model_path runs/merged --prompt "..."
  python launch/moe_inference.py --model1_path A --model2_path B --gating_model_path GATE --prompt "..."
  python launch/moe_inference.py --model_paths A B C --gating_model_path GATE --routing_mode select_one ...

Prints the generated text and the gate's probability of each model. --config JSON holds any of the flags'
keys (flags given on the command line win).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULTS = {"max_new_tokens": 50, "temperature": 0.7, "top_p": 0.9}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saved_model_path", default=None, help="a folder written by FFNMergeForCausalLM.save_pretrained")
    p.add_argument("--model1_path", default=None)
    p.add_argument("--model2_path", default=None)
    p.add_argument("--model_paths", nargs="+", default=None, help="N model folders (instead of --model1/2_path)")
    p.add_argument("--gating_model_path", default=None, help="gate folder from launch/train_gating.py")
    p.add_argument("--base_model_path", default=None, help="the gate's encoder (default: the one it was trained on)")
    p.add_argument("--routing_mode", choices=("weighted_sum", "select_one"), default=None)
    p.add_argument("--allow_different_trunks", action="store_true", default=None,
                   help="average the models' non-FFN weights instead of requiring them identical")
    p.add_argument("--prompt", default=None)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default 50")
    p.add_argument("--temperature", type=float, default=None, help="default 0.7")
    p.add_argument("--top_p", type=float, default=None, help="default 0.9")
    p.add_argument("--no_sample", action="store_true", default=None, help="greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None, help="JSON file with any of the keys above")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    import torch
    from dsmoe.mixtures.merge_inference import FFNMergeInference
    try:
        settings = dict(DEFAULTS)
        if a.config is not None:
            try:
                settings.update(json.loads(Path(a.config).read_text()))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"--config {a.config}: cannot read it as JSON ({type(e).__name__})") from None
        settings.update({k: v for k, v in vars(a).items() if v is not None and k != "config"})
        unknown = sorted(set(settings) - set(vars(a)))
        if unknown:
            raise ValueError(f"--config {a.config}: unknown key(s) {unknown}")
        if not settings.get("prompt"):
            raise ValueError("--prompt: give the text to continue")
        paths = settings.get("model_paths") or [settings[k] for k in ("model1_path", "model2_path") if settings.get(k)]
        if settings.get("saved_model_path") is None and len(paths) < 2:
            raise ValueError("--saved_model_path: give a saved merge, or --model1_path/--model2_path "
                             "(or --model_paths) and --gating_model_path")
        torch.manual_seed(settings["seed"])
        merge = FFNMergeInference.load(settings.get("saved_model_path"), paths or None,
                                       settings.get("gating_model_path"), settings.get("base_model_path"),
                                       settings.get("routing_mode"), bool(settings.get("allow_different_trunks")))
        out = merge.generate(settings["prompt"], settings["max_new_tokens"], settings["temperature"],
                             settings["top_p"], do_sample=not settings.get("no_sample"))
    except ValueError as e:
        print(f"dsmoe: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(out.text)
    names = merge.model.config.model_names or [f"model{i + 1}" for i in range(len(out.gating_probs))]
    for i, (name, p) in enumerate(zip(names, out.gating_probs)):
        print(f"model{i + 1}_prob: {p:.4f}  ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
