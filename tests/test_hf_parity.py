"""Numerical parity of MoELayer.from_hf / to_hf with the transformers MoE blocks (tiny random configs, fp32)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from dsmoe.moe import MoELayer  # noqa: E402
from dsmoe.moe.hf import detect_family  # noqa: E402

H, F_EXPERT, E = 32, 16, 8


def _mixtral():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = MixtralConfig(hidden_size=H, intermediate_size=F_EXPERT, num_local_experts=E, num_experts_per_tok=2,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    return cfg, lambda: MixtralSparseMoeBlock(cfg)


def _qwen2(norm=False):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    cfg = Qwen2MoeConfig(hidden_size=H, intermediate_size=64, moe_intermediate_size=F_EXPERT,
                         shared_expert_intermediate_size=24, num_experts=E, num_experts_per_tok=2,
                         norm_topk_prob=norm, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    return cfg, lambda: Qwen2MoeSparseMoeBlock(cfg)


def _qwen3(norm=True):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    cfg = Qwen3MoeConfig(hidden_size=H, intermediate_size=64, moe_intermediate_size=F_EXPERT, num_experts=E,
                         num_experts_per_tok=2, norm_topk_prob=norm, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2)
    return cfg, lambda: Qwen3MoeSparseMoeBlock(cfg)


def _deepseek(norm=True):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    cfg = DeepseekV3Config(hidden_size=H, intermediate_size=64, moe_intermediate_size=F_EXPERT,
                           n_routed_experts=E, n_shared_experts=2, num_experts_per_tok=2, n_group=2, topk_group=1,
                           routed_scaling_factor=2.5, norm_topk_prob=norm, first_k_dense_replace=0,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
    return cfg, lambda: DeepseekV3MoE(cfg)


def _olmoe(norm=False):
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    cfg = OlmoeConfig(hidden_size=H, intermediate_size=F_EXPERT, num_experts=E, num_experts_per_tok=2,
                      norm_topk_prob=norm, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
    return cfg, lambda: OlmoeSparseMoeBlock(cfg)


FAMILIES = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2,
    "qwen2_moe_norm": lambda: _qwen2(norm=True),
    "qwen3_moe": _qwen3,
    "qwen3_moe_nonorm": lambda: _qwen3(norm=False),
    "deepseek_v3": _deepseek,
    "deepseek_v3_nonorm": lambda: _deepseek(norm=False),
    "olmoe": _olmoe,
}


def _randomise(block: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            std = 1.0 if name.startswith("gate.") else 0.2   # decisive routing, O(1) outputs
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in block.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return block.eval()


def _hf_out(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def _ours(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    return layer(x).hidden_states


X = torch.randn(3, 11, H, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_from_hf_matches_block(family):
    hf_config, make = FAMILIES[family]()
    block = _randomise(make(), seed=1)
    layer = MoELayer.from_hf(block, hf_config).eval()
    cfg = layer.cfg
    assert cfg.capacity_factor is None and cfg.activation == "swiglu" and cfg.num_experts == E
    assert cfg.hidden_size == H and cfg.expert_hidden_size == F_EXPERT and cfg.top_k == 2
    if family.startswith("deepseek"):
        assert cfg.score_func == "sigmoid" and cfg.num_groups == 2 and cfg.topk_groups == 1
        assert cfg.bias_balancing and layer.router.expert_bias.abs().sum() > 0
        assert cfg.shared_hidden == 2 * F_EXPERT and cfg.routed_scaling_factor == 2.5
    if family.startswith("qwen2"):
        assert cfg.shared_expert_gate and cfg.shared_hidden == 24
    ours, theirs = _ours(layer, X), _hf_out(block, X)
    assert ours.shape == theirs.shape == X.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # 2-D input too
    torch.testing.assert_close(_ours(layer, X[0]), _hf_out(block, X[:1])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_to_hf_round_trip(family):
    hf_config, make = FAMILIES[family]()
    block = _randomise(make(), seed=2)
    layer = MoELayer.from_hf(block, hf_config).eval()
    # perturb every parameter (and the expert bias) so to_hf must really write them all
    g = torch.Generator().manual_seed(3)
    for p in layer.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    if layer.cfg.bias_balancing:
        layer.router.expert_bias.add_(torch.randn(E, generator=g) * 0.05)
    fresh = _randomise(make(), seed=4)
    assert layer.to_hf(fresh) is fresh
    torch.testing.assert_close(_hf_out(fresh, X), _ours(layer, X), rtol=1e-5, atol=1e-5)
    # and back again: identical parameters and buffers
    again = MoELayer.from_hf(fresh, hf_config)
    for (n1, t1), (n2, t2) in zip(layer.state_dict().items(), again.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(t1, t2, rtol=0, atol=0)


@torch.no_grad()
def test_to_hf_refuses_sharded_layer():
    hf_config, make = _mixtral()
    block = _randomise(make(), seed=5)
    layer = MoELayer.from_hf(block, hf_config)
    layer.experts.w_in = nn.Parameter(layer.experts.w_in[: E // 2].clone())
    layer.experts.w_out = nn.Parameter(layer.experts.w_out[: E // 2].clone())
    with pytest.raises(ValueError, match="expert-parallel sharded"):
        layer.to_hf(make())


def test_to_hf_refuses_mismatched_family():
    cfg_q, make_q = _qwen3()
    cfg_d, make_d = _deepseek()
    layer = MoELayer.from_hf(_randomise(make_q(), seed=6), cfg_q)
    with pytest.raises(ValueError):
        layer.to_hf(make_d())   # softmax layer, no shared experts -> sigmoid + shared block


def test_unknown_block_raises():
    with pytest.raises(ValueError, match=r"nn\.Linear|Linear.*supported.*MixtralSparseMoeBlock"):
        MoELayer.from_hf(nn.Linear(H, H), None)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP
    cfg, _ = _deepseek()
    with pytest.raises(ValueError, match="DeepseekV3MLP.*DeepseekV3MoE"):
        MoELayer.from_hf(DeepseekV3MLP(cfg), cfg)   # the dense MLP of a DeepSeek model is no MoE block
    with pytest.raises(ValueError, match="unsupported MoE block Linear"):
        MoELayer(MoELayer.from_hf(_randomise(_qwen3()[1](), 0), _qwen3()[0]).cfg).to_hf(nn.Linear(2, 2))


def test_non_silu_activation_raises():
    hf_config, make = _olmoe()
    block = make()
    hf_config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        MoELayer.from_hf(block, hf_config)


def test_detect_family_from_model_type():
    hf_config, make = _qwen3()

    class Renamed(nn.Module):           # same structure, unknown class name: detected via model_type
        def __init__(self):
            super().__init__()
            inner = make()
            self.gate, self.experts = inner.gate, inner.experts
    assert detect_family(Renamed(), hf_config) == "qwen3_moe"


def test_full_model_block_parity():
    """Take the MoE block out of a tiny full DeepSeek-V3 model (2 layers, the first one dense)."""
    from transformers import DeepseekV3ForCausalLM
    cfg, _ = _deepseek()
    cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.vocab_size = 2, 1, 64
    model = DeepseekV3ForCausalLM(cfg).eval()
    block = _randomise(model.model.layers[1].mlp, seed=7)
    with pytest.raises(ValueError):
        MoELayer.from_hf(model.model.layers[0].mlp, cfg)
    layer = MoELayer.from_hf(block, cfg).eval()
    with torch.no_grad():
        torch.testing.assert_close(_ours(layer, X), _hf_out(block, X), rtol=1e-5, atol=1e-5)
