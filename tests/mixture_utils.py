"""Tiny random experts of three architectures (GPT-2, Llama, OLMo), saved and reloaded, for the mixture tests."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OlmoConfig

VOCAB = 61
SLICES = [(1790, 1849), (1850, 1899), (1900, 1949)]


def expert_configs(vocab: int = VOCAB) -> list:
    common = {"vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
    return [
        GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=128, **common),
        LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    max_position_embeddings=128, **common),
        OlmoConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=128, **common),
    ]


def save_experts(folder: Path, seed: int = 0, vocab: int = VOCAB, configs: list | None = None) -> list[str]:
    """Save one random expert per config under ``folder``; return their folders."""
    paths = []
    for i, cfg in enumerate(configs or expert_configs(vocab)):
        torch.manual_seed(seed + i)
        model = AutoModelForCausalLM.from_config(cfg)
        path = folder / f"expert{i}"
        model.save_pretrained(path)
        paths.append(str(path))
    return paths


def direct_log_probs(experts, ids: torch.Tensor) -> torch.Tensor:
    """[N, B, T, V] float64 log-softmax of every expert, computed straight from the expert models."""
    with torch.no_grad():
        return torch.stack([torch.log_softmax(e(input_ids=ids).logits.double(), -1) for e in experts])


def one_torch_thread():
    """Generator for a module fixture: tiny models on a shared 2-core machine run far faster on one thread
    (no OpenMP region waits for a descheduled thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
