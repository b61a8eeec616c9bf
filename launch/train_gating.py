#!/usr/bin/env python
"""Train the prompt gate of an FFN merge: an MLP on mean-pooled embeddings of a frozen encoder that predicts
which domain (= which merged model) a prompt comes from.

  python launch/train_gating.py --base_model ENCODER_DIR --output_dir runs/gate \\
      --domains bbc:business bbc:sports [--hidden_dims 512,256 --num_epochs 10 ...]

One --domains spec per merged model, in model order (bbc:<category>, sotu[:Y0-Y1], a folder of .txt files, a
.txt or .jsonl file). Writes best_model.safetensors (best validation macro-F1), final_model.safetensors and
training_info.json. --config JSON holds the same keys (flags given on the command line win).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAGS = {"base_model": str, "output_dir": str, "hidden_dims": str, "dropout": float, "learning_rate": float,
         "batch_size": int, "num_epochs": int, "weight_decay": float, "train_split": float, "val_split": float,
         "test_split": float, "seed": int, "max_length": int}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, kind in FLAGS.items():
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--domains", nargs="+", default=None, help="one text source per merged model")
    p.add_argument("--max_texts_per_domain", type=int, default=None)
    p.add_argument("--max_chars", type=int, default=2000, help="characters kept per text (default 2000)")
    p.add_argument("--config", default=None, help="JSON file with any of the keys above")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    from dsmoe.mixtures.domain_texts import domain_name, load_domain
    from dsmoe.mixtures.gating import GatingConfig, train_gating
    try:
        settings = {}
        if a.config is not None:
            try:
                settings = json.loads(Path(a.config).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"--config {a.config}: cannot read it as JSON ({type(e).__name__})") from None
        settings.update({k: v for k, v in vars(a).items() if v is not None and k != "config"})
        domains = settings.pop("domains", None)
        if not domains or len(domains) < 2:
            raise ValueError("--domains: give one text source per merged model (at least 2)")
        per_domain, max_chars = settings.pop("max_texts_per_domain", None), settings.pop("max_chars", None)
        unknown = sorted(set(settings) - set(FLAGS))
        if unknown:
            raise ValueError(f"--config {a.config}: unknown key(s) {unknown}")
        if not settings.get("base_model"):
            raise ValueError("--base_model: give the HF folder of the frozen encoder")
        cfg = GatingConfig(**settings)
        texts, labels = [], []
        for i, spec in enumerate(domains):
            got = load_domain(spec, per_domain, max_chars, seed=cfg.seed)
            texts += got
            labels += [i] * len(got)
        result = train_gating(texts, labels, cfg, class_names=[domain_name(d) for d in domains])
    except ValueError as e:
        print(f"dsmoe: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    t = result.test
    print(f"gate written to {result.output_dir}: best epoch {result.best_epoch}, test accuracy {t.accuracy:.3f}, "
          f"macro-F1 {t.macro_f1:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
