"""launch/train.py in debug mode: learning, exact resume, atomic saves, SIGTERM, export/eval, bad configs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from launch_utils import REPO_ROOT, launch_env
from train_utils import TINY, TRAIN, losses, summary, train_debug


def test_debug_training_learns_and_resumes_exactly(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train_debug(full)
    train_debug(split, "train.steps_per_run=8")
    # a save killed half-way leaves only a .tmp folder: it must be ignored on resume
    junk = split / "checkpoints" / "step_00000012.tmp"
    junk.mkdir()
    (junk / "trainer_state.json").write_text("{broken")
    proc = train_debug(split)                      # the same command again resumes at step 8
    a, b = losses(full), losses(split)
    assert sorted(a) == list(range(1, 17)) and sorted(b) == list(range(1, 17))
    assert [a[s] for s in range(1, 17)] == [b[s] for s in range(1, 17)], "resumed run must reproduce the losses"
    first, last = sum(a[s] for s in range(1, 5)) / 4, sum(a[s] for s in range(13, 17)) / 4
    assert last < first - 0.3, (first, last)
    s = summary(full)
    assert s["steps"] == 16 and s["val_perplexity"] > 1
    assert summary(split)["val_loss"] == pytest.approx(s["val_loss"], rel=1e-6)
    for f in ("loss_curve.png", "expert_load.png", "metrics.jsonl", "config.json"):
        assert (full / f).exists(), f
    assert list((full / "tensorboard").iterdir())
    rec = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()][0]
    for key in ("step", "loss", "lr", "tokens_per_s", "aux_loss", "expert_load", "dropped_tokens", "null_fraction"):
        assert key in rec, key
    assert len(rec["expert_load"]) == 2 and len(rec["expert_load"][0]) == 4
    assert "held-out" in proc.stdout and "expert load" in proc.stdout

    # export: an HF folder that loads through the Auto classes with the logits the trainer evaluated
    out = tmp_path / "hf"
    subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "export.py"), str(full), str(out)], check=True,
                   cwd=REPO_ROOT, env=launch_env(), capture_output=True)
    ev = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "eval.py"), str(full)], cwd=REPO_ROOT,
                        env=launch_env(), capture_output=True, text=True, check=True)
    assert json.loads(ev.stdout)["val_loss"] == pytest.approx(s["val_loss"], rel=1e-5)
    import dsmoe  # noqa: F401
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = AutoModelForCausalLM.from_pretrained(full / "checkpoints" / "step_00000016" / "model").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert (out / "tokenizer.json").exists() or (out / "vocab.json").exists()
    again = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "export.py"), str(full), str(out)],
                           cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr and (out / "config.json").exists()
    # the exported folder evaluates with the tokenizer it carries, on the recorded held-out split
    ev_out = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "eval.py"), str(out)], cwd=REPO_ROOT,
                            env=launch_env(), capture_output=True, text=True)
    assert ev_out.returncode == 0, ev_out.stderr[-2000:]
    assert json.loads(ev_out.stdout)["val_loss"] == pytest.approx(s["val_loss"], rel=1e-5)

    # nothing in a checkpoint of dsmoe's own optimizer is a pickle: resuming unpickles nothing
    ckpt = full / "checkpoints" / "step_00000016"
    files = [p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()]
    assert not [f for f in files if not f.endswith((".safetensors", ".json"))], files
    assert "rng/rank_0.safetensors" in files and "optimizer.safetensors" in files


def test_sigterm_saves_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(TRAIN), "--config", str(TINY), "--debug", f"train.output_dir={out}",
           "train.max_steps=100000", "train.save_every=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text[-3000:]
    state = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "trainer_state.json")
                       .read_text())
    assert state["step"] >= 3
    assert "SIGTERM" in text


@pytest.mark.parametrize("override,needle", [
    ("model.n_routed_experts=5", "model.n_routed_experts=5"),          # not divisible by ep=2 (below)
    ("model.num_experts_per_tok=9", "num_experts_per_tok"),
    ("train.nonsense=1", "train.nonsense"),
    ("deepspeed=ds_configs/missing.json", "deepspeed=ds_configs/missing.json"),
    ("model.hidden_sizee=3", "model.hidden_sizee"),
    ("model.n_routed_expert=8", "did you mean 'n_routed_experts'"),
    ("train.max_step=8", "did you mean 'max_steps'"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, override, needle):
    proc = train_debug(tmp_path / "run", "parallel.expert_parallel_size=2", override, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("dsmoe: error")]
    assert len(err) == 1 and needle in err[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_config_file_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", str(tmp_path / "nope.yaml")], cwd=REPO_ROOT,
                          env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr


def test_zero_stage_change_in_debug_mode_uses_portable_moments_and_names_a_bad_file(tmp_path):
    """Debug mode under ZeRO-2 after a run without ZeRO is another topology: the moments come from
    optimizer.safetensors. A damaged file stops the run with exit 2 and one line naming it and the fix, and
    the checkpoint stays as it was."""
    run = tmp_path / "run"
    train_debug(run, "train.max_steps=4", "train.save_every=2", "train.steps_per_run=2")
    moments = run / "checkpoints" / "step_00000002" / "optimizer.safetensors"
    good = moments.read_bytes()
    moments.write_bytes(b"not a safetensors file")
    proc = train_debug(run, "train.max_steps=4", "train.save_every=2", "deepspeed=ds_configs/zero2.json",
                       check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and str(moments) in last and "fresh optimizer moments" in last, proc.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    moments.write_bytes(good)
    proc = train_debug(run, "train.max_steps=4", "train.save_every=2", "deepspeed=ds_configs/zero2.json")
    assert "optimizer moments, step, schedule and data position are restored" in proc.stdout
    assert sorted(losses(run)) == [1, 2, 3, 4]
