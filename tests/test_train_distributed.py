"""`deepspeed --num_gpus 2 launch/train.py` on CPU: expert parallelism under ZeRO-2/3, EP-size changes on resume."""
import json
import subprocess
import sys

import pytest

from launch_utils import REPO_ROOT, launch_env
from train_utils import losses, summary, train_debug, train_deepspeed

STEPS = ["train.max_steps=8", "train.save_every=4"]


def _close(a: dict, b: dict, rel=1e-4):
    assert sorted(a) == sorted(b)
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=rel), (s, a[s], b[s])


@pytest.mark.parametrize("zero", ["zero1", "zero2", "zero3"])
def test_expert_parallel_training_matches_ep1(tmp_path, zero):
    """EP=2 (each rank holds 2 of 4 experts) trains like EP=1 (all experts everywhere) on the same data."""
    ep1, ep2 = tmp_path / "ep1", tmp_path / "ep2"
    train_deepspeed(ep1, *STEPS, "parallel.expert_parallel_size=1", f"deepspeed=ds_configs/{zero}.json")
    train_deepspeed(ep2, *STEPS, "parallel.expert_parallel_size=2", f"deepspeed=ds_configs/{zero}.json")
    a, b = losses(ep1), losses(ep2)
    assert len(a) == 8
    _close(a, b)
    assert summary(ep2)["val_loss"] == pytest.approx(summary(ep1)["val_loss"], rel=1e-4)
    # the gathered export of the sharded run evaluates to what the sharded trainer measured
    ev = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "eval.py"), str(ep2)], cwd=REPO_ROOT,
                        env=launch_env(), capture_output=True, text=True, check=True)
    assert json.loads(ev.stdout)["val_loss"] == pytest.approx(summary(ep2)["val_loss"], rel=1e-5)


def _weights_at_resume_are_the_checkpoint(run_dir, step):
    import torch
    from safetensors.torch import load_file
    saved = load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model" / "model.safetensors"))
    experts = [k for k in saved if k.endswith("experts.w_in")]
    assert experts and saved[experts[0]].shape[0] == 4, "checkpoints hold all experts in global order"
    return saved


def test_resume_from_ep2_with_ep1(tmp_path):
    run = tmp_path / "run"
    train_deepspeed(run, *STEPS, "train.steps_per_run=4", "parallel.expert_parallel_size=2",
                    "deepspeed=ds_configs/zero2.json")
    assert max(losses(run)) == 4
    _weights_at_resume_are_the_checkpoint(run, 4)
    proc = train_debug(run, *STEPS)                       # one process, EP=1, from the EP=2 checkpoint
    assert "optimizer moments restart" in proc.stdout
    ls = losses(run)
    assert sorted(ls) == list(range(1, 9))
    assert ls[5] < ls[1] and abs(ls[5] - ls[4]) < 0.5, ls    # continues, not restarted from scratch
    assert summary(run)["steps"] == 8


def test_resume_from_ep1_with_ep2_zero3(tmp_path):
    run = tmp_path / "run"
    train_debug(run, *STEPS, "train.steps_per_run=4")
    train_deepspeed(run, *STEPS, "parallel.expert_parallel_size=2", "deepspeed=ds_configs/zero3.json")
    ls = losses(run)
    assert sorted(ls) == list(range(1, 9))
    assert ls[5] < ls[1] and abs(ls[5] - ls[4]) < 0.5, ls
    saved = _weights_at_resume_are_the_checkpoint(run, 8)
    assert summary(run)["steps"] == 8 and len(saved) > 10


DS_NATIVE = ["model.moe_backend=deepspeed", "model.n_shared_experts=0", "model.use_null_expert=0",
             "model.topk_method=greedy", "model.z_loss_coef=0", "model.eval_dropless=false"]


def test_deepspeed_native_layers_train_under_zero2_with_ep2(tmp_path):
    run = tmp_path / "run"
    train_deepspeed(run, *STEPS, "parallel.expert_parallel_size=2", "deepspeed=ds_configs/zero2.json", *DS_NATIVE)
    ls = losses(run)
    assert len(ls) == 8 and ls[8] < ls[1] - 0.3, ls
    from safetensors.torch import load_file
    saved = load_file(str(run / "checkpoints" / "step_00000008" / "model" / "model.safetensors"))
    assert any("deepspeed_moe" in k for k in saved), "native layers are saved under their own names"


def test_deepspeed_native_layers_refuse_zero3(tmp_path):
    proc = train_debug(tmp_path / "run", "deepspeed=ds_configs/zero3.json", *DS_NATIVE, check=False, timeout=120)
    assert proc.returncode == 2 and "ZeRO stage 3" in proc.stderr, proc.stderr[-2000:]
