"""RoutedLM (dsmoe.models): forward/backward, seed 004's MoE schedules, padding, save/load through the Auto classes,
generation with a KV cache, and fp32 logit parity with transformers' Llama, Mixtral, Qwen3-MoE and OLMoE."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import dsmoe  # noqa: E402,F401  (registers the Auto classes)
from dsmoe.models import RoutedLMConfig, RoutedLMForCausalLM  # noqa: E402
from dsmoe.models.modeling_routed_lm import WARMUP_MIX_INIT  # noqa: E402

V = 97
COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny(**kw) -> RoutedLMConfig:
    base = dict(COMMON, intermediate_size=96, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return RoutedLMConfig(**{**base, **kw})


def make(seed=0, **kw) -> RoutedLMForCausalLM:
    torch.manual_seed(seed)
    return RoutedLMForCausalLM(tiny(**kw))


def ids(b=2, t=9, seed=0) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def randomise(model, seed=1):
    """Weights large enough for decisive routing and O(1) logits (the default 0.02 init makes parity vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(("mlp.gate.weight", "router.weight")):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


# ---------------------------------------------------------------------------------------------- forward / train
def test_forward_shapes_loss_and_backward():
    model = make(first_k_dense_layers=1, aux_loss_coef=0.1).train()
    x = ids()
    out = model(x, labels=x)
    assert out.logits.shape == (2, 9, V)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ref)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert len(out.expert_usage) == 1 and out.expert_usage[0].shape == (4,)
    assert int(out.expert_usage[0].sum()) == 2 * 9 * 2           # dropless: every token computes k experts
    assert out.imbalances.shape == (1,) and out.imbalances[0] >= 1
    assert out.past_key_values is None                           # no cache in training by default
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.model.layers[1].mlp.moe.router.weight.grad.abs().sum() > 0


def test_moe_layer_placement():
    assert tiny(num_hidden_layers=4, first_k_dense_layers=1).moe_layers == [1, 2, 3]
    assert tiny(num_hidden_layers=4, moe_layer_indices=[3, 1]).moe_layers == [1, 3]
    assert tiny(use_moe=False).moe_layers == []
    model = make(num_hidden_layers=4, moe_layer_indices=[1, 3])
    assert [layer.is_moe for layer in model.model.layers] == [False, True, False, True]
    assert len(model.moe_layers()) == 2
    dense = make(use_moe=False)
    out = dense(ids(), labels=ids())
    assert out.expert_usage == [] and out.imbalances is None and float(out.aux_loss) == 0.0


def test_warmup_mixes_dense_path_and_grows_capacity():
    model = make(moe_warmup_steps=10, expert_capacity_factor=1.0, min_expert_capacity=1).train()
    x = ids()
    sig = torch.sigmoid(torch.tensor(WARMUP_MIX_INIT))

    out0 = model(x, labels=x, step=0)
    stats = out0.moe_stats[0]
    torch.testing.assert_close(stats["moe_weight"], sig)
    assert stats["capacity_factor"] == pytest.approx(0.5)
    out0.loss.backward()
    logit = model.model.layers[0].mlp.warmup_logit
    assert logit.grad is not None and logit.grad.abs() > 0
    with torch.no_grad():                                     # the learnable part of the mixing weight moves
        logit -= 100.0 * logit.grad
    assert model(x, step=0).moe_stats[0]["moe_weight"] != pytest.approx(float(sig))
    model.zero_grad()

    mid = model(x, step=5).moe_stats[0]
    sig = torch.sigmoid(model.model.layers[0].mlp.warmup_logit.detach()).squeeze()
    torch.testing.assert_close(mid["moe_weight"], 0.5 + 0.5 * sig)
    assert mid["capacity_factor"] == pytest.approx(0.75)
    assert int(model.model.moe_step) == 5

    out = model(x, labels=x, step=10)                         # warmup over: pure MoE, configured capacity
    assert all(s["moe_weight"] == 1.0 and s["capacity_factor"] == 1.0 for s in out.moe_stats)
    out.loss.backward()
    warm = [p for n, p in model.named_parameters() if "warmup" in n]
    assert warm and all(p.grad is None for p in warm)

    model.eval()                                              # no step: the recorded training step is used
    assert model(x).moe_stats[0]["moe_weight"] == 1.0


def test_aux_loss_ramp():
    model = make(aux_loss_ramp_steps=4, aux_loss_coef=0.1, z_loss_coef=0.01).train()
    x = ids()
    assert float(model(x, step=0).aux_loss.detach()) == 0.0
    half, full = model(x, step=2).aux_loss, model(x, step=4).aux_loss
    assert full > 0
    torch.testing.assert_close(half, 0.5 * full)
    torch.testing.assert_close(model(x, step=100).aux_loss, full)


