"""The DeepSeek-style MoE transformer's own README snippets, run through dsmoe.compat with only the import changed.

Every snippet below is the README's code; where its sizes (hidden 2048, 16 layers, vocab 32000: billions of
parameters) cannot run on a CPU test machine, ``SMALL`` shrinks the sizes and nothing else. The full-size
configurations are still built, and the Quick Start model is built at full size on the meta device.
"""
import logging

import pytest
import torch

from dsmoe.compat import MoEModelConfig, TransformerForCausalLM   # was: from moe_transformer import ...
from dsmoe.models import RoutedLMConfig, RoutedLMForCausalLM

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, intermediate_size=128,
             moe_intermediate_size=32)


def small(*blocks, **extra):
    """The union of snippets' options with the sizes shrunk (and capacity bounds scaled to a 64-token batch)."""
    kw = {k: v for block in blocks for k, v in block.items()}
    kw.update(extra, **SMALL)
    if "min_expert_capacity" in kw:
        kw["min_expert_capacity"], kw["max_expert_capacity"] = 4, 64
    return MoEModelConfig(**kw)


QUICK_START = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, vocab_size=32000, use_moe=True,
                   n_routed_experts=8, num_experts_per_tok=2)
CORE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, vocab_size=32000,
            rms_norm_eps=1e-05)
MOE_SPECIFIC = dict(use_moe=True, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                    moe_intermediate_size=8192, min_expert_capacity=128, max_expert_capacity=800,
                    expert_capacity_factor=1.0, moe_warmup_steps=100, aux_loss_ramp_steps=100, aux_loss_coef=0.5)
ROUTING = dict(n_group=2, topk_group=2, norm_topk_prob=True, semantic_routing=False, use_null_expert=True,
               learned_token_importance=True, use_bias_balancing=True)
CUSTOM_ROUTING = dict(scoring_func="softmax", topk_method="noaux_tc", router_scaling_factor=1.0)


def batch(b=2, t=32, vocab=128):
    input_ids = torch.randint(0, vocab, (b, t))
    return input_ids, torch.ones_like(input_ids)


@pytest.mark.parametrize("block", [QUICK_START, CORE, MOE_SPECIFIC, ROUTING, CUSTOM_ROUTING])
def test_configuration_blocks_build_at_full_size(block):
    config = MoEModelConfig(**block)
    assert isinstance(config, RoutedLMConfig)
    for key, value in block.items():
        if key not in ("use_bias_balancing", "semantic_routing", "use_null_expert"):
            assert getattr(config, key) == value, key
    if block.get("use_bias_balancing"):
        assert config.topk_method == "noaux_tc"         # the aux-loss-free bias balancing is what it selects
    if "use_null_expert" in block:
        assert config.use_null_expert == 1


def test_quick_start():
    config = MoEModelConfig(**QUICK_START)
    with torch.device("meta"):
        full = TransformerForCausalLM(config)            # the README's sizes, without allocating them
    assert isinstance(full, RoutedLMForCausalLM) and sum(p.numel() for p in full.parameters()) > 6e9

    config = small(QUICK_START)
    model = TransformerForCausalLM(config)
    input_ids, attention_mask = batch()
    training_step = 10
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        step=training_step  # For dynamic capacity adjustment
    )
    assert outputs.logits.shape == (2, 32, 128)


def test_basic_inference_and_expert_monitoring():
    config = small(QUICK_START, MOE_SPECIFIC, ROUTING)
    model = TransformerForCausalLM(config)
    input_ids, attention_mask = batch()
    outputs = model(input_ids, attention_mask=attention_mask)
    logits = outputs.logits
    assert logits.shape == (2, 32, 128)

    outputs = model(input_ids, output_expert_usage=True)
    expert_counts = outputs.expert_usage  # List of expert usage per layer
    imbalances = outputs.imbalances      # Load balancing metrics
    assert len(expert_counts) == 2 and expert_counts[0].shape == (8,) and imbalances.shape == (2,)
    assert model(input_ids, output_expert_usage=False).expert_usage is None


def test_training_loop_with_step():
    config = small(QUICK_START, MOE_SPECIFIC, ROUTING, moe_warmup_steps=4, aux_loss_ramp_steps=4)
    model = TransformerForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dataloader = [{"input_ids": ids, "attention_mask": mask, "labels": ids} for ids, mask in
                  (batch() for _ in range(6))]
    seen = []
    for step, batch_ in enumerate(dataloader):
        outputs = model(
            input_ids=batch_['input_ids'],
            attention_mask=batch_['attention_mask'],
            labels=batch_['labels'],
            step=step  # Pass step for dynamic adjustments
        )

        loss = outputs.loss
        aux_loss = outputs.aux_loss

        # Monitor expert usage
        expert_usage = outputs.expert_usage
        imbalances = outputs.imbalances
        loss.backward()
        opt.step(), opt.zero_grad()
        model.update_expert_bias()                       # use_bias_balancing: the bias moves with the load
        seen.append((float(aux_loss.detach()), float(imbalances.max()), len(expert_usage)))
    assert all(torch.isfinite(torch.tensor(s[0])) for s in seen)
    assert int(model.model.moe_step) == 5
    bias = model.moe_layers()[0].router.expert_bias
    assert bias.abs().sum() > 0, "bias balancing must be active"


def test_custom_routing():
    config = small(QUICK_START, CUSTOM_ROUTING)
    model = TransformerForCausalLM(config)
    assert model.moe_layers()[0].cfg.bias_balancing and model.moe_layers()[0].cfg.score_func == "softmax"
    model(batch()[0])


def test_debug_switch_logs_routing_statistics(caplog):
    config = small(QUICK_START)
    model = TransformerForCausalLM(config)
    # Enable debug logging
    model.set_debug(True)
    with caplog.at_level(logging.INFO, logger="dsmoe.debug"):
        model(batch()[0])
    lines = [r.getMessage() for r in caplog.records if r.name == "dsmoe.debug"]
    assert any("aux_loss" in x for x in lines)
    assert sum("expert share" in x for x in lines) == 2  # one line per MoE layer
    model.set_debug(False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dsmoe.debug"):
        model(batch()[0])
    assert not [r for r in caplog.records if r.name == "dsmoe.debug"]


def test_no_option_is_silently_ignored():
    with pytest.raises(ValueError, match="semantic-aware routing is not implemented"):
        MoEModelConfig(semantic_routing=True)
    with pytest.raises(ValueError, match="contradicts topk_method='noaux_tc'"):
        MoEModelConfig(use_bias_balancing=False, topk_method="noaux_tc")
    assert MoEModelConfig(use_bias_balancing=False).topk_method == "greedy"
    with pytest.raises(ValueError, match="unknown option 'n_routed_expert'; did you mean 'n_routed_experts'"):
        MoEModelConfig(n_routed_expert=8)
    with pytest.raises(ValueError, match="unknown option 'use_bias_balancing'"):
        RoutedLMConfig(use_bias_balancing=True)         # the seed's name is the compat layer's, not RoutedLM's


def test_saved_model_loads_back_as_routed_lm(tmp_path):
    import dsmoe  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = TransformerForCausalLM(small(QUICK_START, ROUTING)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is RoutedLMForCausalLM and loaded.config.topk_method == "noaux_tc"
    ids = batch()[0]
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
