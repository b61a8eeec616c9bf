"""Single-process behaviour of MoELayer: routing, null experts, capacity, losses, bias balancing, errors."""
import math

import pytest
import torch

from dsmoe.moe import MoEConfig, MoELayer
from dsmoe.moe import losses
from moe_reference import naive_moe

H, F_, E = 16, 32, 8


def make(seed=0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    base = dict(hidden_size=H, expert_hidden_size=F_, num_experts=E, top_k=2, init_std=0.3)
    base.update(kw)
    return MoELayer(MoEConfig(**base))


def x_(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n // 2, H, generator=g)


CONFIGS = {
    "dropless": {},
    "gelu": dict(activation="gelu"),
    "shared+gate": dict(num_shared_experts=2, shared_expert_gate=True),
    "null": dict(num_null_experts=4, top_k=3),
    "sigmoid-groups": dict(score_func="sigmoid", num_groups=4, topk_groups=2, routed_scaling_factor=2.5),
    "identity-nonorm": dict(score_func="identity", norm_topk_prob=False),
    "capacity-probs": dict(capacity_factor=0.5, min_capacity=1),
    "capacity-position": dict(capacity_factor=0.5, min_capacity=1, drop_policy="position"),
    "capacity-null-shared": dict(capacity_factor=0.75, min_capacity=1, num_null_experts=2, num_shared_experts=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_matches_naive_reference(name):
    layer = make(**CONFIGS[name])
    x = x_()
    out = layer(x)
    ref, counts, dropped = naive_moe(layer, x, layer.cfg.capacity_factor)
    torch.testing.assert_close(out.hidden_states, ref, rtol=1e-5, atol=1e-5)
    assert out.stats["tokens_per_expert"].tolist() == counts.tolist()
    assert out.stats["dropped_tokens"] == dropped
    if layer.cfg.capacity_factor is not None:
        assert dropped > 0, "the capacity test must actually drop something"


@pytest.mark.parametrize("ffn", [8, F_], ids=["F<H: weights in the experts", "F>=H: weights in the combine"])
@pytest.mark.parametrize("name", ["dropless", "gelu", "null", "capacity-null-shared"])
def test_gradients_match_naive_reference(name, ffn):
    """The routing weights are applied before the down projection when F < H and in the combine otherwise:
    both give the naive reference's gradients for the input, the experts and the router (null and dropped
    slots included)."""
    layer = make(expert_hidden_size=ffn, **CONFIGS[name])
    x = x_()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(xa).hidden_states
    g = torch.randn_like(out)
    out.backward(g)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    ref, _, _ = naive_moe(layer, xb, layer.cfg.capacity_factor)
    ref.backward(g)

    def close(a, b, msg):        # fp32 sums in another order: equal to 1e-5 of the gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=msg)

    close(xa.grad, xb.grad, "input")
    assert grads["router.weight"].abs().sum() > 0
    for n, p in layer.named_parameters():
        close(grads[n], p.grad, n)


@pytest.mark.parametrize("kernel", ["grouped", "padded", "bucketed", "auto"])
@pytest.mark.parametrize("name", ["shared+gate", "gelu", "null", "capacity-null-shared"])
def test_expert_kernels_equal_the_loop(kernel, name):
    """Grouped GEMM and the batched GEMMs over padded experts (one bucket or several) give the exact per-expert
    loop's outputs and gradients (input, experts, router), with null and dropped slots pointing at zero rows."""
    a = make(expert_kernel=kernel, **CONFIGS[name])
    b = make(expert_kernel="loop", **CONFIGS[name])
    x = x_()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    oa, ob = a(xa), b(xb)
    torch.testing.assert_close(oa.hidden_states, ob.hidden_states, rtol=1e-5, atol=1e-6)
    assert oa.stats["tokens_per_expert"].tolist() == ob.stats["tokens_per_expert"].tolist()
    g = torch.randn_like(oa.hidden_states)
    oa.hidden_states.backward(g), ob.hidden_states.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for (name_a, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name_a)


def test_bucketed_kernel_with_sorted_experts_equals_the_loop():
    """Enough tokens and a skewed router: the bucketed layout sorts the experts (gathering their weights), and
    outputs and gradients still equal the exact per-expert loop's."""
    from dsmoe.moe.buckets import MAX_BUCKETS, choose_buckets
    a = make(expert_kernel="bucketed", num_null_experts=1)
    b = make(expert_kernel="loop", num_null_experts=1)
    with torch.no_grad():
        for layer in (a, b):                 # a few experts draw far more tokens than the rest
            layer.router.weight[:3] *= torch.tensor([4.0, 3.0, 2.0]).unsqueeze(1)
    x = x_(n=1024)
    idx = a.router(x.reshape(-1, H)).topk_idx.reshape(-1)
    layout = choose_buckets(torch.bincount(idx[idx < E], minlength=E), MAX_BUCKETS)
    assert not layout.identity and len(layout.bounds) > 1, layout.bounds
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    oa, ob = a(xa), b(xb)
    torch.testing.assert_close(oa.hidden_states, ob.hidden_states, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(oa.hidden_states)
    oa.hidden_states.backward(g), ob.hidden_states.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for (name_a, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-5, msg=name_a)


def test_adaptive_kernel_tries_both_and_keeps_the_faster():
    """expert_kernel="adaptive" runs both layouts on its first calls (each equal to the loop), then uses the one
    its timings favour, probing the other every probe_every calls."""
    a = make(expert_kernel="adaptive", **CONFIGS["capacity-null-shared"])
    b = make(expert_kernel="loop", **CONFIGS["capacity-null-shared"])
    chooser = a.kernel_chooser
    x = x_()
    for i in range(4):
        xa = x.clone().requires_grad_(i % 2 == 1)          # samples with and without the backward timed
        oa = a(xa)
        torch.testing.assert_close(oa.hidden_states, b(x).hidden_states, rtol=1e-5, atol=1e-6)
        oa.hidden_states.sum().backward()
    assert all(len(v) == 2 for v in chooser.samples.values()), chooser.samples
    chooser.samples["bucketed"].extend([1.0] * 5)          # make bucketed look slow: grouped must win
    used = [chooser.pick() for _ in range(2 * chooser.probe_every)]
    assert used.count("bucketed") == 2 and set(used) == {"grouped", "bucketed"}
    assert chooser.summary()["choice"] == "grouped"


def test_padded_layout_points_unused_slots_at_zero_rows():
    from dsmoe.moe.row_plan import plan_rows
    expert = torch.tensor([0, 2, 0, 1, 2, 2])          # 3 tokens x k=2
    keep = torch.tensor([True, True, True, False, True, True])
    plan = plan_rows(expert, keep, 3, 2, max_buckets=1)
    assert plan.buckets.bounds == ((0, 3, 3),) and plan.counts.tolist() == [3, 3, 3]
    assert plan.routed_counts.tolist() == [2, 0, 3]
    rows = plan.slot_row.tolist()
    assert rows[0] == 0 and rows[2] == 1 and rows[1] == 6 and rows[4] == 7 and rows[5] == 8
    assert plan.row_slot[rows[3]] == 6, "the dropped slot must point at a zero row (no slot, weight 0)"
    grouped = plan_rows(expert, keep, 3, 2)
    assert grouped.num_rows == 6 and grouped.counts.tolist() == [2, 0, 4] and grouped.slot_row[3] == 5


@pytest.mark.parametrize("cf", [math.inf, 1e9])
def test_dropless_equals_infinite_capacity(cf):
    x = x_()
    dropless = make()(x)
    big = make(capacity_factor=cf)(x)
    torch.testing.assert_close(dropless.hidden_states, big.hidden_states, rtol=0, atol=0)
    assert big.stats["dropped_tokens"] == 0


def test_null_experts_cut_computed_assignments_exactly():
    layer = make(num_null_experts=4, top_k=2, router_bias=True)
    with torch.no_grad():
        layer.router.bias[E:] = 1.5          # make null choices popular
    x = x_(n=64)
    out = layer(x)
    idx = layer.router(x.reshape(-1, H)).topk_idx
    n_null = int((idx >= E).sum())
    assert 0 < n_null < idx.numel()
    assert int(out.stats["tokens_per_expert"].sum()) == idx.numel() - n_null
    assert out.stats["null_fraction"] == pytest.approx(n_null / idx.numel())
    # a token whose every choice is null keeps only its residual: the layer adds exactly zero
    all_null = (idx >= E).all(-1)
    assert all_null.any()
    assert out.hidden_states.reshape(-1, H)[all_null].abs().max() == 0


def _all_to_expert0(layer, n):
    """Route every token to expert 0 as its first choice, with weights that differ per token."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0
    x = torch.randn(n, H)
    x[:, 0] = torch.linspace(1, 2, n)[torch.randperm(n, generator=torch.Generator().manual_seed(3))]
    return x


def test_drop_policy_position_keeps_earliest_tokens():
    layer = make(top_k=1, capacity_factor=1.0, min_capacity=1, drop_policy="position")
    x = _all_to_expert0(layer, 16)          # capacity = ceil(16/8) = 2
    out = layer(x).hidden_states
    assert layer(x).stats["dropped_tokens"] == 14
    assert (out[:2].abs().sum(-1) > 0).all() and (out[2:] == 0).all()


def test_drop_policy_probs_keeps_highest_weights():
    layer = make(top_k=1, capacity_factor=1.0, min_capacity=1, drop_policy="probs", norm_topk_prob=False)
    x = _all_to_expert0(layer, 16)
    out = layer(x).hidden_states
    kept = (out.abs().sum(-1) > 0).nonzero().squeeze(1)
    assert sorted(kept.tolist()) == sorted(x[:, 0].topk(2).indices.tolist())


def test_capacity_override_and_priority():
    layer = make(top_k=1, capacity_factor=1.0, min_capacity=1)
    x = _all_to_expert0(layer, 16)
    assert layer(x, capacity_factor=4.0).stats["dropped_tokens"] == 16 - 8
    assert layer(x, capacity_factor=None).stats["dropped_tokens"] == 0
    prio = torch.zeros(16)
    prio[[5, 9]] = 1.0
    out = layer(x, token_priority=prio).hidden_states
    assert (out.abs().sum(-1) > 0).nonzero().squeeze(1).tolist() == [5, 9]


def test_group_limited_routing_respects_groups():
    layer = make(num_experts=16, num_groups=4, topk_groups=2, top_k=4, score_func="sigmoid")
    idx = layer.router(torch.randn(200, H)).topk_idx
    groups = idx // 4
    assert max(len(set(g.tolist())) for g in groups) == 2


def test_bias_balancing_reduces_imbalance():
    layer = make(bias_balancing=True, bias_update_rate=0.02, score_func="sigmoid")
    with torch.no_grad():                     # skew: experts 0 and 1 win most tokens
        layer.router.weight[:2] += 0.5 * torch.ones(H)
    x = torch.randn(512, H).abs()
    layer.train()

    def imbalance():
        load = layer(x).stats["tokens_per_expert"].float()
        return float(load.max() / load.mean())

    before = imbalance()
    for _ in range(150):
        layer(x)
        layer.update_expert_bias()
    after = imbalance()
    assert before > 2.0 and after < 1.35, (before, after)
    assert "router.expert_bias" in layer.state_dict()


def test_aux_losses():
    layer = make(num_null_experts=2, aux_loss_coef=1.0)
    uniform = torch.full((8, E + 2), 1.0 / (E + 2))
    idx = torch.arange(8 * 2).view(8, 2) % (E + 2)
    assert losses.load_balance_loss(uniform, idx, E).item() == pytest.approx(1.0, rel=0.25)
    # null experts are pooled: moving load among null experts does not change the loss
    idx_a = torch.tensor([[8, 0], [8, 1]])
    idx_b = torch.tensor([[8, 0], [9, 1]])
    p = torch.rand(2, E + 2).softmax(-1)
    assert losses.load_balance_loss(p, idx_a, E) == pytest.approx(float(losses.load_balance_loss(p, idx_b, E)))
    layer = make(aux_loss_coef=0.1, z_loss_coef=0.01, seq_aux_loss_coef=0.1, entropy_loss_coef=0.01)
    out = layer(x_())
    s = out.stats
    expect = 0.1 * s["load_balance_loss"] + 0.01 * s["z_loss"] + 0.1 * s["seq_balance_loss"] + 0.01 * s["entropy_loss"]
    assert out.aux_loss.item() == pytest.approx(float(expect), rel=1e-5)
    out.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_random_routing_and_noise():
    layer = make(random_routing=True)
    a = layer(x_()).stats["tokens_per_expert"]
    assert int(a.sum()) == 48 * 2
    layer = make(router_jitter=0.1, router_temperature=2.0)
    layer.train()
    x = x_()
    assert not torch.equal(layer(x).hidden_states, layer(x).hidden_states)
    layer.eval()
    assert torch.equal(layer(x).hidden_states, layer(x).hidden_states)


@pytest.mark.parametrize("kw,field", [
    (dict(top_k=9), "top_k"),
    (dict(num_groups=3), "num_groups"),
    (dict(num_groups=4, topk_groups=5), "topk_groups"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(min_capacity=8, max_capacity=4), "max_capacity"),
    (dict(score_func="relu"), "score_func"),
    (dict(drop_policy="random"), "drop_policy"),
    (dict(activation="relu"), "activation"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_bad_config_names_field(kw, field):
    with pytest.raises(ValueError, match=field):
        make(**kw)


def test_wrong_hidden_size_names_field():
    with pytest.raises(ValueError, match="hidden_size"):
        make()(torch.randn(4, H + 1))