def test_capacity_drops_reported():
    model = randomise(make(expert_capacity_factor=0.5, min_expert_capacity=1, eval_dropless=False))
    out = model(ids(b=4, t=16))
    stats = out.moe_stats[0]
    cap = stats["capacity"]
    assert cap == 16                                          # ceil(0.5 * 64 tokens * 2 / 4 experts)
    assert stats["dropped_tokens"] > 0
    assert int(out.expert_usage[0].max()) <= cap
    assert int(out.expert_usage[0].sum()) + stats["dropped_tokens"] == 64 * 2


def test_null_experts_reported():
    cfg = tiny(use_null_expert=True)
    assert cfg.use_null_expert == 1 and cfg.moe_config().num_null_experts == 1
    model = randomise(RoutedLMForCausalLM(cfg))
    out = model(ids(b=4, t=16))
    for usage, stats in zip(out.expert_usage, out.moe_stats):
        assert 0 < stats["null_fraction"] < 1
        assert int(usage.sum()) == round(64 * 2 * (1 - stats["null_fraction"]))


def test_learned_token_importance_is_trained_and_orders_drops():
    plain = randomise(make(eval_dropless=False))
    scored = make(learned_token_importance=True, eval_dropless=False)
    missing, unexpected = scored.load_state_dict(plain.state_dict(), strict=False)
    assert all("importance" in k for k in missing) and missing and not unexpected
    scored.eval()
    imp = scored.model.layers[0].mlp.importance.weight
    assert imp.abs().sum() == 0                               # zero init: gate 2 * sigmoid(0) = 1
    x = ids(b=4, t=16)
    torch.testing.assert_close(_logits(scored, x), _logits(plain, x))

    # the score is the drop priority: flipping its sign (gate still ~1) changes which tokens are dropped
    capped = make_like(scored, expert_capacity_factor=0.5, min_expert_capacity=1)
    direction = torch.randn(imp.shape, generator=torch.Generator().manual_seed(0))
    outs = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for layer in capped.model.layers:
                layer.mlp.importance.weight.copy_(sign * 1e-4 * direction)
        outs.append(capped(x))
    assert all(s["dropped_tokens"] > 0 for s in outs[0].moe_stats)
    assert not torch.allclose(outs[0].logits, outs[1].logits, atol=1e-2)

    scored.train()                                            # the gate is what trains the scorer
    scored(x, labels=x).loss.backward()
    assert imp.grad is not None and imp.grad.abs().sum() > 0


def make_like(model, **kw):
    """A copy of ``model`` with config fields changed (same weights)."""
    other = RoutedLMForCausalLM(RoutedLMConfig.from_dict({**model.config.to_dict(), **kw}))
    other.load_state_dict(model.state_dict())
    return other.eval()


def test_router_reset_once():
    model = make(router_reset_step=2, topk_method="noaux_tc").train()
    x = ids()
    router = model.model.layers[0].mlp.moe.router
    w0 = router.weight.detach().clone()
    model(x, step=1)
    model.update_expert_bias()
    assert torch.equal(router.weight, w0) and router.expert_bias.abs().sum() > 0
    model(x, step=2)
    assert not torch.equal(router.weight, w0) and bool(model.model.router_reset_done)
    assert router.expert_bias.abs().sum() == 0
    w2 = router.weight.detach().clone()
    model(x, step=3)
    assert torch.equal(router.weight, w2)                     # only once


def test_padding_tokens_are_not_routed():
    model = randomise(make())
    x = ids(b=2, t=7)
    pad = torch.full((1, 3), 5)
    padded = torch.cat([torch.cat([pad, x[:1]], 1), torch.cat([x[1:], pad], 1)])   # left- and right-padded
    mask = torch.ones_like(padded)
    mask[0, :3] = 0
    mask[1, 7:] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(padded, attention_mask=mask, position_ids=pos)
        alone = model(x)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits[0, 3:], alone.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[1, :7], alone.logits[1], rtol=1e-5, atol=1e-5)
    for usage in out.expert_usage:
        assert int(usage.sum()) == 14 * 2                     # only the 14 real tokens were routed


def test_gradient_checkpointing_same_grads():
    x = ids()
    grads = []
    for ckpt in (False, True):
        model = make(seed=3).train()
        if ckpt:
            model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_deepspeed_backend_forward_backward_and_reset():
    pytest.importorskip("deepspeed")
    model = make(moe_backend="deepspeed", router_reset_step=1).train()
    x = ids()
    out = model(x, labels=x, step=0)
    out.loss.backward()
    assert [int(u.sum()) for u in out.expert_usage] == [2 * 9 * 2] * 2
    gate = model.moe_layers()[0].gate.wg.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    before = gate.detach().clone()
    model(x, step=1)
    assert not torch.equal(gate, before)


