"""MoELayer(backend="deepspeed"): config validation, single-process equivalence, and a real 2-process run."""
from __future__ import annotations

import json

import pytest
import torch

from dsmoe.moe import MoEConfig
from dsmoe.moe import build_moe_layer as MoELayer
from dsmoe.moe.deepspeed_layer import DeepSpeedMoELayer
from launch_utils import REPO_ROOT, check_returncode, run_deepspeed

BASE = dict(hidden_size=16, expert_hidden_size=8, num_experts=4, backend="deepspeed")


# ---------------------------------------------------------------- validation (no processes)
@pytest.mark.parametrize("field, overrides", [
    ("num_null_experts", dict(num_null_experts=1)),
    ("score_func", dict(score_func="sigmoid")),
    ("num_groups", dict(num_groups=2)),
    ("bias_balancing", dict(bias_balancing=True)),
    ("num_shared_experts", dict(num_shared_experts=1)),
    ("shared_expert_hidden_size", dict(shared_expert_hidden_size=8)),
    ("seq_aux_loss_coef", dict(seq_aux_loss_coef=0.01)),
    ("z_loss_coef", dict(z_loss_coef=1e-3)),
    ("entropy_loss_coef", dict(entropy_loss_coef=0.1)),
    ("random_routing", dict(random_routing=True)),
    ("drop_policy", dict(drop_policy="position", capacity_factor=1.0)),
    ("norm_topk_prob", dict(top_k=2, norm_topk_prob=False)),
    ("norm_topk_prob", dict(top_k=1, norm_topk_prob=True)),
    ("router_bias", dict(router_bias=True)),
    ("router_temperature", dict(router_temperature=2.0)),
    ("router_jitter", dict(router_jitter=0.01)),
    ("routed_scaling_factor", dict(routed_scaling_factor=2.5)),
    ("max_capacity", dict(capacity_factor=1.0, max_capacity=8)),
    ("noisy_gate_policy", dict(noisy_gate_policy="Gumbel")),
    ("noisy_gate_policy", dict(top_k=2, noisy_gate_policy="RSample")),
    ("eval_capacity_factor", dict(capacity_factor=None, eval_capacity_factor=1.0)),
])
def test_unsupported_options_raise_naming_the_field(field, overrides):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}="):
        MoELayer(MoEConfig(**{**BASE, **overrides}))


def test_shared_experts_error_points_to_alternatives():
    with pytest.raises(ValueError, match="use_residual.*backend='dsmoe'"):
        MoELayer(MoEConfig(**BASE, num_shared_experts=2))


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(drop_policy="position"),                       # irrelevant when dropless
    dict(capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=1),
    dict(top_k=1, norm_topk_prob=False, noisy_gate_policy="RSample", capacity_factor=1.0),
    dict(top_k=3, noisy_gate_policy="Jitter", activation="gelu", use_residual=True),
])
def test_supported_options_build(overrides):
    layer = MoELayer(MoEConfig(**{**BASE, **overrides}))
    assert isinstance(layer, DeepSpeedMoELayer)
    assert layer.expert_parallel_size == 1 and layer.local_expert_range == (0, 4)
    assert len(layer.experts) == 4


# ---------------------------------------------------------------- single process (no process group needed)
def _copy_from_dsmoe(ds: DeepSpeedMoELayer, ref) -> None:
    f = ref.cfg.expert_hidden_size
    with torch.no_grad():
        ds.gate.wg.weight.copy_(ref.router.weight)
        for e, ex in enumerate(ds.experts):
            w_in, w_out = ref.experts.w_in[e], ref.experts.w_out[e]
            if ex.gate_proj is not None:
                ex.gate_proj.weight.copy_(w_in[:, :f].t())
                ex.up_proj.weight.copy_(w_in[:, f:].t())
            else:
                ex.up_proj.weight.copy_(w_in.t())
            ex.down_proj.weight.copy_(w_out.t())


@pytest.mark.parametrize("top_k, activation", [(1, "gelu"), (2, "swiglu"), (3, "swiglu")])
def test_dropless_matches_dsmoe_backend(top_k, activation):
    kw = dict(hidden_size=16, expert_hidden_size=8, num_experts=6, top_k=top_k, norm_topk_prob=top_k > 1,
              activation=activation, aux_loss_coef=0.01)
    torch.manual_seed(0)
    ref = MoELayer(MoEConfig(**kw))
    ds = MoELayer(MoEConfig(**kw, backend="deepspeed"))
    _copy_from_dsmoe(ds, ref)
    x = torch.randn(2, 20, 16)
    a, b = ref(x), ds(x)
    torch.testing.assert_close(b.hidden_states, a.hidden_states)
    assert torch.equal(b.stats["tokens_per_expert"], a.stats["tokens_per_expert"])
    assert b.stats["dropped_tokens"] == 0 and b.stats["null_fraction"] == 0.0
    if top_k != 2:      # DeepSpeed's top-2 balance loss counts first choices only
        torch.testing.assert_close(b.aux_loss, a.aux_loss)
    b.hidden_states.sum().backward()
    assert ds.gate.wg.weight.grad is not None


