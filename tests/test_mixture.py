"""The expert mixture: mixture math, time masking, router causality, modes, save/load, generation, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import dsmoe  # noqa: F401  (registers the Auto classes)
from dsmoe.mixtures import ExpertMixtureForCausalLM, MixtureCache
from dsmoe.mixtures.gate_training import GateTrainingConfig, gate_loss, train_gate

from mixture_utils import SLICES, VOCAB, direct_log_probs, one_torch_thread, save_experts

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory):
    return save_experts(tmp_path_factory.mktemp("experts"))


@pytest.fixture
def mixture(expert_dirs):
    torch.manual_seed(1)
    return ExpertMixtureForCausalLM.from_experts(expert_dirs, SLICES, router={"hidden_size": 8}, top_k=2)


def ids(b=2, t=9, seed=0):
    return torch.randint(1, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def test_experts_of_three_architectures_are_reloaded_and_frozen(mixture):
    kinds = [type(e).__name__ for e in mixture.experts]
    assert kinds == ["GPT2LMHeadModel", "LlamaForCausalLM", "OlmoForCausalLM"]
    assert not any(p.requires_grad for e in mixture.experts for p in e.parameters())
    assert all(p.requires_grad for p in mixture.router.parameters())


@pytest.mark.parametrize("mode", ["equal", "router"])
def test_logprob_mixture_equals_direct_logsumexp(mixture, mode):
    x = ids()
    out = mixture(x, labels=x, mode=mode)
    lp = direct_log_probs(mixture.experts, x)                                  # (N, B, T, V)
    w = out.expert_weights.double()                                            # (B, T, N)
    direct = torch.log((w.permute(2, 0, 1)[..., None] * lp.exp()).sum(0))
    torch.testing.assert_close(out.logits.double(), direct, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.logits.exp().sum(-1), torch.ones(2, 9), atol=1e-5)   # a proper distribution
    gold = direct[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.token_log_probs.double(), gold, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.nll.double(), -gold.mean(), atol=1e-5, rtol=1e-5)
    if mode == "router":               # top-2 of 3, renormalised
        assert torch.all((out.expert_weights > 0).sum(-1) == 2)
        torch.testing.assert_close(out.expert_weights.sum(-1), torch.ones(2, 9))
        assert out.aux_loss > 0 and torch.equal(out.loss, out.nll + out.aux_loss)


def test_slices_from_the_experts_own_configs(expert_dirs):
    experts = [AutoModelForCausalLM.from_pretrained(d) for d in expert_dirs]
    for e, (a, b) in zip(experts, SLICES):
        e.config.dsmoe_slice = {"name": f"period {a}", "start_year": a, "end_year": b}
    model = ExpertMixtureForCausalLM.from_experts(experts)
    assert model.config.slices == [list(s) for s in SLICES]
    assert model.config.expert_names == [f"period {a}" for a, _ in SLICES]
    del experts[1].config.dsmoe_slice
    with pytest.raises(ValueError, match=r"experts\[1\] has no dsmoe_slice"):
        ExpertMixtureForCausalLM.from_experts(experts)


def test_logits_combiner_is_softmax_of_weighted_logits(mixture):
    x = ids()
    out = mixture(x, mode="router", combine="logits")
    with torch.no_grad():
        logits = torch.stack([e(input_ids=x).logits.double() for e in mixture.experts])
    w = out.expert_weights.double().permute(2, 0, 1)[..., None]
    torch.testing.assert_close(out.logits.double(), torch.log_softmax((w * logits).sum(0), -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy,date,masked", [("start", 1899, [2]), ("end", 1899, [2]), ("end", 1898, [1, 2]),
                                                ("start", 1850, [2])])
def test_time_mask_gives_exact_zero_and_no_leakage(expert_dirs, policy, date, masked):
    model = ExpertMixtureForCausalLM.from_experts(expert_dirs, SLICES, router=True, date_policy=policy)
    x = ids()
    before = {m: model(x, labels=x, date=date, mode=m) for m in ("equal", "router", "argmax")}
    for m, out in before.items():
        assert torch.all(out.expert_weights[..., masked] == 0), m
    with torch.no_grad():                  # the masked experts' weights change: nothing else may
        for k in masked:
            for p in model.experts[k].parameters():
                p.copy_(torch.randn_like(p) * 5)
    for m, out in before.items():
        after = model(x, labels=x, date=date, mode=m)
        assert torch.equal(after.logits, out.logits) and torch.equal(after.loss, out.loss), m
        assert torch.equal(after.expert_weights, out.expert_weights), m


def test_per_row_dates(mixture):
    x = ids()
    out = mixture(x, date=torch.tensor([1800, 1920]), mode="equal")
    torch.testing.assert_close(out.expert_weights[0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out.expert_weights[1, 0], torch.full((3,), 1 / 3))


def test_router_is_causal(mixture):
    x = ids(t=12)
    base = mixture(x, mode="router")
    for t in (0, 4, 10):
        y = x.clone()
        y[:, t + 1] = (y[:, t + 1] % (VOCAB - 1)) + 1                         # a different token at t+1
        out = mixture(y, mode="router")
        assert torch.equal(out.expert_weights[:, :t + 1], base.expert_weights[:, :t + 1])
        assert torch.equal(out.router_logits[:, :t + 1], base.router_logits[:, :t + 1])
        assert not torch.equal(out.router_logits[:, t + 1], base.router_logits[:, t + 1])


def test_gate_never_reads_the_prompt_prefix(mixture):
    text = ids(b=1, t=8)[0]
    prompts = [torch.tensor([7, 8, 9, 18, 4, 0]), torch.tensor([7, 8, 9, 19, 4, 0])]   # "... year 1850/1920 ."
    outs = []
    for prompt in prompts:
        x = torch.cat([prompt, text])[None]
        pm = torch.zeros_like(x, dtype=torch.bool)
        pm[:, :len(prompt)] = True
        outs.append(mixture(x, labels=x, prompt_mask=pm, mode="router"))
    assert torch.equal(outs[0].expert_weights, outs[1].expert_weights)
    assert torch.equal(outs[0].router_logits, outs[1].router_logits)
    assert int(outs[0].token_mask.sum()) == len(text)       # prompt tokens are never scored
    assert not torch.equal(outs[0].token_log_probs, outs[1].token_log_probs)   # the experts do read the prompt


def test_equal_with_one_usable_expert_equals_that_expert(mixture):
    x = ids()
    out = mixture(x, date=1849, mode="equal")
    torch.testing.assert_close(out.logits.double(), direct_log_probs(mixture.experts, x)[0], atol=1e-6, rtol=1e-6)


def test_oracle_picks_the_gold_expert(mixture):
    x = ids()
    lp = direct_log_probs(mixture.experts, x)
    for kwargs in ({"slice_labels": [2, 0]}, {"date": torch.tensor([1920, 1801])}):
        out = mixture(x, mode="oracle", **kwargs)
        assert torch.equal(out.expert_weights[:, :, :].argmax(-1), torch.tensor([[2] * 9, [0] * 9]))
        torch.testing.assert_close(out.logits[0].double(), lp[2, 0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.logits[1].double(), lp[0, 1], atol=1e-6, rtol=1e-6)
    out = mixture(x, mode="expert:1850-1899")
    torch.testing.assert_close(out.logits.double(), lp[1], atol=1e-6, rtol=1e-6)


def test_save_load_round_trip_identical_logits(mixture, tmp_path):
    with torch.no_grad():
        for p in mixture.router.parameters():
            p.add_(torch.randn_like(p))
    mixture.save_pretrained(tmp_path / "mix")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mix")
    assert type(loaded) is ExpertMixtureForCausalLM
    assert not any(p.requires_grad for e in loaded.experts for p in e.parameters())
    assert loaded.config.slices == [list(s) for s in SLICES] and loaded.config.top_k_experts == 2
    x = ids()
    for mode in ("equal", "router", "argmax", "oracle"):
        kw = {"slice_labels": [1, 2]} if mode == "oracle" else {}
        assert torch.equal(loaded(x, mode=mode, date=1930, **kw).logits, mixture(x, mode=mode, date=1930, **kw).logits)
    gpt2 = loaded.experts[0]
    assert gpt2.lm_head.weight.data_ptr() == gpt2.transformer.wte.weight.data_ptr()   # the expert's own tying


@pytest.mark.parametrize("mode,date", [("router", 1920), ("equal", None), ("argmax", 1860)])
def test_generate_with_every_expert_cache_equals_no_cache(mixture, mode, date):
    x = ids(b=2, t=5)
    mask = torch.ones_like(x)
    cached = mixture.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, date=date, mode=mode,
                              pad_token_id=0, return_dict_in_generate=True)
    cache = cached["cache"] if "cache" in cached else cached["past_key_values"]
    assert isinstance(cache, MixtureCache) and cache.seen == 5 + 6 - 1
    assert sum(c is not None for c in cache.experts) == (2 if date == 1860 else 3)   # masked experts never run
    plain = mixture.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, date=date, mode=mode,
                             pad_token_id=0, use_cache=False)
    assert torch.equal(cached["sequences"], plain)
    # and both equal a hand-written greedy loop over full forwards
    seq = x
    for _ in range(6):
        nxt = mixture(seq, date=date, mode=mode).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(seq, plain)


def test_gate_training_lowers_its_loss_and_leaves_experts_alone(mixture):
    batches = [{"input_ids": ids(b=4, t=16, seed=s), "slice_labels": torch.tensor([0, 1, 2, 1])} for s in range(2)]
    experts_before = copy.deepcopy([e.state_dict() for e in mixture.experts])
    for objective in ("mixture_nll", "slice_ce"):
        with torch.no_grad():
            before = sum(gate_loss(mixture, b, objective).item() for b in batches)
        res = train_gate(mixture, batches, GateTrainingConfig(objective=objective, steps=40, lr=3e-2))
        with torch.no_grad():
            after = sum(gate_loss(mixture, b, objective).item() for b in batches)
        assert after < before - 1e-3, (objective, before, after)
        assert len(res.losses) == 40 and res.tokens == 40 * 64
    for e, sd in zip(mixture.experts, experts_before):
        assert all(torch.equal(v, sd[k]) for k, v in e.state_dict().items())
        assert all(p.grad is None for p in e.parameters())


# ---------------------------------------------------------------------------------------------- bad input
def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_inputs_give_one_line_naming_the_key(expert_dirs, tmp_path, mixture):
    with pytest.raises(ValueError) as e:
        ExpertMixtureForCausalLM.from_experts(expert_dirs, [(1790, 1860), (1850, 1899), (1900, 1949)])
    assert "slices[1]" in one_line(e) and "overlap" in one_line(e)
    with pytest.raises(ValueError) as e:
        ExpertMixtureForCausalLM.from_experts(expert_dirs, [(1850, 1899), (1790, 1849), (1900, 1949)])
    assert "slices[1]" in one_line(e) and "time order" in one_line(e)
    with pytest.raises(ValueError) as e:
        ExpertMixtureForCausalLM.from_experts(expert_dirs[:2], SLICES)
    assert "slices" in one_line(e) and "one [start_year, end_year] per expert" in one_line(e)
    other = save_experts(tmp_path / "other", vocab=VOCAB + 3)
    with pytest.raises(ValueError) as e:
        ExpertMixtureForCausalLM.from_experts([expert_dirs[0], other[1]], SLICES[:2])
    assert "different vocabularies" in one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        ExpertMixtureForCausalLM.from_experts([expert_dirs[0], str(tmp_path / "gone")], SLICES[:2])
    assert "experts[1]" in one_line(e) and "save_pretrained" in one_line(e)
    with pytest.raises(ValueError) as e:
        ExpertMixtureForCausalLM.from_experts(expert_dirs, SLICES, router=True, top_k=4)
    assert "top_k_experts=4" in one_line(e) and "[1, 3]" in one_line(e)
    x = ids()
    with pytest.raises(ValueError) as e:
        mixture(x, mode="oracle")
    assert "mode='oracle'" in one_line(e) and "slice_labels" in one_line(e)
    with pytest.raises(ValueError) as e:
        mixture(x, date=1700)
    assert "date=1700" in one_line(e) and "[1790, 1849]" in one_line(e)
    with pytest.raises(ValueError) as e:
        mixture(x, mode="expert:nope")
    assert "mode='expert:nope'" in one_line(e)
    with pytest.raises(ValueError) as e:
        mixture(x, mode="expert:1900-1949", date=1860)
    assert "after the query date" in one_line(e)
    plain = ExpertMixtureForCausalLM.from_experts(expert_dirs, SLICES)
    with pytest.raises(ValueError) as e:
        plain(x, mode="router")
    assert "use_router=True" in one_line(e)