# ---------------------------------------------------------------------------------------------- save / generate
def test_save_load_round_trip_through_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    model = make(topk_method="noaux_tc", tie_word_embeddings=True, use_null_expert=1, num_hidden_layers=3,
                 moe_layer_indices=[0, 2], moe_warmup_steps=4, learned_token_importance=True).train()
    x = ids()
    model(x, step=7)
    model.update_expert_bias()
    bias = model.model.layers[2].mlp.moe.router.expert_bias.clone()
    assert bias.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RoutedLMConfig)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RoutedLMForCausalLM)
    assert loaded.config.moe_layer_indices == [0, 2] and loaded.config.use_null_expert == 1
    torch.testing.assert_close(loaded.model.layers[2].mlp.moe.router.expert_bias, bias, rtol=0, atol=0)
    assert int(loaded.model.moe_step) == 7
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(t1, t2, rtol=0, atol=0, msg=n1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_generate_with_cache_matches_no_cache_loop(sliding_window):
    model = randomise(make(sliding_window=sliding_window, qk_norm="per_head"))
    prompt = ids(b=2, t=5)
    new = 7
    got = model.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(new):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert got.shape == (2, 5 + new)
    assert torch.equal(got, seq)


def test_generate_left_padded_batch_matches_single():
    model = randomise(make())
    a, b = ids(b=1, t=6, seed=1), ids(b=1, t=4, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    got = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, single in ((0, a), (1, b)):
        ref = model.generate(single, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(got[row, -5:], ref[0, -5:])


# ---------------------------------------------------------------------------------------------- HF interop
def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(intermediate_size=96, **COMMON, **kw))


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    return MixtralForCausalLM(MixtralConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                            sliding_window=4, **COMMON))


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                              num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
                                              **COMMON))


def _olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM
    return OlmoeForCausalLM(OlmoeConfig(intermediate_size=32, num_experts=8, num_experts_per_tok=2, clip_qkv=3.0,
                                        eos_token_id=None, **COMMON))


HF_MODELS = {"llama": _llama, "llama_tied_bias": lambda: _llama(tie_word_embeddings=True, attention_bias=True),
             "mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe}


def _logits(model, x, mask=None):
    with torch.no_grad():
        return model(x, attention_mask=mask).logits


@pytest.mark.parametrize("family", list(HF_MODELS))
def test_from_hf_parity_and_to_hf_round_trip(family):
    hf = randomise(HF_MODELS[family]())
    ours = RoutedLMForCausalLM.from_hf(hf).eval()
    x = ids(b=2, t=9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    ref = _logits(hf, x)
    assert ref.abs().max() > 1                                # not a vacuous comparison
    torch.testing.assert_close(_logits(ours, x), ref, rtol=1e-4, atol=1e-4)
    real = mask.bool()
    torch.testing.assert_close(_logits(ours, x, mask)[real], _logits(hf, x, mask)[real], rtol=1e-4, atol=1e-4)

    cfg = ours.config
    expected = {"llama": ([], None), "llama_tied_bias": ([], None), "mixtral": ([0, 1], None), "qwen3_moe": ([0], "per_head"),
                "olmoe": ([0, 1], "full")}[family]
    assert (cfg.moe_layers, cfg.qk_norm) == expected
    if family == "mixtral":                                   # the sliding window really matters at T=9
        assert cfg.sliding_window == 4
        assert not torch.allclose(_logits(make_like(ours, sliding_window=None), x), ref, atol=1e-3)
    if family == "olmoe":
        assert cfg.clip_qkv == 3.0
    if family == "llama_tied_bias":
        assert cfg.tie_word_embeddings and cfg.attention_bias
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()

    with torch.no_grad():                                     # to_hf writes every weight back
        g = torch.Generator().manual_seed(5)
        for p in ours.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    back = ours.to_hf()
    assert type(back) is type(hf)
    torch.testing.assert_close(_logits(back, x), _logits(ours, x), rtol=1e-4, atol=1e-4)


def test_from_hf_overrides_and_refusals():
    hf = randomise(_mixtral())
    ours = RoutedLMForCausalLM.from_hf(hf, aux_loss_coef=0.02, expert_capacity_factor=2.0)
    assert ours.model.layers[0].mlp.moe.cfg.capacity_factor == 2.0
    assert ours.model.layers[0].mlp.moe.cfg.aux_loss_coef == 0.02
    with pytest.raises(ValueError, match="MoE layers"):
        RoutedLMForCausalLM.from_hf(hf, first_k_dense_layers=1)
    with pytest.raises(ValueError, match="aux_los_coef"):
        RoutedLMForCausalLM.from_hf(hf, aux_los_coef=0.1)
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    ds = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, first_k_dense_replace=0))
    with pytest.raises(NotImplementedError, match="multi-head latent attention"):
        RoutedLMForCausalLM.from_hf(ds)
    with pytest.raises(ValueError, match="hidden_act"):
        RoutedLMForCausalLM.from_hf(_llama(hidden_act="gelu"))


