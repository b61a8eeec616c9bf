#!/usr/bin/env python
"""Per-domain held-out perplexity of FFN-merge experts, the merge (both routing modes, under its gate), the oracle
merge (gold domain) and optional RoutedLMs (e.g. a BTX model before / after its fine-tune), plus gate accuracy.

  python launch/eval_merge.py --experts A B --gating GATE --domains SPEC_A SPEC_B --out runs/eval_merge \\
      [--btx BTX_DIR ...] [--base BASE_DIR] [--max_texts 20] [--max_chars 2000] [--seq_len 256]

--domains: one held-out text source per expert, in expert order (bbc:<category>, sotu[:Y0-Y1], a folder of .txt
files, a .txt or .jsonl file); keep them disjoint from the fine-tuning texts. Writes merge_eval.json and
merge_eval.png to --out; every row scores the same tokens.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", nargs="+", required=True, help="the merged models' folders, in gate-class order")
    p.add_argument("--gating", default=None, help="gate folder (without it only the experts and the oracle run)")
    p.add_argument("--domains", nargs="+", required=True, help="one held-out text source per expert")
    p.add_argument("--btx", nargs="*", default=[], help="RoutedLM folders to score too (e.g. BTX before/after)")
    p.add_argument("--base", default=None, help="the experts' base model, scored as the row 'base'")
    p.add_argument("--out", required=True)
    p.add_argument("--max_texts", type=int, default=20, help="texts per domain")
    p.add_argument("--max_chars", type=int, default=2000, help="characters kept per text")
    p.add_argument("--seq_len", type=int, default=256, help="tokens scored per text")
    p.add_argument("--allow_different_trunks", action="store_true")
    a = p.parse_args(argv)
    import torch
    import dsmoe  # noqa: F401
    from transformers import AutoModelForCausalLM
    from dsmoe.benchmarking import machine_line
    from dsmoe.mixtures import FFNMergeForCausalLM
    from dsmoe.mixtures.domain_texts import domain_name, load_domain
    from dsmoe.mixtures.merge_eval import evaluate_merge, write_report
    try:
        if len(a.domains) != len(a.experts):
            raise ValueError(f"--domains: {len(a.domains)} sources for {len(a.experts)} experts; give one each")
        for folder in [*a.experts, *a.btx, *([a.base] if a.base else [])]:
            if not (Path(folder) / "config.json").is_file():
                raise ValueError(f"{folder}: not an HF model folder (no config.json)")
        experts = [AutoModelForCausalLM.from_pretrained(e, dtype=torch.float32) for e in a.experts]
        merge = FFNMergeForCausalLM.from_components(experts, gating=a.gating, names=list(a.experts),
                                                    allow_different_trunks=a.allow_different_trunks,
                                                    tokenizer=_tokenizer(a.experts[0]))
        texts = {domain_name(s): load_domain(s, a.max_texts, a.max_chars) for s in a.domains}
        if len(texts) != len(a.domains):
            raise ValueError(f"--domains: two sources share a name ({a.domains}); give distinct sources")
        extra = {"base": AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)} if a.base else {}
        extra.update({f"routed {_label(b)}": AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
                      for b in a.btx})
        result = evaluate_merge(merge, experts, texts, extra, seq_len=a.seq_len)
    except ValueError as e:
        print(f"dsmoe: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    result.machine = machine_line("cpu", torch.float32)
    js, png = write_report(result, a.out)
    width = max(len(r) for r in result.perplexity)
    print(f"{'':{width}}  " + "  ".join(f"{d:>12}" for d in result.domains))
    for row, ppl in result.perplexity.items():
        print(f"{row:{width}}  " + "  ".join(f"{ppl[d]:12.3f}" for d in result.domains))
    if result.gate_accuracy:
        print("gate accuracy: " + ", ".join(f"{d} {v:.3f}" for d, v in result.gate_accuracy.items()))
    print(f"wrote {js} and {png}")
    return 0


def _label(folder) -> str:
    """A row name for a model folder: its name, or its run's name for a run's exported ``hf`` folder."""
    path = Path(folder).resolve()
    return path.parent.name if path.name == "hf" else path.name


def _tokenizer(folder):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        raise ValueError(f"{folder}: has no tokenizer; save the experts with their tokenizer") from None


if __name__ == "__main__":
    sys.exit(main())
