#!/usr/bin/env python
"""Forward+backward speed of dsmoe's MoELayer against a dense SwiGLU FFN of equal active FLOPs (the ceiling),
transformers' Mixtral and Qwen3-MoE blocks (same weights) and DeepSpeed's MoE layer.

One process, interleaved: every round runs each contender of a shape once, in a seeded random order of its
own, after ``--warmup`` such rounds; the reported time is the median over ``--reps`` rounds, with min..max.

Shapes (CPU sizes; --device cuda uses larger ones, --smoke tiny ones)
  (a) Mixtral-like   H=256 F=512 E=8 k=2
  (b) fine-grained   H=256 F=128 E=64 k=8 (Qwen3-MoE / DeepSeek-like granularity)
  (c) shape (a) + 4 null experts, router bias tuned so ~half the choices are null (timed with (a))
  (d) DeepSeek-like  H=256 F=128 E=64 k=6 + 2 shared experts (not in the default --shapes)

Contenders per shape
  dense SwiGLU           the ceiling: one fused SwiGLU FFN of inner width k*F (+ shared width), same active FLOPs
  dsmoe dropless         MoELayer, capacity_factor=None, expert_kernel="auto"; on (a)/(b) built with
                         MoELayer.from_hf from the transformers block below (the same weights)
                         ("auto" = "bucketed" on CPU: experts sorted by load into a few padded buckets, one
                         batched GEMM per bucket; "grouped" on GPU)
  dsmoe grouped          the same layer with expert_kernel="grouped" (grouped GEMM: one GEMM per expert)
  dsmoe padded           the same layer with expert_kernel="padded" (one bucket: one batched GEMM per projection)
  dsmoe adaptive         the same layer with expert_kernel="adaptive" (times grouped and bucketed, keeps the faster)
  dsmoe cf=1.25          the same layer with capacity_factor=1.25 (drop_policy="probs")
  transformers Mixtral   MixtralSparseMoeBlock (a, b), experts_implementation "eager" (its per-expert loop)
                         and "grouped_mm"
  transformers Qwen3-MoE Qwen3MoeSparseMoeBlock (a, b; norm_topk_prob=True: the same routing), "grouped_mm"
  deepspeed cf=1.25      deepspeed.moe.layer.MoE(k, capacity 1.25, drop_tokens=True), fused SwiGLU expert; shared
                         experts, when the shape has them, as a separate dense SwiGLU added to the output

Speed share of dense = dense median time / contender median time (equal active FLOPs for the dropless layers).
FLOPs count only useful matmul work: for every *computed* (not dropped, not null) assignment 2*3*H*F forward,
plus the shared experts 2*N*3*H*Fs and the router 2*N*H*C; x3 for forward+backward.

--busy-core starts a helper process spinning on one CPU for the whole run (a shared machine, measured).
On CPU the process keeps large tensors in the malloc heap (dsmoe.cpu_allocator); --system-malloc compares.

Usage: python launch/bench_moe.py [--device cpu|cuda] [--dtype fp32|bf16] [--shapes a,b,c] [--busy-core]
                                  [--smoke] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsmoe.benchmarking import BusyCore, CpuContention, log, machine_line, median, setup_device, sync  # noqa: E402
from dsmoe.cpu_allocator import allocator_note, keep_cpu_allocations  # noqa: E402
from dsmoe.deepspeed_comm import init_deepspeed_comm  # noqa: E402
from dsmoe.moe import MLP, MoEConfig, MoELayer  # noqa: E402
from dsmoe.moe.buckets import MAX_BUCKETS, choose_buckets  # noqa: E402
from dsmoe.ports import free_port  # noqa: E402

TARGETS = {
    # share of the dense ceiling's speed (dense time / dsmoe dropless time), per shape
    "cpu": {"pct_of_dense": {"a": 90.0, "b": 70.0}, "vs_strongest": 1.0, "busy_vs_transformers": {"b": 1.5}},
    "cuda": {"pct_of_dense": {"a": 70.0, "b": 70.0}, "vs_strongest": 1.0, "busy_vs_transformers": {}},
    "null_efficiency": 0.8,
}
TARGETED = ("dsmoe dropless", "dsmoe adaptive")   # the dropless layer with the default and the adaptive kernel


# ---------------------------------------------------------------------------------------------- setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (default 4096 cpu, 16384 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="warmup rounds (default 3)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 9 cpu, 30 cuda)")
    p.add_argument("--shapes", default="a,b,c", help="comma list of a,b,c,d (c needs a's baseline: a is added)")
    p.add_argument("--null-share", type=float, default=0.5, help="target fraction of null choices in (c)")
    p.add_argument("--busy-core", action="store_true", help="spin a helper process on one CPU while timing")
    p.add_argument("--system-malloc", action="store_true",
                   help="CPU: keep glibc's default allocation (mmap for large tensors) instead of dsmoe's setting")
    p.add_argument("--no-transformers", action="store_true", help="leave transformers' blocks out")
    p.add_argument("--no-deepspeed", action="store_true", help="leave DeepSpeed's layer out")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 warmup + 2 reps: checks the script runs")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def init_single_process(device: str):
    """DeepSpeed's MoE needs torch.distributed even for one rank: a world of 1 (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return
    # always a private world of 1 on a free port, even when launched from inside another distributed job
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_SIZE": "1"})
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")   # what DeepSpeed picks anyway, minus its warning
    init_deepspeed_comm(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False,
                        verbose=False)


