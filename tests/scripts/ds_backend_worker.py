"""2-process check of MoELayer(backend="deepspeed") under the real DeepSpeed launcher.

    deepspeed --num_gpus 2 --master_port PORT tests/scripts/ds_backend_worker.py --out result.json

For two configs (top-2 SwiGLU with capacity 1.25; top-1 GELU dropless with a PR-MoE residual) it builds the
layer with the same seed on both ranks, keeps an unsharded copy as the reference, shards with
apply_expert_parallel(group of size 2), and compares forward outputs, stats and gradients with the
reference run on the same rank-local tokens. Then it trains the first layer with a deepspeed.initialize
engine (ZeRO-2, Adam from the DS config). Rank 0 writes a JSON summary for tests/test_deepspeed_backend.py.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dsmoe.deepspeed_comm import init_deepspeed_comm  # noqa: E402
from dsmoe.moe import MoEConfig  # noqa: E402
from dsmoe.moe import build_moe_layer as MoELayer  # noqa: E402

H, FFN, E = 16, 8, 4


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_layer(cfg: MoEConfig, group, rank: int) -> tuple[dict, nn.Module]:
    torch.manual_seed(1234)
    layer = MoELayer(cfg)
    ref = copy.deepcopy(layer)                       # unsharded: all E experts, ep_size 1
    layer.apply_expert_parallel(group)
    res: dict = {"class": type(layer).__name__, "ep_size": layer.expert_parallel_size,
                 "local_expert_range": list(layer.local_expert_range)}
    lo, hi = layer.local_expert_range

    ref_experts = list(ref.experts)[lo:hi]
    res["local_experts_match_global"] = all(
        torch.equal(a, b) for le, re_ in zip(layer.experts, ref_experts)
        for a, b in zip(le.parameters(), re_.parameters()))
    res["expert_tags"] = sorted({(str(getattr(p, "allreduce", None)), str(getattr(p, "group_name", None)))
                                 for p in layer.experts.parameters()})
    res["gate_tagged"] = hasattr(layer.gate.wg.weight, "allreduce")

    g = torch.Generator().manual_seed(100 + rank)   # rank-specific tokens
    x = torch.randn(2, 12, H, generator=g)
    out, ref_out = layer(x), ref(x)
    res["out_shape"] = list(out.hidden_states.shape)
    res["max_out_diff"] = (out.hidden_states - ref_out.hidden_states).abs().max().item()
    res["aux_diff"] = (out.aux_loss - ref_out.aux_loss).abs().item()
    res["aux_is_scalar"] = out.aux_loss.dim() == 0
    tpe = out.stats["tokens_per_expert"]
    res["tokens_per_expert"] = tpe.tolist()
    res["tokens_per_expert_dtype"] = str(tpe.dtype)
    res["dropped_tokens"] = out.stats["dropped_tokens"]
    res["null_fraction"] = out.stats["null_fraction"]
    ref_tpe = gather(ref_out.stats["tokens_per_expert"].tolist())
    res["ref_tokens_per_expert_sum"] = [sum(c) for c in zip(*ref_tpe)]
    res["ref_dropped_sum"] = sum(gather(ref_out.stats["dropped_tokens"]))
    res["assignments"] = 2 * x.shape[0] * x.shape[1] * cfg.top_k

    # 2-D input gives the same result
    out2 = layer(x.reshape(-1, H))
    res["flat_input_ok"] = torch.allclose(out2.hidden_states, out.hidden_states.reshape(-1, H))

    # gradients: gate (and residual) match the reference on local tokens; an expert's grad is the sum over
    # ranks of the reference grads for that global expert (the all-to-all backward brings them home)
    target = torch.tanh(x @ torch.randn(H, H, generator=torch.Generator().manual_seed(7)))
    (F.mse_loss(out.hidden_states, target) + out.aux_loss).backward()
    (F.mse_loss(ref_out.hidden_states, target) + ref_out.aux_loss).backward()
    res["gate_grad_diff"] = (layer.gate.wg.weight.grad - ref.gate.wg.weight.grad).abs().max().item()
    diffs = []
    for re_ in ref.experts:
        for p in re_.parameters():
            dist.all_reduce(p.grad)
    for le, re_ in zip(layer.experts, ref_experts):
        for a, b in zip(le.parameters(), re_.parameters()):
            diffs.append((a.grad - b.grad).abs().max().item())
    res["expert_grad_diff"] = max(diffs)
    layer.zero_grad(set_to_none=True)
    return res, layer


class Net(nn.Module):
    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        o = self.moe(x)
        return o.hidden_states, o.aux_loss


def train(layer: nn.Module, rank: int, steps: int) -> dict:
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10 ** 6,
    }
    engine, _, _, _ = deepspeed.initialize(model=Net(layer), model_parameters=layer.parameters(), config=ds_config)
    g = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(4, 12, H, generator=g)
    target = torch.tanh(x @ torch.randn(H, H, generator=torch.Generator().manual_seed(7)))
    losses = []
    for _ in range(steps):
        y, aux = engine(x)
        loss = F.mse_loss(y, target) + aux
        engine.backward(loss)
        engine.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / dist.get_world_size())
    gates = gather(layer.gate.wg.weight.detach().clone())
    experts = gather([p.detach().clone() for p in layer.experts[0].parameters()])
    return {"losses": losses, "has_moe_layers": bool(engine.has_moe_layers),
            "gate_identical": all(torch.equal(gates[0], w) for w in gates[1:]),
            "experts_differ": any(not torch.equal(a, b) for a, b in zip(experts[0], experts[1]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--local_rank", type=int, default=-1)   # passed by older launchers
    args = ap.parse_args()

    init_deepspeed_comm()
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))              # the EP group: both ranks
    result: dict = {"world": world}

    base = dict(hidden_size=H, expert_hidden_size=FFN, num_experts=E, backend="deepspeed", aux_loss_coef=0.01)
    cfg_a = MoEConfig(**base, top_k=2, capacity_factor=1.25, min_capacity=1)
    cfg_b = MoEConfig(**base, top_k=1, norm_topk_prob=False, capacity_factor=None, activation="gelu",
                      use_residual=True)
    result["capacity"], layer_a = check_layer(cfg_a, group, rank)
    result["dropless"], _ = check_layer(cfg_b, group, rank)
    result["train"] = train(layer_a, rank, args.steps)
    try:                                                    # 3 experts cannot be split over 2 ranks
        MoELayer(MoEConfig(**{**base, "num_experts": 3})).apply_expert_parallel(group)
        result["indivisible_error"] = None
    except ValueError as err:
        result["indivisible_error"] = str(err)

    per_rank = gather(result)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"ranks": per_rank}, indent=1))
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    main()