def test_capacity_stats_and_override():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**BASE, top_k=2, capacity_factor=0.5, min_capacity=1, aux_loss_coef=0.01))
    x = torch.randn(40, 16)
    out = layer(x)
    st = out.stats
    assert out.hidden_states.shape == x.shape and out.aux_loss.dim() == 0
    assert st["tokens_per_expert"].dtype == torch.long and st["tokens_per_expert"].shape == (4,)
    assert st["capacity"] == 10                         # ceil(40 / 4 * 0.5 * 2)
    assert int(st["tokens_per_expert"].max()) <= 10
    assert st["dropped_tokens"] > 0
    assert int(st["tokens_per_expert"].sum()) + st["dropped_tokens"] == 80
    assert torch.equal(st["routed_per_expert"].sum(), torch.tensor(80))
    dropless = layer(x, capacity_factor=None).stats
    assert dropless["dropped_tokens"] == 0 and dropless["capacity"] is None
    assert layer(x).stats["capacity"] == 10             # override did not stick
    layer.capacity_factor = None
    assert layer.capacity_factor is None and layer(x).stats["dropped_tokens"] == 0


def test_wrong_input_and_unsupported_forward_args():
    layer = MoELayer(MoEConfig(**BASE))
    with pytest.raises(ValueError, match="hidden_size=16"):
        layer(torch.randn(4, 15))
    with pytest.raises(ValueError, match="hidden_size=16"):
        layer(torch.randn(16))
    with pytest.raises(ValueError, match="token_priority"):
        layer(torch.randn(8, 16), token_priority=torch.rand(8))
    top1 = MoELayer(MoEConfig(**BASE, top_k=1, norm_topk_prob=False, min_capacity=4))
    with pytest.raises(ValueError, match="min_capacity"):
        top1(torch.randn(3, 16))


def test_apply_expert_parallel_needs_distributed():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_distributed"):
        MoELayer(MoEConfig(**BASE)).apply_expert_parallel()


# ---------------------------------------------------------------- 2 processes under the deepspeed launcher
@pytest.mark.slow
def test_two_process_expert_parallel_with_zero2(tmp_path):
    out = tmp_path / "result.json"
    proc = run_deepspeed(REPO_ROOT / "tests" / "scripts" / "ds_backend_worker.py", ["--out", out, "--steps", "8"],
                         num_procs=2, timeout=300)
    check_returncode(proc)
    ranks = json.loads(out.read_text())["ranks"]
    assert len(ranks) == 2 and all(r["world"] == 2 for r in ranks)

    for name, k in (("capacity", 2), ("dropless", 1)):
        r0, r1 = (r[name] for r in ranks)
        for rank, r in enumerate((r0, r1)):
            assert r["class"] == "DeepSpeedMoELayer" and r["ep_size"] == 2
            assert r["local_expert_range"] == [2 * rank, 2 * rank + 2]
            assert r["local_experts_match_global"], "rank keeps global experts [r*E/P, (r+1)*E/P)"
            assert r["expert_tags"] == [["False", "ep_size_2"]] and not r["gate_tagged"]
            assert r["out_shape"] == [2, 12, 16] and r["flat_input_ok"] and r["aux_is_scalar"]
            # sharded layer == unsharded reference on the same rank-local tokens (forward and backward)
            assert r["max_out_diff"] < 1e-5 and r["aux_diff"] < 1e-6
            assert r["gate_grad_diff"] < 1e-6 and r["expert_grad_diff"] < 1e-6
            # stats are summed over the EP group and count computed assignments
            assert r["tokens_per_expert_dtype"] == "torch.int64" and r["null_fraction"] == 0.0
            assert r["tokens_per_expert"] == r["ref_tokens_per_expert_sum"]
            assert r["dropped_tokens"] == r["ref_dropped_sum"]
            assert sum(r["tokens_per_expert"]) + r["dropped_tokens"] == r["assignments"] == 2 * 24 * k
        assert r0["tokens_per_expert"] == r1["tokens_per_expert"]
    assert ranks[0]["dropless"]["dropped_tokens"] == 0

    for r in ranks:
        t = r["train"]
        assert t["has_moe_layers"]
        assert t["losses"][-1] < t["losses"][0], t["losses"]
        assert t["gate_identical"], "dense gate must stay replicated under ZeRO-2"
        assert t["experts_differ"], "ranks hold different experts"
        assert "num_experts=3" in r["indivisible_error"]