# ---------------------------------------------------------------------------------------------- modules
def SwiGLU(hidden: int, inner: int, std: float = 0.02) -> MLP:
    """Fused SwiGLU (Linear(H, 2F) [gate | up] -> silu(gate) * up -> Linear(F, H)): the dense ceiling and the
    expert handed to DeepSpeed's MoE."""
    mlp = MLP(hidden, inner, fused=True)
    for lin in (mlp.gate_up_proj, mlp.down_proj):
        nn.init.normal_(lin.weight, std=std)
    return mlp


class DeepSpeedContender(nn.Module):
    """deepspeed.moe.layer.MoE (+ a dense SwiGLU for the shared experts when the shape has them)."""

    def __init__(self, hidden, inner, num_experts, k, capacity_factor, shared_inner):
        super().__init__()
        from deepspeed.moe.layer import MoE
        self.moe = MoE(hidden_size=hidden, expert=SwiGLU(hidden, inner), num_experts=num_experts, ep_size=1, k=k,
                       capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor, min_capacity=4,
                       drop_tokens=True)
        self.moe.set_deepspeed_parallelism()   # what the DeepSpeed engine would call: creates/attaches ep group
        nn.init.normal_(self.moe.deepspeed_moe.gate.wg.weight, std=0.02)
        self.shared = SwiGLU(hidden, shared_inner) if shared_inner else None
        self.last_kept = None
        self.moe.deepspeed_moe.gate.register_forward_hook(self._count_kept)

    def _count_kept(self, module, args, out):
        # sparse routes: (l_aux, capacity, E, route_indices [k, S] (-1 = dropped), locations, gates, exp_counts)
        idx = out[3]
        self.last_kept = (idx >= 0).sum()

    def forward(self, x):
        y, _l_aux, _counts = self.moe(x)
        if self.shared is not None:
            y = y + self.shared(x)
        return y


# ---------------------------------------------------------------------------------------------- contenders
@dataclass
class Shape:
    name: str
    hidden: int
    inner: int
    experts: int
    k: int
    shared: int = 0          # number of shared experts (fused width shared * inner)
    tokens: int = 4096

    @property
    def shared_inner(self):
        return self.shared * self.inner

    def describe(self):
        s = f"H={self.hidden} F={self.inner} E={self.experts} k={self.k}"
        if self.shared:
            s += f" shared={self.shared}x{self.inner}"
        return s + f" N={self.tokens}"


@dataclass
class Contender:
    shape: str
    label: str
    module: nn.Module
    kind: str                         # dsmoe | deepspeed | dense
    flops_fn: object = None           # () -> useful fwd+bwd FLOPs of the last step
    info_fn: object = None            # () -> dict of extra info about the last step
    times: list = field(default_factory=list)
    flops: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def expert_flops(rows, h, f):
    return 2 * rows * 3 * h * f       # SwiGLU forward: H->2F (2*H*2F) + F->H (2*F*H) per row


