"""Experts placed over 2 gloo processes give the single-process results (to 1e-5)."""
from __future__ import annotations

import pytest
import torch

import dsmoe  # noqa: F401
from dsmoe.mixtures import ExpertMixtureForCausalLM, apply_expert_placement
from dsmoe.mixtures.gate_training import GateTrainingConfig, train_gate

from dist_utils import run_distributed
from mixture_utils import VOCAB, expert_configs, one_torch_thread, save_experts

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
SLICES4 = [(1790, 1849), (1850, 1899), (1900, 1949), (1950, 2026)]


def inputs():
    x = torch.randint(1, VOCAB, (3, 10), generator=torch.Generator().manual_seed(3))
    return x, torch.tensor([1960, 1880, 2000])


def results(model) -> dict:
    x, dates = inputs()
    out = {}
    for combine in ("logprob", "logits"):
        scored = model(x, labels=x, date=dates, mode="router", combine=combine, return_logits=False)
        full = model(x, labels=x, date=dates, mode="router", combine=combine)
        out[combine] = (scored.loss.detach(), scored.token_log_probs.detach(), full.logits.detach())
    out["generate"] = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False,
                                     date=1960, mode="router", pad_token_id=0)
    batches = [{"input_ids": x, "date": dates}]
    res = train_gate(model, batches, GateTrainingConfig(steps=3, lr=1e-2))
    out["gate_losses"] = torch.tensor(res.losses)
    out["router"] = {k: v.detach().clone() for k, v in model.router.state_dict().items()}
    return out


def placed_worker(rank: int, world_size: int, folder: str, three_experts: str) -> dict:
    torch.set_num_threads(1)
    errors = []
    try:
        apply_expert_placement(ExpertMixtureForCausalLM.from_pretrained(three_experts))
    except ValueError as err:
        errors.append(str(err))
    model = apply_expert_placement(ExpertMixtureForCausalLM.from_pretrained(folder))
    try:
        model.save_pretrained(folder + f"-rank{rank}")
    except ValueError as err:
        errors.append(str(err))
    assert model.placement.local_experts == [2 * rank, 2 * rank + 1]
    assert sum(1 for e in model.experts for _ in e.parameters()) == sum(
        1 for k in (2 * rank, 2 * rank + 1) for _ in model.experts[k].parameters())    # the others are dropped
    return {**results(model), "errors": errors}


@pytest.mark.slow
def test_two_process_placement_equals_one_process(tmp_path):
    dirs = save_experts(tmp_path / "experts", configs=expert_configs() + expert_configs()[:1])
    torch.manual_seed(0)
    ExpertMixtureForCausalLM.from_experts(dirs, SLICES4, router={"hidden_size": 8}, top_k=3).save_pretrained(
        tmp_path / "mix")
    ExpertMixtureForCausalLM.from_experts(dirs[:3], SLICES4[:3]).save_pretrained(tmp_path / "mix3")
    reference = results(ExpertMixtureForCausalLM.from_pretrained(tmp_path / "mix"))
    for rank_result in run_distributed(placed_worker, 2, str(tmp_path / "mix"), str(tmp_path / "mix3")):
        indivisible, saving = rank_result["errors"]       # one line each, naming the key / the fix
        assert "parallel.expert_parallel_size=2" in indivisible and "divide" in indivisible
        assert "save_pretrained" in saving and "holds only some experts" in saving
        assert "\n" not in indivisible + saving
        for combine in ("logprob", "logits"):
            for got, want in zip(rank_result[combine], reference[combine]):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(rank_result["generate"], reference["generate"])
        torch.testing.assert_close(rank_result["gate_losses"], reference["gate_losses"], atol=1e-5, rtol=1e-5)
        for k, v in reference["router"].items():
            torch.testing.assert_close(rank_result["router"][k], v, atol=1e-5, rtol=1e-5)


