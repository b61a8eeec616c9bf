"""The time-aware mixture's original usage example runs through dsmoe.compat with only its imports changed."""
from __future__ import annotations

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, PreTrainedTokenizerFast

from mixture_utils import one_torch_thread

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

# The usage example of the original release, verbatim except: its two imports of TiMoE / TiMoEConfig name
# dsmoe.compat, the hub id "gpt2" is a tokenizer folder saved by the test (no hub access), and the placeholder
# `expert_configs=[...]` is a list of tiny GPT-2 configs.
SEED_EXAMPLE = '''
from transformers import AutoTokenizer
from dsmoe.compat import TiMoE
from dsmoe.compat import TiMoEConfig

# Load tokenizer
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)

# Build config
config = TiMoEConfig(
    num_experts=6,
    expert_configs=EXPERT_CONFIGS,  # list of GPT2 configs
    use_router=True,
    top_k_experts=2,
    sequence_length=1024,
)

# Init model
model = TiMoE(config)

# Forward pass with timestamp
inputs = tokenizer("The year is 2019 and", return_tensors="pt")
out = model(**inputs, date=2019)
print(out.combined_log_probs.shape)
'''


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["The year is 2019 and the pandemic started in 2020."] * 10, vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)
    return str(folder)


def tiny_gpt2(vocab: int) -> GPT2Config:
    return GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=1024, vocab_size=vocab, bos_token_id=0,
                      eos_token_id=0)


def test_seed_usage_example_runs(tokenizer_dir, capsys, tmp_path):
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    scope = {"TOKENIZER_DIR": tokenizer_dir, "EXPERT_CONFIGS": [tiny_gpt2(vocab) for _ in range(6)]}
    exec(compile(SEED_EXAMPLE, "seed_usage_example", "exec"), scope)
    out, model, inputs = scope["out"], scope["model"], scope["inputs"]
    assert capsys.readouterr().out.strip() == f"torch.Size([1, {inputs['input_ids'].shape[1]}, {vocab}])"
    # consecutive 2-year windows from 2013; experts starting after 2019 get exactly zero weight
    assert model.config.slices == [[2013, 2014], [2015, 2016], [2017, 2018], [2019, 2020], [2021, 2022],
                                   [2023, 2024]]
    assert torch.all(out.expert_weights[..., 4:] == 0)
    assert torch.all((out.expert_weights > 0).sum(-1) == 2)        # top_k_experts=2
    torch.testing.assert_close(out.combined_log_probs.exp().sum(-1), torch.ones(inputs["input_ids"].shape))
    model.tokenizer = scope["tokenizer"]
    text = model.generate_from_string("The pandemic started in", max_new_tokens=5, date=2020)
    assert text.startswith("The pandemic started in") and len(text) > len("The pandemic started in")
    model.save_pretrained(tmp_path / "timoe")                     # the tokenizer travels with the folder
    reloaded = scope["TiMoE"].from_pretrained(tmp_path / "timoe")
    assert reloaded.generate_from_string("The pandemic started in", max_new_tokens=5, date=2020) == text


def test_unsupported_seed_options_are_refused(tokenizer_dir):
    from dsmoe.compat import TiMoEConfig
    cfgs = [tiny_gpt2(300) for _ in range(2)]
    with pytest.raises(ValueError, match=r"option\(s\) \['router_type'\] are not supported"):
        TiMoEConfig(num_experts=2, expert_configs=cfgs, router_type="mlp")
    with pytest.raises(ValueError, match="not a placeholder"):
        TiMoEConfig(num_experts=2, expert_configs=[...])
    with pytest.raises(ValueError, match="num_experts=3 but 2 expert_configs"):
        TiMoEConfig(num_experts=3, expert_configs=cfgs)
    with pytest.raises(ValueError, match=r"top_k_experts=3: must be an integer in \[1, 2\]"):
        TiMoEConfig(num_experts=2, expert_configs=cfgs, use_router=True, top_k_experts=3)
    cfg = TiMoEConfig(num_experts=2, expert_configs=[{"n_embd": 16, "n_layer": 1, "n_head": 2, "vocab_size": 300}] * 2,
                      slices=[(1990, 1999), (2000, 2009)])
    assert cfg.expert_configs[0]["model_type"] == "gpt2" and cfg.slices == [[1990, 1999], [2000, 2009]]
    assert cfg.default_mode == "equal" and cfg.combine == "logprob" and cfg.date_policy == "start"