def dsmoe_closures(layer: MoELayer, sh: Shape):
    """(run, flops, info) of one MoELayer contender."""
    cfg, state = layer.cfg, {}

    def run(x):
        out = layer(x)
        state["stats"] = out.stats
        return out.hidden_states

    def flops():
        st = state["stats"]
        kept = int(st.tokens_per_expert.sum())
        n = sh.tokens
        fwd = expert_flops(kept, sh.hidden, sh.inner) + expert_flops(n, sh.hidden, sh.shared_inner) \
            + 2 * n * sh.hidden * cfg.num_choices
        return 3 * fwd

    def info():
        st = state["stats"]
        out = {"computed_assignments": int(st.tokens_per_expert.sum()), "assignments": sh.tokens * sh.k,
               "dropped": st.dropped_tokens, "null_fraction": st.null_fraction, "capacity": st.capacity}
        if layer.kernel_chooser is not None:
            out["adaptive"] = layer.kernel_chooser.summary()
        return out

    return run, flops, info


def make_dsmoe(sh: Shape, cf, device, dtype, null_experts=0, kernel="auto"):
    cfg = MoEConfig(hidden_size=sh.hidden, expert_hidden_size=sh.inner, num_experts=sh.experts, top_k=sh.k,
                    num_shared_experts=sh.shared, num_null_experts=null_experts, capacity_factor=cf,
                    router_bias=null_experts > 0, expert_kernel=kernel)
    layer = MoELayer(cfg).to(device=device, dtype=dtype).train()
    return (layer, *dsmoe_closures(layer, sh))


def variant(layer: MoELayer, sh: Shape, **changes):
    """A copy of ``layer`` (same weights) with some MoEConfig fields changed."""
    p = next(layer.parameters())
    copy = MoELayer(dataclasses.replace(layer.cfg, **changes)).to(device=p.device, dtype=p.dtype).train()
    copy.load_state_dict(layer.state_dict())
    return (copy, *dsmoe_closures(copy, sh))


def hf_blocks(sh: Shape, device, dtype, std: float = 0.02) -> tuple[list, MoELayer]:
    """transformers' Mixtral and Qwen3-MoE blocks of shape ``sh`` holding the same weights, and the dsmoe layer
    built from them with MoELayer.from_hf. Returns ([(label, block)], layer)."""
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    def mixtral(impl):
        c = MixtralConfig(hidden_size=sh.hidden, intermediate_size=sh.inner, num_local_experts=sh.experts,
                          num_experts_per_tok=sh.k, router_jitter_noise=0.0)
        c._experts_implementation = impl
        return c, MixtralSparseMoeBlock(c)

    mcfg, ref = mixtral("eager")
    with torch.no_grad():
        for prm in ref.parameters():
            prm.normal_(0.0, std)
    layer = MoELayer.from_hf(ref, mcfg).to(device=device, dtype=dtype).train()
    qcfg = Qwen3MoeConfig(hidden_size=sh.hidden, moe_intermediate_size=sh.inner, num_experts=sh.experts,
                          num_experts_per_tok=sh.k, norm_topk_prob=True, decoder_sparse_step=1)
    qcfg._experts_implementation = "grouped_mm"
    blocks = [("transformers Mixtral eager", ref), ("transformers Mixtral grouped_mm", mixtral("grouped_mm")[1]),
              ("transformers Qwen3-MoE grouped_mm", Qwen3MoeSparseMoeBlock(qcfg))]
    for _, b in blocks[1:]:
        layer.to_hf(b)
    return [(label, b.to(device=device, dtype=dtype).train()) for label, b in blocks], layer


def make_hf(block: nn.Module, sh: Shape):
    """(module, run, flops, info) of a transformers block: dropless, so it computes every assignment."""
    def run(x):
        return block(x.unsqueeze(0)).squeeze(0)

    def flops():
        return 3 * (expert_flops(sh.tokens * sh.k, sh.hidden, sh.inner) + 2 * sh.tokens * sh.hidden * sh.experts)

    return block, run, flops, lambda: {"computed_assignments": sh.tokens * sh.k, "assignments": sh.tokens * sh.k,
                                       "dropped": 0}


def make_deepspeed(sh: Shape, cf, device, dtype):
    mod = DeepSpeedContender(sh.hidden, sh.inner, sh.experts, sh.k, cf, sh.shared_inner).to(device=device, dtype=dtype)
    mod.train()

    def flops():
        kept = int(mod.last_kept)
        n = sh.tokens
        fwd = expert_flops(kept, sh.hidden, sh.inner) + expert_flops(n, sh.hidden, sh.shared_inner) \
            + 2 * n * sh.hidden * sh.experts
        return 3 * fwd

    def info():
        kept = int(mod.last_kept)
        return {"computed_assignments": kept, "assignments": sh.tokens * sh.k, "dropped": sh.tokens * sh.k - kept,
                "capacity": math.ceil(sh.tokens / sh.experts * cf * sh.k)}

    return mod, mod, flops, info


