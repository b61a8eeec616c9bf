"""Tiny real models for the FFN-merge and BTX tests: a byte-level BPE tokenizer trained on toy domain texts, a
random Llama base saved with ``save_pretrained``, and FFN-only fine-tunes of it made by a few steps of a plain loop
on each domain's texts (only the MLP weights train)."""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = [
    "apple banana cherry grape melon peach plum lemon mango berry fruit juice sweet ripe orchard".split(),
    "engine piston gear wheel brake clutch motor diesel torque axle valve spark fuel garage road".split(),
    "violin cello piano guitar drum flute melody rhythm chord song opera choir tempo stage note".split(),
]


def domain_texts(domain: int, n: int, seed: int = 0) -> list[str]:
    """``n`` short sentences drawn from the words of toy domain ``domain`` (0, 1, 2)."""
    rng = random.Random(seed * 31 + domain)
    return [" ".join(rng.choice(WORDS[domain]) for _ in range(rng.randint(6, 12))) + "." for _ in range(n)]


def make_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    texts = [t for d in range(len(WORDS)) for t in domain_texts(d, 40)]
    bpe.train_from_iterator(texts, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def llama_config(vocab: int, **kw) -> LlamaConfig:
    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=0,
                bos_token_id=0, pad_token_id=0)
    return LlamaConfig(**{**base, **kw})


def save_base(folder: Path, tok, seed: int = 0, **kw) -> Path:
    """A random Llama, reloaded through ``from_pretrained`` (the real loading code)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(len(tok), **kw))
    with torch.no_grad():                   # weights large enough for non-trivial logits
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def ffn_finetune(base_dir: Path, out_dir: Path, texts: list[str], tok, steps: int = 8, lr: float = 3e-2,
                 seed: int = 0) -> Path:
    """An FFN-only fine-tune of ``base_dir`` on ``texts``: a few AdamW steps on the MLP weights only."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).train()
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def build_experts(root: Path, n: int = 2):
    """(tokenizer, base folder, [expert folders]): n FFN-only fine-tunes of one tiny base, one per toy domain."""
    tok = make_tokenizer(root / "tok")
    base = save_base(root / "base", tok)
    experts = [ffn_finetune(base, root / f"expert{d}", domain_texts(d, 16, seed=1), tok, seed=d)
               for d in range(n)]
    return tok, base, experts


def perturbed_copy(model, seed: int, scale: float = 0.05, where: str = ".mlp."):
    """A copy of ``model`` with noise added to the parameters whose name contains ``where``."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if where in name:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def save_encoder(folder: Path, tok, seed: int = 0) -> Path:
    """A small random Llama at its default (small) init as a gate encoder: its mean-pooled last hidden states
    are close to bag-of-token embeddings, so the toy domains separate."""
    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config(len(tok), hidden_size=96, num_hidden_layers=1)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def toy_gate_data(n_per_domain: int = 40, domains: int = 3, seed: int = 7):
    """(texts, labels) of the toy domains, domain-major."""
    texts = [t for d in range(domains) for t in domain_texts(d, n_per_domain, seed=seed)]
    return texts, [d for d in range(domains) for _ in range(n_per_domain)]


def cli_main(script: str):
    """The ``main(argv) -> exit code`` of ``launch/<script>.py``, imported from its file (run in-process)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "launch" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"launch_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@dataclass
class MergeWorld:
    """Everything the merge tests share, built once per test session."""

    root: Path
    tok: PreTrainedTokenizerFast
    base: Path              # the random Llama the experts were fine-tuned from
    experts: list[Path]     # 3 FFN-only fine-tunes, one per toy domain
    encoder: Path           # the gates' frozen encoder
    gate2: Path             # a gate over toy domains 0, 1
    gate3: Path             # a gate over toy domains 0, 1, 2


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> MergeWorld:
    """Built once per session (and xdist worker) in its base temp folder; the test modules that import this
    fixture each get their own copy of the fixture, so the build is keyed on a marker file, not on the fixture."""
    from dsmoe.mixtures import GatingConfig, train_gating
    root = tmp_path_factory.getbasetemp() / "merge_world"
    done = root / "complete"
    experts = [root / f"expert{d}" for d in range(3)]
    if not done.exists():
        root.mkdir(exist_ok=True)
        tok, _, experts = build_experts(root, n=3)
        encoder = save_encoder(root / "encoder", tok)
        for n in (2, 3):
            texts, labels = toy_gate_data(n_per_domain=40, domains=n)
            cfg = GatingConfig(base_model=str(encoder), output_dir=str(root / f"gate{n}"), hidden_dims=[16],
                               learning_rate=1e-2, num_epochs=15, batch_size=8, dropout=0.0, train_split=0.6,
                               val_split=0.2, test_split=0.2)
            train_gating(texts, labels, cfg, class_names=["fruit", "cars", "music"][:n])
        done.write_text("ok")
    tok = PreTrainedTokenizerFast.from_pretrained(root / "tok")
    return MergeWorld(root, tok, root / "base", experts, root / "encoder", root / "gate2", root / "gate3")
