#!/usr/bin/env python
"""Training-step throughput, TFLOP/s and MFU of full RoutedLM models: two MoE shapes and their dense baseline.

One process, interleaved: every round runs one full training step (forward + backward + AdamW step, plus the
expert-bias update of noaux_tc balancing) of each model in turn (round-robin, each round starting one model later), after ``--warmup`` such rounds;
the reported time is the median over ``--reps`` rounds. All models share width, depth, heads, sequence length
and micro-batch, and each round feeds the same random token ids to all of them.

Models (RoutedLMForCausalLM, dropless, no null experts)
  mixtral   8 routed experts of width ffn/2, top-2, softmax router, aux loss 0.02 (Mixtral-8x7B's)
  deepseek  64 routed experts of width ffn/8 + 2 shared (fused width ffn/4), top-6, sigmoid scores, n_group 8 /
            topk_group 4, noaux_tc aux-loss-free bias balancing (+ seq aux loss 1e-4), routed scaling 2.5,
            first layer dense (FFN width ffn)
  dense     use_moe=False, FFN width ffn = both MoE models' active FFN width (top_k * expert width + shared width)

FLOPs per token = 6 * N_active + 12 * L * (heads * head_dim) * T   (PaLM appendix B / Megatron MFU convention)
  N_active: every parameter a token's matmuls use, i.e. all but the input-embedding table (lm_head included, as
  Megatron's formula does), routed experts counted top_k / E of theirs (the computed ones; dropless, so all
  top_k are computed), shared experts, router and the dense first layer in full. The attention term counts the
  full T x T score and value matmuls, forward + backward (not halved for the causal mask).
MFU = achieved FLOP/s / peak; peak defaults to the device's dense bf16 tensor-core figure (989 TFLOP/s for H100
SXM) and is n/a on CPU unless --peak-tflops is given.

Precision: bf16 on CUDA means the model itself is bf16 (weights, grads, AdamW moments; torch.optim.AdamW fused,
no fp32 master weights): the matmul work is that of bf16 mixed precision, the optimizer is cheaper than with an
fp32 master copy. fp32 on CPU. AdamW is fused on both (10x faster than the default for-loop AdamW on CPU).

Usage: python launch/bench_train.py [--device cpu|cuda] [--hidden H --layers L --seq T --batch B --ffn F]
                                    [--models mixtral,deepseek,dense] [--smoke] [--json PATH]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsmoe.models import RoutedLMConfig, RoutedLMForCausalLM  # noqa: E402
from dsmoe.benchmarking import BusyCore, CpuContention, log, machine_line, median, setup_device, sync  # noqa: E402
from dsmoe.cpu_allocator import allocator_note, keep_cpu_allocations  # noqa: E402
from dsmoe.models.modeling_routed_lm import RoutedLMRotaryEmbedding  # noqa: E402
from dsmoe.moe.experts import GroupedExperts  # noqa: E402
from dsmoe.moe.router import Router  # noqa: E402

MODELS = ("mixtral", "deepseek", "dense")
TARGET_MFU = {"mixtral": 45.0, "deepseek": 30.0}          # percent, one H100, bf16
TARGET_NOTE = "MFU targets hold for one H100 in bf16"
REFERENCES = ("reference points: Megatron-Core ~47% MFU Mixtral 8x7B on 64 H100; DeepSeek-V3 25-34%; "
              "~12% fine-grained small MoE")
# dense bf16 tensor-core peaks (TFLOP/s), matched against torch.cuda.get_device_name(); first hit wins
PEAK_BF16 = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
             ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0))


# ---------------------------------------------------------------------------------------------- setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of mixtral,deepseek,dense")
    p.add_argument("--hidden", type=int, default=None, help="model width H (default 2048 cuda, 256 cpu)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 16 cuda, 4 cpu)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default heads / 2)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 12 cuda, 4 cpu)")
    p.add_argument("--seq", type=int, default=None, help="sequence length T (default 4096 cuda, 256 cpu)")
    p.add_argument("--batch", type=int, default=None,
                   help="micro-batch (sequences per step); default on cuda: the largest that keeps all models' "
                        "peak under --mem-target-gb (probed at batch 1), 4 on cpu")
    p.add_argument("--ffn", type=int, default=None,
                   help="active FFN width = dense FFN width (default 2.75*H: 5632 cuda, 704 cpu); mixtral experts "
                        "get ffn/2, deepseek experts ffn/8 (6 routed + 2 shared)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 32000 cuda, 4096 cpu)")
    p.add_argument("--mem-target-gb", type=float, default=None,
                   help="auto batch: peak GiB to aim for (default 80%% of the GPU's memory: ~63 GiB on an H100)")
    p.add_argument("--warmup", type=int, default=None, help="warmup rounds (default 3 cuda, 2 cpu)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 10 cuda, 15 cpu)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: by GPU name; none on cpu)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile attention and dense FFNs (MoE FFNs stay eager; off by default)")
    p.add_argument("--expert-kernel", default="auto",
                   choices=("auto", "grouped", "bucketed", "padded", "adaptive", "loop"),
                   help="RoutedLMConfig.moe_expert_kernel of the MoE models (default auto: bucketed on CPU, "
                        "grouped GEMM on GPU)")
    p.add_argument("--busy-core", action="store_true", help="spin a helper process on one CPU while timing")
    p.add_argument("--system-malloc", action="store_true",
                   help="CPU: keep glibc's default allocation (mmap for large tensors) instead of dsmoe's setting")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 warmup + 2 reps: checks the script runs")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def default_peak(device: str, dtype: torch.dtype) -> tuple[float | None, str]:
    if device != "cuda":
        return None, "no peak on CPU (pass --peak-tflops for an MFU)"
    name = torch.cuda.get_device_name()
    if dtype != torch.bfloat16:
        return None, f"no default peak for {dtype} on {name} (pass --peak-tflops)"
    for key, tf in PEAK_BF16:
        if key in name:
            return tf, f"{tf:.0f} TFLOP/s = dense bf16 tensor-core peak of {key} (matched '{name}')"
    return None, f"unknown GPU '{name}': pass --peak-tflops"


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Sizes:
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    seq: int
    batch: int | None
    ffn: int
    vocab: int

    def describe(self):
        return (f"H={self.hidden} heads={self.heads} kv_heads={self.kv_heads} head_dim={self.hidden // self.heads} "
                f"L={self.layers} T={self.seq} B={self.batch} vocab={self.vocab} active FFN width={self.ffn}")


def make_config(name: str, s: Sizes, kernel: str = "auto") -> RoutedLMConfig:
    base = dict(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                num_key_value_heads=s.kv_heads, max_position_embeddings=s.seq, intermediate_size=s.ffn,
                tie_word_embeddings=False, use_cache=False, expert_capacity_factor=None, moe_expert_kernel=kernel)
    if name == "dense":
        return RoutedLMConfig(**base, use_moe=False)
    if name == "mixtral":
        return RoutedLMConfig(**base, rope_theta=1e6, n_routed_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=s.ffn // 2, scoring_func="softmax", aux_loss_coef=0.02)
    if name == "deepseek":
        return RoutedLMConfig(**base, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                              moe_intermediate_size=s.ffn // 8, scoring_func="sigmoid", n_group=8, topk_group=4,
                              topk_method="noaux_tc", router_scaling_factor=2.5, aux_loss_coef=0.0,
                              seq_aux_loss_coef=1e-4, first_k_dense_layers=1)
    raise ValueError(name)


def describe_config(name: str, c: RoutedLMConfig) -> str:
    if not c.use_moe:
        return f"dense SwiGLU FFN width {c.intermediate_size} in all {c.num_hidden_layers} layers"
    s = f"{c.n_routed_experts} routed experts x width {c.moe_intermediate_size}"
    if c.n_shared_experts:
        s += f" + {c.n_shared_experts} shared (fused width {c.n_shared_experts * c.moe_intermediate_size})"
    s += f", top-{c.num_experts_per_tok}, {c.scoring_func}"
    if c.n_group > 1:
        s += f", n_group {c.n_group}/topk_group {c.topk_group}"
    s += f", {c.topk_method}, dropless"
    if c.first_k_dense_layers:
        s += f", first {c.first_k_dense_layers} layer(s) dense (width {c.intermediate_size})"
    active = c.num_experts_per_tok * c.moe_intermediate_size + c.n_shared_experts * c.moe_intermediate_size
    return s + f"; active FFN width {active}"


def count_params(model: RoutedLMForCausalLM) -> dict:
    """total, active (per token, matmul-relevant: all but the input embedding; routed experts top_k/E)."""
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    embed = model.model.embed_tokens.weight.numel()
    routed = sum(p.numel() for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    active = total - embed - routed
    if routed:
        active += routed * c.num_experts_per_tok / c.n_routed_experts
    return {"total": total, "embedding": embed, "routed_expert": routed, "active": active}


def flops_per_token(model: RoutedLMForCausalLM, seq: int) -> tuple[float, float, float]:
    """(total, 6*N_active, attention) training FLOPs per token."""
    c = model.config
    n = count_params(model)["active"]
    attn = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq
    return 6 * n + attn, 6 * n, attn


@dataclass
class Bench:
    name: str
    model: RoutedLMForCausalLM
    opt: torch.optim.Optimizer
    params: dict
    flops_tok: float
    flops_6n: float
    flops_attn: float
    times: list = field(default_factory=list)
    peak_mem: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    computed: int = 0
    assigned: int = 0

    @property
    def bias_balancing(self):
        return self.model.config.use_moe and self.model.config.topk_method == "noaux_tc"


def build(name: str, s: Sizes, device: str, dtype: torch.dtype, lr: float, compile_layers: bool,
          kernel: str = "auto") -> Bench:
    cfg = make_config(name, s, kernel)
    with torch.device(device):             # initialise on the GPU: seconds instead of minutes for billions of params
        model = RoutedLMForCausalLM(cfg)
    model.to(device=device, dtype=dtype).train()
    with torch.no_grad():                  # .to(dtype) also cast these buffers; keep them fp32 as in real training
        for m in model.modules():
            if isinstance(m, Router):
                m.expert_bias.data = m.expert_bias.float()
                m.load_accum.data = m.load_accum.float()
            elif isinstance(m, RoutedLMRotaryEmbedding):
                m.inv_freq.data = m.compute_inv_freq().to(m.inv_freq.device)
    params = count_params(model)
    f_tot, f_6n, f_attn = flops_per_token(model, s.seq)
    if compile_layers:   # attention and dense FFNs only: the MoE FFN has data-dependent shapes (and torch's fake
        for layer in model.model.layers:   # _grouped_mm accepts bf16 only), so it stays eager
            layer.self_attn.compile()
            if not layer.is_moe:
                layer.mlp.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    return Bench(name, model, opt, params, f_tot, f_6n, f_attn)


# ---------------------------------------------------------------------------------------------- timing
def train_step(b: Bench, ids: torch.Tensor, step: int, device: str, record: bool):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = b.model(input_ids=ids, labels=ids, step=step)
    out.loss.backward()
    b.opt.step()
    b.opt.zero_grad(set_to_none=True)      # only the running model holds gradients
    if b.bias_balancing:
        b.model.update_expert_bias()
    sync(device)
    dt = time.perf_counter() - t0
    if record:
        b.times.append(dt)
        b.losses.append(float(out.lm_loss.detach()))
        if device == "cuda":
            b.peak_mem.append(torch.cuda.max_memory_allocated())
        if out.moe_stats:
            b.computed = int(sum(int(st.tokens_per_expert.sum()) for st in out.moe_stats))
            b.assigned = ids.numel() * b.model.config.num_experts_per_tok * len(out.moe_stats)
    del out
    return dt


def grad_bytes(b: Bench) -> int:
    return sum(p.numel() * p.element_size() for p in b.model.parameters() if p.requires_grad)


def auto_batch(benches, s: Sizes, device, target_bytes, gen, log) -> int:
    """Two rounds at batch 1 (the second after AdamW allocated its state); the batch that keeps every model's
    peak (resident weights + optimizer state of all models + its grads + batch * its activations) under target."""
    act = {}
    for r in range(2):
        ids = torch.randint(0, s.vocab, (1, s.seq), device=device, generator=gen)
        for b in benches:
            gc.collect()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            train_step(b, ids, r, device, record=False)
            act[b.name] = torch.cuda.max_memory_allocated() - base - grad_bytes(b)
    resident = torch.cuda.memory_allocated()
    room = {b.name: (target_bytes - resident - grad_bytes(b)) / max(act[b.name], 1) for b in benches}
    batch = max(1, int(min(room.values())))
    log(f"  auto batch: resident {resident / 2**30:.1f} GiB (weights + AdamW state of all models); activations per "
        f"sequence " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in act.items())
        + f" -> batch {batch} for a {target_bytes / 2**30:.0f} GiB target")
    return batch


def free_memory(benches):
    for b in benches:
        b.opt.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()


def bench(benches, s: Sizes, device, warmup, reps, gen, log, auto):
    """Round-robin: ``warmup`` untimed rounds, then ``reps`` timed ones; with an auto batch an out-of-memory during
    warmup lowers the batch and restarts the warmup."""
    while True:
        oom = False
        try:
            for r in range(warmup):
                ids = torch.randint(0, s.vocab, (s.batch, s.seq), device=device, generator=gen)
                for b in benches:
                    train_step(b, ids, r, device, record=False)
        except torch.OutOfMemoryError:
            if not auto or s.batch <= 1:
                raise
            oom = True
        if not oom:
            break
        new = s.batch - max(1, s.batch // 4)     # outside the except: the traceback no longer pins the tensors
        log(f"  out of memory at batch {s.batch} during warmup: retrying with batch {new}")
        s.batch = new
        free_memory(benches)
    log(f"  warmup done ({warmup} rounds, batch {s.batch})")
    cont = CpuContention()
    for r in range(reps):
        ids = torch.randint(0, s.vocab, (s.batch, s.seq), device=device, generator=gen)
        shift = r % len(benches)                 # each round starts one model later: no fixed neighbour
        for b in benches[shift:] + benches[:shift]:
            train_step(b, ids, warmup + r, device, record=True)
    return cont.share()


def fmt_count(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    device, dtype, dtype_name = setup_device(args.device, args.dtype, args.threads)
    gpu = device == "cuda"
    if not gpu and not args.system_malloc:
        keep_cpu_allocations()
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if args.smoke:
        d = dict(hidden=64, heads=4, layers=2, seq=32, batch=2, vocab=256, warmup=1, reps=2, ffn=128)
    elif gpu:
        d = dict(hidden=2048, heads=16, layers=12, seq=4096, batch=None, vocab=32000, warmup=3, reps=10)
    else:
        d = dict(hidden=256, heads=4, layers=4, seq=256, batch=4, vocab=4096, warmup=2, reps=15)
    hidden = args.hidden or d["hidden"]
    heads = args.heads or d["heads"]
    ffn = args.ffn or d.get("ffn") or int(round(2.75 * hidden / 8)) * 8
    s = Sizes(hidden=hidden, heads=heads, kv_heads=args.kv_heads or max(1, heads // 2),
              layers=args.layers or d["layers"], seq=args.seq or d["seq"],
              batch=args.batch or d["batch"], ffn=ffn, vocab=args.vocab or d["vocab"])
    if s.ffn % 8:
        sys.exit(f"--ffn {s.ffn} must be divisible by 8 (mixtral experts get ffn/2, deepseek experts ffn/8)")
    align = 16 // torch.tensor([], dtype=dtype).element_size()
    if (s.ffn // 8) % align:
        log(f"note: deepseek expert width {s.ffn // 8} is not a multiple of {align}: torch._grouped_mm needs "
            "16-byte aligned rows, so its experts run as a per-expert loop")
    warmup = args.warmup if args.warmup is not None else d["warmup"]
    reps = args.reps or d["reps"]
    auto = s.batch is None
    if auto and not gpu:
        s.batch = 4
        auto = False
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in wanted if m not in MODELS]
    if bad:
        sys.exit(f"--models: unknown {bad}; choose from {MODELS}")
    wanted = [m for m in MODELS if m in wanted]

    peak_tflops, peak_note = (args.peak_tflops, f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)") \
        if args.peak_tflops else default_peak(device, dtype)

    mline = machine_line(device, dtype, ("transformers",))
    mline += f" | {allocator_note() if not gpu else 'malloc: n/a'} | expert_kernel={args.expert_kernel}"
    spinner = BusyCore(args.busy_core)
    print(mline + f" | {spinner.describe()}", flush=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    benches = []
    for name in wanted:
        b = build(name, s, device, dtype, args.lr, args.compile, args.expert_kernel)
        benches.append(b)
        log(f"built {name}: {fmt_count(b.params['total'])} params, {fmt_count(b.params['active'])} active "
            f"(non-embedding), {b.flops_tok / 1e9:.2f} GFLOP/token")
    if auto:
        total_mem = torch.cuda.get_device_properties(0).total_memory
        target = (args.mem_target_gb * 2**30) if args.mem_target_gb else 0.8 * total_mem
        s.batch = auto_batch(benches, s, device, target, gen, log)
    with spinner:
        contention = bench(benches, s, device, warmup, reps, gen, log, auto)

    # ------------------------------------------------------------------ table
    tokens = s.batch * s.seq
    rows = []
    for b in benches:
        t = median(b.times)
        tflops = b.flops_tok * tokens / t / 1e12
        rows.append({
            "model": b.name, "config": describe_config(b.name, b.model.config),
            "params_total": b.params["total"], "params_active": b.params["active"],
            "gflop_per_token": b.flops_tok / 1e9, "gflop_6n": b.flops_6n / 1e9, "gflop_attention": b.flops_attn / 1e9,
            "median_ms": t * 1e3, "min_ms": min(b.times) * 1e3, "max_ms": max(b.times) * 1e3,
            "tokens_per_s": tokens / t, "tflops": tflops,
            "mfu_pct": 100 * tflops / peak_tflops if peak_tflops else None,
            "target_mfu_pct": TARGET_MFU.get(b.name),
            "peak_mem_gib": max(b.peak_mem) / 2**30 if b.peak_mem else None,
            "lm_loss": b.losses[-1], "computed_assignments": b.computed, "assignments": b.assigned,
        })
    results = {"machine": mline, "device": device, "dtype": dtype_name, "sizes": vars(s), "tokens_per_step": tokens,
               "warmup": warmup, "reps": reps, "peak_tflops": peak_tflops, "peak_note": peak_note,
               "busy_core": args.busy_core, "expert_kernel": args.expert_kernel,
               "flops_note": "6*N_active + 12*L*(heads*head_dim)*T per token, fwd+bwd; N_active: all parameters "
                             "but the input embedding, routed experts counted top_k/E",
               "rows": rows, "ratios": {}}

    prec = ("bf16 weights, grads and AdamW moments (torch.optim.AdamW(fused=True); no fp32 master weights)"
            if dtype == torch.bfloat16 else
            f"{dtype_name} weights, grads and AdamW moments (torch.optim.AdamW(fused=True))")
    print(f"timing: forward + backward + AdamW step (+ noaux_tc expert-bias update), {warmup} warmup + {reps} timed "
          f"round-robin rounds, median; {prec}"
          + ("; attention + dense FFNs torch.compile'd, MoE FFNs eager" if args.compile else "; eager"))
    print(f"sizes: {s.describe()} -> {tokens} tokens/step" + (" (auto batch)" if auto else ""))
    print("FLOPs/token = 6*N_active + 12*L*(heads*head_dim)*T  (PaLM/Megatron MFU convention; fwd+bwd; attention "
          "not halved for causality); N_active = all parameters but the input embedding (lm_head counted), "
          "routed experts counted top_k/E (the computed ones) + shared + router")
    print(f"peak: {peak_note}")
    for r in rows:
        print(f"  {r['model']:<8} {r['config']}")
        print(f"  {'':<8} params {fmt_count(r['params_total'])} total, {fmt_count(r['params_active'])} active; "
              f"{r['gflop_per_token']:.3f} GFLOP/token = 6N {r['gflop_6n']:.3f} + attention {r['gflop_attention']:.3f}")
    if contention is not None:
        expected = 1 / (os.cpu_count() or 1) if args.busy_core else 0.0
        print(f"contention: other processes + steal used {100 * contention:.0f}% of the {os.cpu_count()} CPUs while "
              "timing" + (" (the busy core included)" if args.busy_core else "")
              + ("  <- noisy, rerun on a quiet machine" if contention > expected + 0.1 else ""))
    tgt_ok = gpu and dtype == torch.bfloat16 and peak_tflops is not None
    hdr = (f"{'model':<9} {'median ms':>10} {'min..max ms':>17} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>7} "
           f"{'target':>11} {'peak GiB':>8} {'computed/assigned':>18} {'loss':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        mfu = f"{r['mfu_pct']:.1f}%" if r["mfu_pct"] is not None else "n/a"
        if r["target_mfu_pct"] is None:
            tgt = "-"
        elif tgt_ok:
            tgt = f">={r['target_mfu_pct']:.0f}% " + ("MET" if r["mfu_pct"] >= r["target_mfu_pct"] else "MISS")
        else:
            tgt = f">={r['target_mfu_pct']:.0f}% (H100)"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        comp = f"{r['computed_assignments']}/{r['assignments']}" if r["assignments"] else "-"
        print(f"{r['model']:<9} {r['median_ms']:>10.2f} {r['min_ms']:>8.1f}..{r['max_ms']:<8.1f} "
              f"{r['tokens_per_s']:>10.0f} {r['tflops']:>8.3f} {mfu:>7} {tgt:>11} {mem:>8} {comp:>18} "
              f"{r['lm_loss']:>6.3f}")
    print(f"targets: {TARGET_NOTE}" + ("" if tgt_ok else f" (this run: {dtype_name} on {device}, not judged)")
          + f"; {REFERENCES}")

    by = {r["model"]: r for r in rows}
    if "dense" in by:
        print("MoE/dense, per token (same tokens per step): time ratio vs FLOP ratio (1.00x time at the FLOP ratio = "
              "the MoE runs its FLOPs as fast as the dense model)")
        for m in ("mixtral", "deepseek"):
            if m not in by:
                continue
            tr = by[m]["median_ms"] / by["dense"]["median_ms"]
            fr = by[m]["gflop_per_token"] / by["dense"]["gflop_per_token"]
            eff = by[m]["tflops"] / by["dense"]["tflops"]
            results["ratios"][m] = {"time_per_token_vs_dense": tr, "flops_per_token_vs_dense": fr,
                                    "tflops_vs_dense": eff}
            print(f"  {m:<8} time {tr:5.2f}x dense, FLOPs {fr:5.2f}x dense -> {100 * eff:5.1f}% of dense TFLOP/s")
    results["other_cpu_share"] = contention
    results["targets"] = {"mfu_pct": TARGET_MFU, "note": TARGET_NOTE, "references": REFERENCES}

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
        log(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
