"""Branch-Train-MiX (dsmoe.mixtures.btx_merge, launch/btx.py) and the export to Mixtral (launch/export.py --to):
N = 1 with top-1 routing is the Llama itself, every expert is its model's FFN, the routers' initialisations, and
the Mixtral folder loads with plain transformers (no dsmoe) and gives the RoutedLM's logits."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import dsmoe  # noqa: F401
from dsmoe.mixtures import GatingConfig, btx_merge, train_gating
from launch_utils import launch_env
from merge_utils import cli_main, domain_texts, perturbed_copy, toy_gate_data, world  # noqa: F401


@pytest.fixture(scope="module")
def experts(world):
    return world.tok, world.base, world.experts[:2], world.root


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_one_copy_with_top1_routing_is_the_llama(experts):
    tok, base, _, _ = experts
    llama = _load(base)
    btx = btx_merge([llama], top_k=1)
    assert btx.config.n_routed_experts == 1 and btx.config.moe_layers == [0, 1]
    enc = tok([domain_texts(0, 1)[0], domain_texts(1, 1)[0]], return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()              # padding positions are not routed (their FFN output is 0)
    assert not real.all()
    with torch.no_grad():
        torch.testing.assert_close(btx(**enc).logits[real], llama(**enc).logits[real], rtol=0, atol=1e-5)


def test_experts_are_the_models_ffns_and_the_trunk_is_their_mean(experts):
    _, _, folders, _ = experts
    a = _load(folders[0])
    b = perturbed_copy(_load(folders[1]), seed=4, where="self_attn")           # a different trunk
    btx = btx_merge([a, b], top_k=2)
    for i in range(2):
        ex = btx.model.layers[i].mlp.moe.experts
        for e, m in enumerate((a, b)):
            mlp = m.model.layers[i].mlp
            torch.testing.assert_close(ex.w_in[e], torch.cat([mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()], 1))
            torch.testing.assert_close(ex.w_out[e], mlp.down_proj.weight.t())
    key = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(btx.state_dict()[key], (a.state_dict()[key] + b.state_dict()[key]) / 2)
    first = btx_merge([a, b], top_k=1, trunk="first")
    torch.testing.assert_close(first.state_dict()[key], a.state_dict()[key])


def test_hidden_router_init_is_each_experts_mean_ffn_input(experts):
    tok, _, folders, _ = experts
    prompts = [domain_texts(d, 4, seed=2) for d in range(2)]
    btx = btx_merge(folders, top_k=1, router_init="hidden", prompts=prompts)
    for e, folder in enumerate(folders):          # layer 0's FFN input, straight from the source Llama
        llama = _load(folder)
        seen = []
        llama.model.layers[0].post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.append(o[0]))
        with torch.no_grad():
            for text in prompts[e]:
                llama(**tok(text, return_tensors="pt"))
        want = F.normalize(torch.cat(seen).mean(0), dim=0)
        torch.testing.assert_close(btx.model.layers[0].mlp.moe.router.weight[e], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="router_init='hidden' needs prompts="):
        btx_merge(folders, router_init="hidden")


def test_gate_router_init_uses_the_gates_class_directions(experts):
    tok, base, folders, root = experts
    texts, labels = toy_gate_data(n_per_domain=12, domains=2)
    cfg = GatingConfig(base_model=str(base), output_dir=str(root / "gate_on_base"), hidden_dims=[], num_epochs=3,
                       learning_rate=1e-2, dropout=0.0, train_split=0.5, val_split=0.25, test_split=0.25)
    gate = train_gating(texts, labels, cfg).gate
    btx = btx_merge(folders, top_k=1, router_init="gate", gating=root / "gate_on_base")
    w = gate.net[0].weight.detach()                                    # linear gate: its rows are the directions
    want = F.normalize(w - w.mean(0, keepdim=True), dim=-1)
    for moe in btx.moe_layers():
        torch.testing.assert_close(moe.router.weight, want)
    texts3, labels3 = toy_gate_data(n_per_domain=8, domains=3)
    cfg3 = GatingConfig(base_model=str(base), output_dir=str(root / "gate3_on_base"), hidden_dims=[], num_epochs=1,
                        train_split=0.5, val_split=0.25, test_split=0.25)
    train_gating(texts3, labels3, cfg3)
    with pytest.raises(ValueError, match="the gate has 3 classes but 2 models"):
        btx_merge(folders, router_init="gate", gating=root / "gate3_on_base")


def test_btx_refuses_bad_arguments(experts):
    _, base, folders, _ = experts
    with pytest.raises(ValueError, match=r"top_k=3 must be in \[1, 2\]"):
        btx_merge(folders, top_k=3)
    with pytest.raises(ValueError, match="shared_expert=True needs base="):
        btx_merge(folders, shared_expert=True)
    with pytest.raises(ValueError, match="router_init='gate' needs gating="):
        btx_merge(folders, router_init="gate")
    with pytest.raises(ValueError, match="router_init='cheap_embed'"):
        btx_merge(folders, router_init="cheap_embed")
    shared = btx_merge(folders, top_k=1, shared_expert=True, base=base)
    torch.testing.assert_close(shared.model.layers[0].mlp.moe.shared_experts.up_proj.weight,
                               _load(base).model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="n_shared_experts=1"):
        shared.to_hf()


def test_btx_cli_and_mixtral_export_load_without_dsmoe(experts, tmp_path, capsys):
    tok, _, folders, _ = experts
    out = tmp_path / "btx"
    assert cli_main("btx")(["--models", *map(str, folders), "--out", str(out), "--top_k", "1",
                            "--moe", "aux_loss_coef=0.02"]) == 0
    btx = _load(out)
    assert btx.config.model_type == "dsmoe_routed_lm" and btx.config.aux_loss_coef == 0.02
    assert (out / "tokenizer.json").is_file()
    with torch.no_grad():        # a router that separates the experts, so top-1 routing matters
        for moe in btx.moe_layers():
            moe.router.weight.normal_(0, 1.0)
    btx.save_pretrained(tmp_path / "btx_routed")
    mixtral = tmp_path / "mixtral"
    export = cli_main("export")
    assert export([str(tmp_path / "btx_routed"), str(mixtral), "--to", "mixtral"]) == 0
    assert export([str(tmp_path / "btx_routed"), str(tmp_path / "q"), "--to", "qwen3_moe"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]   # (progress bars aside)
    assert len(err) == 1 and "cannot be written as qwen3_moe (qk_norm=None (needs 'per_head'))" in err[0]
    assert not (tmp_path / "q").exists()
    ids = tok([domain_texts(0, 1)[0] + " " + domain_texts(1, 1)[0]], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = btx(input_ids=ids).logits
    save_file({"ids": ids, "want": want.contiguous()}, str(tmp_path / "io.safetensors"))
    script = ("import sys, torch\nfrom safetensors.torch import load_file\n"
              "from transformers import AutoModelForCausalLM\n"
              f"io = load_file({str(tmp_path / 'io.safetensors')!r})\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(mixtral)!r}, dtype=torch.float32).eval()\n"
              "assert type(m).__name__ == 'MixtralForCausalLM', type(m)\n"
              "assert 'dsmoe' not in sys.modules\n"
              "with torch.no_grad():\n    got = m(input_ids=io['ids']).logits\n"
              "torch.testing.assert_close(got, io['want'], rtol=1e-5, atol=1e-5)\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=launch_env({"PYTHONPATH": ""}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    assert cli_main("btx")(["--models", str(folders[0]), "--out", str(out)]) == 2      # out is not empty
    assert "exists and is not empty" in capsys.readouterr().err
