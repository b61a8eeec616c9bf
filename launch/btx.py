#!/usr/bin/env python
"""Branch-Train-MiX: merge N same-architecture Llamas (e.g. FFN-only fine-tunes of one base) into a RoutedLM
whose MoE layers hold their FFNs as routed experts.

  python launch/btx.py --models A B [C ...] --out runs/btx [--top_k 2] [--router_init random|hidden|gate]
      [--gating GATE_DIR] [--prompts SPEC_A SPEC_B ...] [--shared_expert --base BASE_DIR] [--trunk average|first]
      [--moe aux_loss_coef=0.01 topk_method=noaux_tc ...]

--prompts (router_init hidden): one domain spec per model (bbc:<category>, sotu[:Y0-Y1], a folder of .txt files,
a .txt or .jsonl file). The output folder loads with ``import dsmoe; AutoModelForCausalLM.from_pretrained(OUT)``
(a RoutedLM); export it with launch/export.py OUT X --to mixtral.
"""
import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="HF folders, one per expert")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--router_init", default="random", choices=("random", "hidden", "gate"))
    p.add_argument("--gating", default=None, help="gate folder (router_init gate)")
    p.add_argument("--prompts", nargs="+", default=None, help="one domain spec per model (router_init hidden)")
    p.add_argument("--max_prompts", type=int, default=16, help="texts per domain for router_init hidden")
    p.add_argument("--shared_expert", action="store_true", help="add --base's FFN as an always-on shared expert")
    p.add_argument("--base", default=None, help="the model the experts were fine-tuned from")
    p.add_argument("--trunk", default="average", choices=("average", "first"))
    p.add_argument("--moe", nargs="*", default=[], help="RoutedLMConfig fields as key=value (YAML values)")
    a = p.parse_args(argv)
    import yaml
    from dsmoe.mixtures import btx_merge
    from dsmoe.mixtures.domain_texts import load_domain
    out = Path(a.out)
    try:
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {out}: exists and is not empty; choose a new folder (nothing was overwritten)")
        overrides = {}
        for item in a.moe:
            key, _, value = item.partition("=")
            if not key or not value:
                raise ValueError(f"--moe {item}: write RoutedLMConfig fields as key=value")
            overrides[key] = yaml.safe_load(value)
        prompts = None
        if a.prompts is not None:
            if len(a.prompts) != len(a.models):
                raise ValueError(f"--prompts: {len(a.prompts)} specs for {len(a.models)} models; give one per model")
            prompts = [load_domain(s, a.max_prompts, max_chars=2000) for s in a.prompts]
        model = btx_merge(a.models, top_k=a.top_k, router_init=a.router_init, gating=a.gating,
                          shared_expert=a.shared_expert, base=a.base, trunk=a.trunk, prompts=prompts, **overrides)
    except ValueError as e:
        print(f"dsmoe: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    try:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(a.models[0]).save_pretrained(tmp)
    except (OSError, ValueError):
        pass                                        # the first model has no tokenizer: weights only
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    cfg = model.config
    print(f"BTX model written to {out}: {cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok}, "
          f"{len(cfg.moe_layers)} MoE layers, router init {a.router_init}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