def make_dense(sh: Shape, device, dtype):
    width = sh.k * sh.inner + sh.shared_inner
    mod = SwiGLU(sh.hidden, width).to(device=device, dtype=dtype).train()

    def flops():
        return 3 * expert_flops(sh.tokens, sh.hidden, width)

    return mod, mod, flops, lambda: {"inner_width": width}


@torch.no_grad()
def bias_nulls(layer: MoELayer, x: torch.Tensor, share: float) -> float:
    """Set the null experts' router bias (one shared offset) so ~``share`` of the top-k choices are null.

    Bisection on the offset against the layer's own router; returns the resulting null fraction.
    """
    cfg = layer.cfg
    e = cfg.num_experts
    bias = layer.router.bias
    bias.zero_()

    def frac(b):
        bias[e:] = b
        idx = layer.router(x).topk_idx
        return (idx >= e).float().mean().item()

    lo, hi = -50.0, 50.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if frac(mid) < share:
            lo = mid
        else:
            hi = mid
    b = (lo + hi) / 2
    return frac(b)


# ---------------------------------------------------------------------------------------------- timing
def step(c: Contender, run, x, dy, device):
    for p in c.module.parameters():
        p.grad = None
    x.grad = None
    sync(device)
    t0 = time.perf_counter()
    y = run(x)
    y.backward(dy)
    sync(device)
    return time.perf_counter() - t0


def bench(contenders, runs, x, dy, device, warmup, reps, log):
    """Rounds of every contender once, each round in its own seeded random order, so no contender always runs
    right after the same one (on a CPU the step after the dense FFN's large allocations, or after a spinner's
    timeslice, differs: with a fixed order rotated by one per round, the contender listed after the dense FFN
    followed it in all but one round, and with a core busy measured ~10% slower than the same ops elsewhere)."""
    cont = None
    pairs = list(zip(contenders, runs))
    for r in range(warmup + reps):
        if r == warmup:
            cont = CpuContention()
        order = pairs[:]
        random.Random(r).shuffle(order)
        for c, run in order:
            dt = step(c, run, x, dy, device)
            if r >= warmup:
                c.times.append(dt)
                c.flops.append(c.flops_fn())
        if r == warmup - 1:
            log(f"  warmup done ({warmup} rounds)")
    for c in contenders:
        c.info = c.info_fn()
    return cont.share() if cont is not None else None


# ---------------------------------------------------------------------------------------------- main
def pick_shapes(args, gpu: bool) -> tuple[dict[str, Shape], int, int]:
    """The benchmark shapes and (warmup, reps) for --smoke, a GPU or a CPU."""
    if args.smoke:
        n = args.tokens or 256
        shapes = {"a": Shape("a", 64, 64, 8, 2, 0, n), "b": Shape("b", 64, 32, 16, 4, 0, n),
                  "d": Shape("d", 64, 32, 16, 3, 2, n)}
        return shapes, (args.warmup if args.warmup is not None else 1), (args.reps or 2)
    if gpu:
        n = args.tokens or 16384
        shapes = {"a": Shape("a", 2048, 5632, 8, 2, 0, n), "b": Shape("b", 2048, 1408, 64, 8, 0, n),
                  "d": Shape("d", 2048, 1408, 64, 6, 2, n)}
        return shapes, (args.warmup if args.warmup is not None else 3), (args.reps or 30)
    n = args.tokens or 4096
    shapes = {"a": Shape("a", 256, 512, 8, 2, 0, n), "b": Shape("b", 256, 128, 64, 8, 0, n),
              "d": Shape("d", 256, 128, 64, 6, 2, n)}
    return shapes, (args.warmup if args.warmup is not None else 3), (args.reps or 9)


