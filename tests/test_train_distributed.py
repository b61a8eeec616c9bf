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


ZERO2 = "deepspeed=ds_configs/zero2.json"


def _moments_file(run_dir, step):
    from safetensors import safe_open
    with safe_open(str(run_dir / "checkpoints" / f"step_{step:08d}" / "optimizer.safetensors"), "pt") as fh:
        assert fh.metadata()["adam_step"] == str(step)
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    experts = [k for k in shapes if k.endswith("experts.w_in.exp_avg_sq")]
    assert experts and shapes[experts[0]][0] == 4, "moments hold all experts in global order"
    return shapes


def test_resume_with_another_ep_size_and_zero_stage_carries_adam_state(tmp_path):
    """On the same 2 ranks, a run that changes expert-parallel size (and ZeRO stage) at a checkpoint continues
    with the same weights, Adam moments, schedule and data: its 8 losses are the uninterrupted run's."""
    ref, a, b = tmp_path / "ref", tmp_path / "ep2_then_ep1", tmp_path / "ep1_then_ep2_zero3"
    train_deepspeed(ref, *STEPS, "parallel.expert_parallel_size=1", ZERO2)

    train_deepspeed(a, *STEPS, "train.steps_per_run=4", "parallel.expert_parallel_size=2", ZERO2)
    assert max(losses(a)) == 4
    _weights_at_resume_are_the_checkpoint(a, 4)
    _moments_file(a, 4)
    proc = train_deepspeed(a, *STEPS, "parallel.expert_parallel_size=1", ZERO2)
    assert "optimizer moments, step, schedule and data position are restored" in proc.stdout, proc.stdout[-3000:]
    _close(losses(a), losses(ref))

    train_deepspeed(b, *STEPS, "train.steps_per_run=4", "parallel.expert_parallel_size=1", ZERO2)
    train_deepspeed(b, *STEPS, "parallel.expert_parallel_size=2", "deepspeed=ds_configs/zero3.json")
    _close(losses(b), losses(ref))
    saved = _weights_at_resume_are_the_checkpoint(b, 8)
    assert summary(b)["steps"] == 8 and len(saved) > 10
    _moments_file(b, 8)                                   # ZeRO-3 + EP=2 writes them too


def test_resume_from_ep2_with_debug_mode(tmp_path):
    """A 2-process EP=2 checkpoint continues in single-process debug mode (another world size: the data split
    differs, so the losses continue rather than match)."""
    run = tmp_path / "run"
    train_deepspeed(run, *STEPS, "train.steps_per_run=4", "parallel.expert_parallel_size=2", ZERO2)
    proc = train_debug(run, *STEPS)
    assert "optimizer moments, step, schedule and data position are restored" in proc.stdout
    ls = losses(run)
    assert sorted(ls) == list(range(1, 9))
    assert ls[5] < ls[1] and abs(ls[5] - ls[4]) < 0.5, ls    # continues, not restarted from scratch
    assert summary(run)["steps"] == 8


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
    import re
    experts = {int(m.group(1)) for k in saved for m in [re.search(r"deepspeed_experts\.(\d+)\.", k)] if m}
    assert experts == {0, 1, 2, 3}, f"each rank's 2 local experts are saved by global index: {experts}"
    moments = run / "checkpoints" / "step_00000008" / "optimizer.safetensors"
    assert moments.exists(), "DeepSpeed-native layers get portable Adam moments too"


def test_deepspeed_native_layers_refuse_zero3(tmp_path):
    proc = train_debug(tmp_path / "run", "deepspeed=ds_configs/zero3.json", *DS_NATIVE, check=False, timeout=120)
    assert proc.returncode == 2 and "ZeRO stage 3" in proc.stderr, proc.stderr[-2000:]


def test_router_reset_is_the_same_under_every_zero_stage(tmp_path):
    """model.router_reset_step with EP=2 on 2 ranks: the trainer writes the fresh router weights (the same on
    every rank) into ZeRO's fp32 master copy too and clears their Adam moments, so without ZeRO, with ZeRO-2 and
    with ZeRO-3 the runs stay alike after the reset (were the optimizer step to undo it, they would part)."""
    runs = {z: tmp_path / z for z in ("debug", "zero2", "zero3")}
    for z, d in runs.items():
        proc = train_deepspeed(d, "train.max_steps=6", "train.save_every=100", "model.router_reset_step=3",
                               "parallel.expert_parallel_size=2", f"deepspeed=ds_configs/{z}.json")
        assert "step 3: routers reset" in proc.stdout, proc.stdout[-2000:]
    _close(losses(runs["debug"]), losses(runs["zero2"]))
    _close(losses(runs["zero2"]), losses(runs["zero3"]))
    import torch
    from safetensors.torch import load_file
    final = {z: load_file(str(d / "checkpoints" / "step_00000006" / "model" / "model.safetensors"))
             for z, d in runs.items()}
    routers = [k for k in final["debug"] if ".router." in k]
    assert routers
    for k in routers:
        torch.testing.assert_close(final["zero2"][k], final["debug"][k], rtol=1e-3, atol=1e-5, msg=k)
        torch.testing.assert_close(final["zero3"][k], final["debug"][k], rtol=1e-3, atol=1e-5, msg=k)


def test_bf16_config_trains_and_resumes_with_another_ep_size(tmp_path):
    """The *_bf16 configs (meant for GPUs) run on CPU too. EP=2 under ZeRO-2 in bf16 for 4 steps, then EP=1: the
    fp32 master weights travel in optimizer.safetensors beside the moments, and the run tracks the uninterrupted
    EP=1 run as closely as bf16 arithmetic allows."""
    bf16 = "deepspeed=ds_configs/zero2_bf16.json"
    ref, run = tmp_path / "ref", tmp_path / "run"
    train_deepspeed(ref, *STEPS, "parallel.expert_parallel_size=1", bf16)
    train_deepspeed(run, *STEPS, "train.steps_per_run=4", "parallel.expert_parallel_size=2", bf16)
    assert any(k.endswith(".fp32") for k in _moments_file(run, 4))
    train_deepspeed(run, *STEPS, "parallel.expert_parallel_size=1", bf16)
    a, b = losses(run), losses(ref)
    _close(a, b, rel=1e-3)
    assert a[8] < a[1] - 0.2, a


def test_zero3_offload_with_ep2_resumes_with_ep1(tmp_path):
    """ds_configs/zero3_offload.json (parameters and DeepSpeed's CPU Adam offloaded) with EP=2: it trains, and
    its checkpoint continues under EP=1 with the Adam state, matching the uninterrupted EP=1 run. DeepSpeed
    JIT-compiles its CPU Adam once, into this test's own folder (a killed build leaves a lock behind)."""
    offload = "deepspeed=ds_configs/zero3_offload.json"
    ext = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    ref, run = tmp_path / "ref", tmp_path / "run"
    steps = ["train.max_steps=4", "train.save_every=2"]
    train_deepspeed(run, *steps, "train.steps_per_run=2", "parallel.expert_parallel_size=2", offload, env=ext)
    assert max(losses(run)) == 2
    _moments_file(run, 2)
    proc = train_deepspeed(run, *steps, "parallel.expert_parallel_size=1", offload, env=ext)
    assert "optimizer moments, step, schedule and data position are restored" in proc.stdout, proc.stdout[-3000:]
    train_deepspeed(ref, *steps, "parallel.expert_parallel_size=1", offload, env=ext)
    _close(losses(run), losses(ref))
