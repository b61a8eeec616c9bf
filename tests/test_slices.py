"""Slice experts from one command (launch/train.py with slices.ranges): a shared tokenizer, one run per slice on
its years only, the all-slices baseline with the experts' total steps, HF folders that carry their slice and mix
in ExpertMixtureForCausalLM; re-running skips finished runs; slices.only picks one job-array task."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from launch_utils import REPO_ROOT, launch_env
from train_utils import train_debug

SLICES = "slices.ranges=[1790-1899,1900-2026]"


def test_slice_experts_baseline_and_mixture(tmp_path):
    out = tmp_path / "sl"
    proc = train_debug(out, SLICES, "train.max_steps=4", "train.save_every=4", "train.plots=false",
                       "mixture.gate_steps=5")
    # ... and the mixture of the experts, its gate trained on the training documents, the table on held-out ones
    table = json.loads((out / "mixture" / "mixture_eval.json").read_text())
    rows = {r["name"] for r in table["rows"]}
    assert {"expert:1790-1899", "expert:1900-2026", "dense", "equal", "router", "argmax", "oracle"} <= rows, rows
    assert "scored tokens" in proc.stdout and (out / "mixture" / "mixture_eval.png").stat().st_size > 0
    index = json.loads((out / "slices.json").read_text())
    assert list(index) == ["1790-1899", "1900-2026", "baseline"]
    assert index["baseline"]["steps"] == 8 and index["1790-1899"]["steps"] == 4
    tok = (out / "tokenizer" / "tokenizer.json").read_text()
    slices = []
    for name, (lo, hi) in (("1790-1899", (1790, 1899)), ("1900-2026", (1900, 2026))):
        hf = out / "experts" / name / "hf"
        conf = json.loads((hf / "config.json").read_text())
        assert conf["dsmoe_slice"] == {"name": name, "start_year": lo, "end_year": hi}
        run = json.loads((hf / "dsmoe_run.json").read_text())["config"]
        assert (run["data"]["year_min"], run["data"]["year_max"]) == (lo, hi)       # its own years only
        assert (hf / "tokenizer.json").read_text() == tok                          # one shared vocabulary
        slices.append((lo, hi))
    base = json.loads((out / "baseline" / "hf" / "dsmoe_run.json").read_text())["config"]
    assert (base["data"]["year_min"], base["data"]["year_max"]) == (1790, 2026)
    assert json.loads((out / "baseline" / "hf" / "config.json").read_text()).get("dsmoe_slice") is None

    import dsmoe  # noqa: F401
    from dsmoe.mixtures import ExpertMixtureForCausalLM
    mix = ExpertMixtureForCausalLM.from_experts([str(out / "experts" / n / "hf") for n in index if n != "baseline"],
                                                combine="logprob")           # slices and names from the folders
    assert mix.config.slices == [list(s) for s in slices] and mix.config.expert_names == ["1790-1899", "1900-2026"]
    ids = torch.randint(0, 512, (2, 12))
    w = mix(ids, date=1850, mode="equal").expert_weights
    assert torch.all(w[..., 1] == 0) and torch.allclose(w[..., 0], torch.ones_like(w[..., 0]))

    # the same command again: every run is finished, nothing is retrained or lost
    before = sorted(p.name for p in (out / "experts" / "1790-1899" / "checkpoints").iterdir())
    proc = train_debug(out, SLICES, "train.max_steps=4", "train.save_every=4", "train.plots=false",
                       "mixture.gate_steps=5")
    assert "already at train.max_steps" in proc.stdout
    again = json.loads((out / "mixture" / "mixture_eval.json").read_text())
    assert again["rows"] == table["rows"]                                   # the same table (seeded gate)
    assert sorted(p.name for p in (out / "experts" / "1790-1899" / "checkpoints").iterdir()) == before


def test_period_token_experts_share_the_grown_vocabulary_and_eval_reproduces_the_table(tmp_path):
    """Prompt variant C through the whole command: the slices' period tokens join the one shared tokenizer (and
    every expert's vocabulary), the run records its data section in the mixture folder, and
    ``eval_mixture.py RUN_DIR`` reproduces the table of the end of training (prompt, cuts and baseline found)."""
    out = tmp_path / "c"
    train_debug(out, SLICES, "train.max_steps=2", "train.save_every=2", "train.plots=false", "mixture.gate_steps=3",
                "data.prompt=period_token", "slices.baseline=false")
    from transformers import AutoConfig, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert {"<|1790-1899|>", "<|1900-2026|>"} <= set(tok.get_vocab())
    assert AutoConfig.from_pretrained(out / "experts" / "1900-2026" / "hf").vocab_size == len(tok) == 514
    table = json.loads((out / "mixture" / "mixture_eval.json").read_text())
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "eval_mixture.py"), str(out), "--out",
                           str(tmp_path / "again")], cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert json.loads((tmp_path / "again" / "mixture_eval.json").read_text()) == table


def test_only_one_slice_and_bad_slices(tmp_path):
    out = tmp_path / "one"
    proc = train_debug(out, SLICES, "slices.only=1", "train.max_steps=2", "train.plots=false")
    assert (out / "experts" / "1900-2026" / "hf" / "config.json").exists()
    assert "mixture: waiting for 1790-1899, baseline" in proc.stdout and not (out / "mixture").exists()
    assert not (out / "experts" / "1790-1899").exists() and not (out / "baseline").exists()
    for ranges, needle in (("[1790-1899,1850-2026]", "slices.ranges[1]='1850-2026': overlaps or precedes 1790-1899"),
                           ("[1600-1700,1790-2026]", "slices.ranges[0]=1600-1700: no documents"),
                           ("[1900-1800]", "slices.ranges[0]='1900-1800': starts after it ends")):
        proc = train_debug(tmp_path / "bad", f"slices.ranges={ranges}", "train.max_steps=2", check=False)
        lines = [x for x in proc.stderr.splitlines() if x.startswith("dsmoe: error:")]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-1500:]

    proc = train_debug(tmp_path / "bad", SLICES, "mixture.top_k=3", check=False)
    assert proc.returncode == 2 and "mixture.top_k=3: must be between 1 and the number of slices (2)" in proc.stderr