def build_contenders(names: list[str], sh: Shape, args, device, dtype, x, results) -> list:
    """(shape, label, kind, (module, run, flops, info)) for every contender of one shape (and (c) when asked)."""
    made = [(sh.name, "dense SwiGLU", "dense", make_dense(sh, device, dtype))]
    hf = []
    if not args.no_transformers and not sh.shared:
        hf, layer = hf_blocks(sh, device, dtype)
        base = (layer, *dsmoe_closures(layer, sh))
    else:
        base = make_dsmoe(sh, None, device, dtype)
    made += [(sh.name, "dsmoe dropless", "dsmoe", base),
             (sh.name, "dsmoe grouped", "dsmoe", variant(base[0], sh, expert_kernel="grouped")),
             (sh.name, "dsmoe padded", "dsmoe", variant(base[0], sh, expert_kernel="padded")),
             (sh.name, "dsmoe adaptive", "dsmoe", variant(base[0], sh, expert_kernel="adaptive")),
             (sh.name, "dsmoe cf=1.25", "dsmoe", variant(base[0], sh, capacity_factor=1.25, drop_policy="probs"))]
    made += [(sh.name, label, "transformers", make_hf(block, sh)) for label, block in hf]
    if not args.no_deepspeed:
        made.append((sh.name, "deepspeed cf=1.25", "deepspeed", make_deepspeed(sh, 1.25, device, dtype)))
    results["shapes"][sh.name] = sh.describe()
    if "c" in names:
        null = make_dsmoe(sh, None, device, dtype, null_experts=4)
        nf = bias_nulls(null[0], x.detach(), args.null_share)
        log(f"  (c) router null bias tuned: null fraction of the router's choices = {nf:.3f}")
        made.append(("c", "dsmoe dropless +4 null", "dsmoe", null))
        results["shapes"]["c"] = sh.describe() + " +4 null experts (biased router)"
    return made


def check_same_function(made, x) -> dict:
    """Max |difference| of each transformers block's output from dsmoe's (same weights): the comparison is fair."""
    ref = next(m for _, label, _, m in made if label == "dsmoe dropless")
    with torch.no_grad():
        y = ref[1](x)
        return {label: float((m[1](x) - y).abs().max()) for _, label, kind, m in made if kind == "transformers"}


def bucket_layout(made, x) -> str | None:
    """The bucket layout the dropless layer's bucketed kernel uses for this batch (CPU 'auto'), in words."""
    layer = next(m for _, label, _, m in made if label == "dsmoe dropless")[0]
    if x.device.type != "cpu" or layer.cfg.num_null_experts:
        return None
    with torch.no_grad():
        idx = layer.router(x.reshape(-1, layer.cfg.hidden_size)).topk_idx.reshape(-1)
    b = choose_buckets(torch.bincount(idx, minlength=layer.cfg.num_experts), MAX_BUCKETS)
    sizes = "+".join(str(end - first) for first, end, _ in b.bounds)
    return (f"{len(b.bounds)} bucket(s) of {sizes} experts, {'their own order' if b.identity else 'sorted by load'}, "
            f"{100 * (b.num_rows / idx.numel() - 1):.1f}% padding")