def test_upcycle_matches_dense():
    llama = randomise(_llama())
    up = RoutedLMForCausalLM.upcycle(llama, n_routed_experts=4, num_experts_per_tok=2, aux_loss_coef=0.01)
    randomise_routers(up)
    assert up.config.moe_layers == [0, 1] and up.config.norm_topk_prob
    x = ids()
    out = up.eval()(x)
    assert all(int((u > 0).sum()) > 1 for u in out.expert_usage)   # tokens really spread over experts
    torch.testing.assert_close(out.logits, _logits(llama, x), rtol=1e-4, atol=1e-4)
    w_in = up.model.layers[1].mlp.moe.experts.w_in
    assert torch.equal(w_in[0], w_in[3])
    with pytest.raises(ValueError, match="already has MoE layers"):
        RoutedLMForCausalLM.upcycle(up, 4, 2)
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        RoutedLMForCausalLM.upcycle(llama, 4, 2, moe_intermediate_size=32)


def randomise_routers(model):
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=g))


def test_to_hf_refuses_unrepresentable_models():
    with pytest.raises(ValueError, match="use_null_expert=1"):
        make(use_null_expert=1).to_hf()
    with pytest.raises(ValueError, match="n_shared_experts=1"):
        make(n_shared_experts=1).to_hf()
    with pytest.raises(ValueError, match="MoE warmup"):
        make(moe_warmup_steps=10).to_hf()
    with pytest.raises(ValueError, match="qk_norm='full'"):     # full QK-norm + sliding window fits nothing
        make(qk_norm="full", sliding_window=8, use_moe=False).to_hf()
    hf = make(use_moe=False).to_hf()
    assert type(hf).__name__ == "LlamaForCausalLM"


# ---------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("kw, field", [
    (dict(num_experts_per_tok=6, n_routed_experts=4), "num_experts_per_tok"),
    (dict(n_routed_experts=6, n_group=4), "n_routed_experts"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(qk_norm="bogus"), "qk_norm"),
    (dict(topk_method="aux_free"), "topk_method"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(moe_layer_indices=[5]), "moe_layer_indices"),
    (dict(moe_layer_indices=[1], first_k_dense_layers=1), "first_k_dense_layers"),
    (dict(expert_capacity_factor=0.0), "expert_capacity_factor"),
    (dict(min_expert_capacity=8, max_expert_capacity=2), "max_expert_capacity"),
    (dict(use_null_expert=-1), "use_null_expert"),
    (dict(moe_backend="megablocks"), "moe_backend"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(router_reset_step=-3), "router_reset_step"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"RoutedLMConfig\.{field}="):
        tiny(**kw)


def test_null_experts_allow_larger_k():
    assert tiny(n_routed_experts=4, use_null_expert=2, num_experts_per_tok=6).moe_config().top_k == 6


def test_evaluation_is_dropless_by_default():
    model = randomise(make(expert_capacity_factor=0.5, min_expert_capacity=1))
    x = ids(b=4, t=16)
    model.train()
    assert model(x).moe_stats[0]["dropped_tokens"] > 0
    model.eval()
    out = model(x)
    assert out.moe_stats[0]["dropped_tokens"] == 0
    # batch-independent: one sequence alone scores like inside the batch
    torch.testing.assert_close(model(x[:1]).logits, out.logits[:1], rtol=1e-5, atol=1e-5)


def test_generate_uses_the_kv_cache_without_deprecation_warnings(caplog, recwarn):
    import logging

    from dsmoe.models.cache_compat import CACHE_NAME
    model = randomise(make())
    prompt = ids(b=2, t=5)
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]) if kwargs.get("input_ids") is not None
        else None, with_kwargs=True)
    with caplog.at_level(logging.WARNING, logger="transformers"):
        out = model(prompt)
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    hook.remove()
    assert lengths == [5, 5, 1, 1, 1], lengths             # after the prompt, one new token per step: cache used
    assert out.get(CACHE_NAME) is not None
    plain = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, plain)
    noise = [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()]
    noise += [str(w.message) for w in recwarn if "deprecat" in str(w.message).lower()]
    assert not noise, noise
