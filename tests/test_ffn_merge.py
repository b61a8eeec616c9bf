"""The FFN merge (dsmoe.mixtures.FFNMergeForCausalLM) on tiny random Llamas and FFN-only fine-tunes of them:
exactness against the source models, the weighted sum against a direct per-layer computation, save/load through
the Auto classes, generation with the KV cache, and the merge checks' one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import dsmoe  # noqa: F401  (registers the Auto classes)
from dsmoe.mixtures import FFNMergeForCausalLM
from merge_utils import domain_texts, llama_config, perturbed_copy, world  # noqa: F401  (world: fixture)


@pytest.fixture(scope="module")
def experts(world):
    return world.tok, world.base, world.experts, world.root


def _load(folder) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ids(tok, texts):
    return tok(texts, return_tensors="pt", padding=True)


def test_fine_tunes_differ_only_in_their_ffns(experts):
    _, base, folders, _ = experts
    a, b = _load(base).state_dict(), _load(folders[1]).state_dict()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(".mlp." in k for k in changed)


@pytest.mark.parametrize("mode", ["weighted_sum", "select_one"])
def test_one_hot_gate_gives_each_models_logits(experts, mode):
    tok, _, folders, _ = experts
    merge = FFNMergeForCausalLM.from_components(folders, routing_mode=mode)
    enc = _ids(tok, [domain_texts(0, 1)[0], domain_texts(2, 1)[0]])
    for i, folder in enumerate(folders):
        p = torch.zeros(2, 3)
        p[:, i] = 1
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        with torch.no_grad():
            out = merge(**enc, labels=labels, gating_probs=p)
            ref = _load(folder)(**enc, labels=labels)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.gating_probs, p)
    with torch.no_grad():      # the models really differ, so the check above is not vacuous
        assert (_load(folders[0])(**enc).logits - _load(folders[1])(**enc).logits).abs().max() > 1e-2


class _DirectMix(nn.Module):
    """sum_i w[b, i] * mlp_i(x[b]): the merge's weighted sum written out from the source models' own MLPs."""

    def __init__(self, mlps, w):
        super().__init__()
        self.mlps, self.w = nn.ModuleList(mlps), w

    def forward(self, x):
        return sum(self.w[:, i, None, None] * mlp(x) for i, mlp in enumerate(self.mlps))


def test_weighted_sum_equals_direct_per_layer_computation(experts):
    tok, _, folders, _ = experts
    sources = [_load(f) for f in folders]
    merge = FFNMergeForCausalLM.from_components(sources)
    p = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    direct = _load(folders[0])
    for i, layer in enumerate(direct.model.layers):
        layer.mlp = _DirectMix([s.model.layers[i].mlp for s in sources], p)
    enc = _ids(tok, [domain_texts(1, 1)[0], domain_texts(0, 1, seed=3)[0]])
    with torch.no_grad():
        torch.testing.assert_close(merge(**enc, gating_probs=p).logits, direct(**enc).logits, rtol=1e-5, atol=1e-5)


def test_select_one_takes_each_rows_most_probable_model(experts):
    tok, _, folders, _ = experts
    merge = FFNMergeForCausalLM.from_components(folders, routing_mode="select_one")
    enc = _ids(tok, [domain_texts(1, 1)[0], domain_texts(1, 1, seed=5)[0]])
    p = torch.tensor([[0.2, 0.1, 0.7], [0.3, 0.4, 0.3]])
    with torch.no_grad():
        out = merge(**enc, gating_probs=p).logits
        torch.testing.assert_close(out[0], _load(folders[2])(**enc).logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out[1], _load(folders[1])(**enc).logits[1], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def gate_dir(world):
    return world.gate3


def test_save_load_round_trip_with_gate(experts, gate_dir, tmp_path):
    tok, _, folders, _ = experts
    merge = FFNMergeForCausalLM.from_components(folders, gating=gate_dir)
    merge.save_pretrained(tmp_path / "merged")
    files = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["model_type"] == "dsmoe_ffn_merge" and cfg["num_models"] == 3
    assert cfg["gating_encoder"] == str(experts[3] / "encoder")  # referenced, not copied
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert isinstance(loaded, FFNMergeForCausalLM) and loaded.tokenizer is not None
    enc = _ids(tok, [domain_texts(0, 1, seed=9)[0], domain_texts(2, 1, seed=9)[0]])
    with torch.no_grad():
        a, b = merge(**enc), loaded(**enc)               # the gate runs inside forward
    torch.testing.assert_close(a.gating_probs, b.gating_probs)
    torch.testing.assert_close(a.logits, b.logits)
    assert b.gating_probs[0].argmax() == 0 and b.gating_probs[1].argmax() == 2   # the toy gate is right
    # the trunk is stored once, the FFNs N times per layer
    keys = set(loaded.state_dict())
    assert sum(k.endswith("self_attn.q_proj.weight") for k in keys) == 2
    assert sum(k.endswith("mlp.ffns.2.down_proj.weight") for k in keys) == 2


def test_generate_with_cache_equals_without_and_keeps_the_prompts_gate(experts, gate_dir):
    tok, _, folders, _ = experts
    merge = FFNMergeForCausalLM.from_components(folders, gating=gate_dir)
    enc = _ids(tok, [domain_texts(1, 1, seed=11)[0]])
    seen = []
    hook = merge.trunk.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with_cache = merge.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True)
    hook.remove()
    assert seen[0] == enc["input_ids"].shape[1] and set(seen[1:]) == {1}     # the cache really was used
    without = merge.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    p = merge.gating_probs_for(tok.batch_decode(enc["input_ids"], skip_special_tokens=True))
    fixed = merge.generate(**enc, max_new_tokens=6, do_sample=False, gating_probs=p)
    assert torch.equal(with_cache, fixed)


def test_continuation_without_gating_probs_and_missing_gate_are_refused(experts):
    tok, _, folders, _ = experts
    merge = FFNMergeForCausalLM.from_components(folders[:2])
    enc = _ids(tok, ["apple banana"])
    with pytest.raises(ValueError, match="no gate; pass gating_probs"):
        merge(**enc)
    with pytest.raises(ValueError, match=r"expected \(batch=1, num_models=2\)"):
        merge(**enc, gating_probs=torch.ones(1, 3) / 3)


def test_mismatched_models_name_the_first_difference(experts, tmp_path):
    tok, base, folders, _ = experts
    m = _load(base)
    other_layers = LlamaForCausalLM(llama_config(len(tok), num_hidden_layers=3))
    with pytest.raises(ValueError, match="num_hidden_layers=3 but model 1 has num_hidden_layers=2"):
        FFNMergeForCausalLM.from_components([m, other_layers])
    other_vocab = LlamaForCausalLM(llama_config(len(tok) + 5))
    with pytest.raises(ValueError, match="vocab_size="):
        FFNMergeForCausalLM.from_components([m, other_vocab])
    moved = perturbed_copy(m, seed=1, where="self_attn.k_proj")
    with pytest.raises(ValueError, match=r"weight model\.layers\.0\.self_attn\.k_proj\.weight differs .* "
                                         r"allow_different_trunks"):
        FFNMergeForCausalLM.from_components([m, moved])
    with pytest.raises(ValueError, match="not an HF model folder"):
        FFNMergeForCausalLM.from_components([folders[0], tmp_path])
    with pytest.raises(ValueError, match="at least 2 models"):
        FFNMergeForCausalLM.from_components([m])


def test_allow_different_trunks_averages_them(experts):
    _, base, _, _ = experts
    m = _load(base)
    moved = perturbed_copy(perturbed_copy(m, seed=1, where="self_attn"), seed=2)
    merge = FFNMergeForCausalLM.from_components([m, moved], allow_different_trunks=True)
    key = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(merge.trunk.state_dict()[key], (m.state_dict()[key] + moved.state_dict()[key]) / 2)
    torch.testing.assert_close(merge.trunk.model.layers[1].mlp.ffns[1].up_proj.weight,
                               moved.model.layers[1].mlp.up_proj.weight)


def test_gate_with_wrong_class_count_and_non_merge_folder_are_refused(experts, gate_dir):
    _, base, folders, _ = experts
    with pytest.raises(ValueError, match="the gate has 3 classes but 2 models were given"):
        FFNMergeForCausalLM.from_components(folders[:2], gating=gate_dir)
    with pytest.raises(ValueError, match="not a gate folder"):
        FFNMergeForCausalLM.from_components(folders[:2], gating=base)
    with pytest.raises(ValueError, match="holds a 'llama' model, not an FFN merge"):
        FFNMergeForCausalLM.from_pretrained(base)


def test_tied_embeddings_merge_and_round_trip(tmp_path):
    torch.manual_seed(0)
    m = LlamaForCausalLM(llama_config(61, tie_word_embeddings=True)).eval()
    other = perturbed_copy(m, seed=3)
    merge = FFNMergeForCausalLM.from_components([m, other])
    merge.save_pretrained(tmp_path)
    loaded = FFNMergeForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 61, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, gating_probs=torch.tensor([0.0, 1.0])).logits, other(x).logits,
                                   rtol=0, atol=1e-5)


def test_merge_of_another_llama_style_family_is_exact():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    qwen = Qwen2ForCausalLM(cfg).eval()
    other = perturbed_copy(qwen, seed=5, scale=0.2)
    merge = FFNMergeForCausalLM.from_components([qwen, other], routing_mode="select_one")
    x = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        got = merge(x, gating_probs=torch.tensor([[0.4, 0.6], [0.9, 0.1]])).logits
        torch.testing.assert_close(got[0], other(x).logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1], qwen(x).logits[1], rtol=0, atol=1e-5)