def time_group(names: list[str], sh: Shape, args, device, dtype, warmup, reps, results) -> tuple[list, float | None]:
    """Build every contender of one shape (and (c) when asked) and time them in interleaved rounds."""
    log(f"shape ({names[0]}) {sh.describe()}" + ("  + (c) null experts" if "c" in names else ""))
    x = torch.randn(sh.tokens, sh.hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(sh.tokens, sh.hidden, device=device, dtype=dtype)
    made = build_contenders(names, sh, args, device, dtype, x, results)
    diffs = check_same_function(made, x)
    if diffs:
        results.setdefault("max_abs_diff_vs_dsmoe", {})[sh.name] = diffs
        log("  same weights: max |transformers - dsmoe| = " + ", ".join(f"{v:.1e} ({k})" for k, v in diffs.items()))
    layout = bucket_layout(made, x)
    if layout:
        results.setdefault("bucket_layout", {})[sh.name] = layout
        log(f"  dsmoe dropless on this batch: {layout}")
    contenders = [Contender(shape, label, mod, kind, fl, inf) for shape, label, kind, (mod, _, fl, inf) in made]
    runs = [run for *_, (_, run, _, _) in made]
    return contenders, bench(contenders, runs, x, dy, device, warmup, reps, log)


def row_dict(c: Contender, shapes: dict[str, Shape]) -> dict:
    t = median(c.times)
    fl = median(c.flops)
    return {"shape": c.shape, "contender": c.label, "kind": c.kind, "median_ms": t * 1e3,
            "min_ms": min(c.times) * 1e3, "max_ms": max(c.times) * 1e3,
            "tokens_per_s": shapes["a" if c.shape == "c" else c.shape].tokens / t, "tflops": fl / t / 1e12,
            "useful_gflop_per_step": fl / 1e9, **c.info}


def find_row(rows: list[dict], shape: str, label: str) -> dict | None:
    return next((r for r in rows if r["shape"] == shape and r["contender"] == label), None)


def verdict(val: float, target: float) -> str:
    return "MET" if val >= target else "MISSED"


def print_table(rows: list[dict], results: dict, contention: dict, warmup: int, reps: int, device, dtype_name,
                busy: bool):
    print(f"timing: forward+backward, {warmup} warmup + {reps} timed interleaved rounds (random order), median (min..max); "
          f"fp32 on CPU / bf16 on GPU (here {dtype_name} on {device})")
    print("FLOPs: useful matmul work of computed assignments only (2*3*H*F per kept token-expert pair "
          "+ shared 2*N*3*H*Fs + router 2*N*H*C), x3 for fwd+bwd; capacity padding not counted")
    for k in ("a", "b", "c", "d"):
        if k in results["shapes"]:
            print(f"  ({k}) {results['shapes'][k]}")
    if contention:
        expected = 1 / (os.cpu_count() or 1) if busy else 0.0       # the spinner's own share
        noisy = max(contention.values()) > expected + 0.1
        print("contention: other processes + steal used " + ", ".join(
            f"{100 * v:.0f}% ({k}{'+c' if k == 'a' and 'c' in results['shapes'] else ''})" for k, v in contention.items())
            + f" of the {os.cpu_count()} CPUs while timing" + (" (the busy core included)" if busy else "")
            + ("  <- noisy, rerun on a quiet machine" if noisy else ""))
    hdr = f"{'shape':<5} {'contender':<34} {'median ms':>10} {'min..max ms':>15} {'tokens/s':>10} {'TFLOP/s':>8} " \
          f"{'% dense':>8} {'computed/assign':>16} {'dropped':>8} {'null':>6}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        comp = f"{r['computed_assignments']}/{r['assignments']}" if "assignments" in r else f"dense F={r['inner_width']}"
        null = f"{r['null_fraction']:.3f}" if r.get("null_fraction") is not None else "-"
        drop = str(r.get("dropped", "-"))
        dense = find_row(rows, "a" if r["shape"] == "c" else r["shape"], "dense SwiGLU")
        share = f"{100 * dense['median_ms'] / r['median_ms']:.0f}%" if dense else "-"
        print(f"{r['shape']:<5} {r['contender']:<34} {r['median_ms']:>10.2f} "
              f"{r['min_ms']:>7.1f}..{r['max_ms']:<7.1f} {r['tokens_per_s']:>10.0f} {r['tflops']:>8.3f} "
              f"{share:>8} {comp:>16} {drop:>8} {null:>6}")


def strongest(rows: list[dict], shape: str, kinds: tuple[str, ...]) -> dict | None:
    """The fastest row of ``shape`` among the contenders of ``kinds``."""
    cands = [r for r in rows if r["shape"] == shape and r["kind"] in kinds]
    return min(cands, key=lambda r: r["median_ms"]) if cands else None


def print_ratios(rows: list[dict], device: str, busy: bool) -> dict:
    """Shares of the dense ceiling, speedups over the strongest other system, the null-expert efficiency; with
    the targets that apply to this device (and to --busy-core)."""
    tgt = TARGETS[device]
    print("ratios (share of dense = dense median / contender median; speedup = other median / dsmoe median):")
    ratios = {}
    for s in ("a", "b", "d"):
        dense = find_row(rows, s, "dense SwiGLU")
        if dense is None:
            continue
        other = strongest(rows, s, ("transformers", "deepspeed"))
        hf = strongest(rows, s, ("transformers",))
        for label in ("dsmoe dropless", "dsmoe grouped", "dsmoe padded", "dsmoe adaptive", "dsmoe cf=1.25"):
            r = find_row(rows, s, label)
            pct = 100 * dense["median_ms"] / r["median_ms"]
            entry = {"pct_of_dense": pct, "pct_of_dense_tflops": 100 * r["tflops"] / dense["tflops"]}
            line = f"  ({s}) {label:<15} {pct:5.1f}% of dense"
            if label in TARGETED and s in tgt["pct_of_dense"] and not busy:
                line += f" [target >= {tgt['pct_of_dense'][s]:.0f}%: {verdict(pct, tgt['pct_of_dense'][s])}]"
            if other is not None:
                sp = other["median_ms"] / r["median_ms"]
                entry["speedup_vs_strongest"], entry["strongest"] = sp, other["contender"]
                line += f"   {sp:5.2f}x the strongest other ({other['contender']})"
                if label in TARGETED and not busy:
                    line += f" [target >= {tgt['vs_strongest']:.1f}x: {verdict(sp, tgt['vs_strongest'])}]"
            if hf is not None:
                entry["speedup_vs_transformers"] = hf["median_ms"] / r["median_ms"]
                if busy and label in TARGETED and s in tgt["busy_vs_transformers"]:
                    t = tgt["busy_vs_transformers"][s]
                    sp = entry["speedup_vs_transformers"]
                    line += f"   busy core: {sp:.2f}x transformers' best [target >= {t}x: {verdict(sp, t)}]"
            ds = find_row(rows, s, "deepspeed cf=1.25")
            if ds is not None:
                entry["speedup_vs_deepspeed"] = ds["median_ms"] / r["median_ms"]
            ratios[f"{s}/{label}"] = entry
            print(line)
    c = find_row(rows, "c", "dsmoe dropless +4 null")
    if c is not None:
        rel = c["median_ms"] / find_row(rows, "a", "dsmoe dropless")["median_ms"]
        saved, share = 1 - rel, c["null_fraction"]
        eff = saved / share if share > 0 else float("nan")
        ratios["c/null"] = {"time_vs_no_null": rel, "time_saved": saved, "null_share": share, "null_efficiency": eff}
        print(f"  (c) +4 null experts: null share {share:.3f} (from stats), time {rel:.3f}x of (a) dsmoe dropless "
              f"-> saved {100 * saved:.1f}%; null efficiency = saved/share = {eff:.2f} "
              f"[target >= {TARGETS['null_efficiency']}: {verdict(eff, TARGETS['null_efficiency'])}]")
    return ratios


def main(argv=None):
    args = parse_args(argv)
    device, dtype, dtype_name = setup_device(args.device, args.dtype, args.threads)
    if device == "cpu" and not args.system_malloc:
        keep_cpu_allocations()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not args.no_deepspeed:
        init_single_process(device)
    shapes, warmup, reps = pick_shapes(args, device == "cuda")
    wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in wanted if s not in ("a", "b", "c", "d")]
    if bad:
        raise SystemExit(f"--shapes: unknown shape(s) {bad}; choose from a,b,c,d")
    if "c" in wanted and "a" not in wanted:
        wanted.insert(0, "a")

    mline = machine_line(device, dtype, ("transformers", "deepspeed"))
    mline += f" | {allocator_note() if device == 'cpu' else 'malloc: n/a'}"
    torch.manual_seed(args.seed)
    results = {"machine": mline, "device": device, "dtype": dtype_name, "warmup": warmup, "reps": reps,
               "busy_core": args.busy_core,
               "flops_note": "useful matmul FLOPs of computed assignments only: 2*3*H*F per kept (token, expert) "
                             "+ shared 2*N*3*H*Fs + router 2*N*H*C, x3 for fwd+bwd",
               "shapes": {}, "rows": [], "ratios": {}}
    all_rows, contention = [], {}
    with BusyCore(args.busy_core) as spinner:
        print(mline + f" | {spinner.describe()}", flush=True)
        results["busy_core_note"] = spinner.describe()
        for group in (["a", "c"], ["b"], ["d"]):   # (c) is timed in the same round-robin as (a): its baseline
            names = [g for g in group if g in wanted]
            if names:
                contenders, busy = time_group(names, shapes[names[0]], args, device, dtype, warmup, reps, results)
                if busy is not None:
                    contention[names[0]] = busy
                all_rows.extend(contenders)

    rows = [row_dict(c, shapes) for c in all_rows]
    results["rows"], results["other_cpu_share"] = rows, contention
    print_table(rows, results, contention, warmup, reps, device, dtype_name, args.busy_core)
    results["ratios"] = print_ratios(rows, device, args.busy_core)
    results["targets"] = {"device": TARGETS[device], "null_efficiency": TARGETS["null_efficiency"]}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
        log(f"wrote {args.json}")

    if not args.no_deepspeed:
        import deepspeed.comm as dscomm
        dscomm.barrier()
        dscomm.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
