#!/usr/bin/env python
"""Gate-training throughput and peak memory of an expert mixture with random-weight OLMo-shape experts.

  python launch/bench_mixture.py [--device cpu|cuda] [--dtype fp32|bf16] [--experts 3] [--shape small|olmo-1b|olmo-7b]
                                 [--batch B] [--seq T] [--steps S] [--warmup W] [--combine logprob|logits]
                                 [--smoke] [--json PATH]

Default: on a GPU three OLMo-7B-shape experts in bf16; on CPU three small OLMo-shape experts (hidden 256,
4 layers, vocab 8192) in fp32. One step = the mixture's forward over all experts (frozen, no grad), the mixture
NLL + router regularisers, backward into the router and an AdamW step of the router. Reported: tokens/s
(input tokens per second over the timed steps, after --warmup steps) and peak memory (CUDA max allocated, or the
process's peak RSS on CPU).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmoe.benchmarking import CpuContention, log, machine_line, setup_device  # noqa: E402

SMALL = {"model_type": "olmo", "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 1024,
         "num_attention_heads": 4, "vocab_size": 8192, "max_position_embeddings": 1024,
         "pad_token_id": 0, "eos_token_id": 0, "bos_token_id": None}
TINY = {"model_type": "olmo", "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
        "num_attention_heads": 2, "vocab_size": 512, "max_position_embeddings": 128,
        "pad_token_id": 0, "eos_token_id": 0, "bos_token_id": None}


def main(argv=None) -> int:
    from dsmoe.mixtures.memory_plan import OLMO_1B, OLMO_7B
    shapes = {"tiny": TINY, "small": SMALL, "olmo-1b": OLMO_1B, "olmo-7b": OLMO_7B}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--shape", choices=tuple(shapes), default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--combine", choices=("logprob", "logits"), default="logprob")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps (for the tests)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device, dtype, dtype_name = setup_device(a.device, a.dtype, a.threads)
    if a.smoke:
        a.shape, a.batch, a.seq, a.steps, a.warmup = "tiny", 2, 16, 2, 1
    shape = a.shape or ("olmo-7b" if device == "cuda" else "small")
    batch = a.batch or (4 if device == "cuda" else 4)
    seq = a.seq or (1024 if device == "cuda" else 128)
    if a.experts < 1 or batch < 1 or seq < 2 or a.steps < 1:
        print("dsmoe: error: --experts, --batch, --steps must be >= 1 and --seq >= 2", file=sys.stderr)
        return 2

    from transformers import AutoConfig, AutoModelForCausalLM
    from dsmoe.mixtures import ExpertMixtureForCausalLM
    from dsmoe.mixtures.gate_training import GateTrainingConfig, train_gate

    values = dict(shapes[shape])
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    log(f"building {a.experts} x {shape} experts ({dtype_name}) on {device}")
    torch.manual_seed(0)
    with torch.device(device):
        experts = [AutoModelForCausalLM.from_config(cfg, dtype=dtype) for _ in range(a.experts)]
        slices = [(1800 + 50 * k, 1849 + 50 * k) for k in range(a.experts)]
        model = ExpertMixtureForCausalLM.from_experts(experts, slices, combine=a.combine,
                                                      router={"hidden_size": 256})
    model.router.float()
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)}
               for _ in range(2)]
    train_gate(model, batches, GateTrainingConfig(steps=a.warmup))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    meter = CpuContention()
    res = train_gate(model, batches, GateTrainingConfig(steps=a.steps))
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    share = meter.share()
    out = {"machine": machine_line(device, dtype, ("transformers",)), "experts": a.experts, "shape": shape,
           "combine": a.combine, "batch": batch, "seq": seq, "steps": a.steps,
           "tokens_per_s": round(res.tokens_per_second, 1), "peak_memory_gib": round(peak, 3),
           "peak_memory_kind": "cuda max allocated" if device == "cuda" else "process peak RSS",
           "final_loss": round(res.losses[-1], 4), "other_cpu_load": None if share is None else round(share, 3)}
    print(out["machine"])
    print(f"gate training, {a.experts} x {shape} ({dtype_name}, {a.combine}), batch {batch} x {seq}: "
          f"{out['tokens_per_s']} tokens/s, peak memory {out['peak_memory_gib']} GiB ({out['peak_memory_kind']})"
          + ("" if share is None else f"; other processes used {100 * share:.0f}% of the CPUs meanwhile"))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
