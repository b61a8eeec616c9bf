"""The one trainer on transformers causal LMs: gpt2 / llama / olmo from a config, a pretrained folder fine-tuned
with only its FFNs trainable, ZeRO-3 on 2 processes, exact resume, and one-line errors for bad model sections."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from launch_utils import REPO_ROOT, check_returncode, launch_env, run_deepspeed
from train_utils import TINY, TRAIN, losses, summary

ARCHS = {
    "gpt2": {"architecture": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2},
    "llama": {"architecture": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1},
    "olmo": {"architecture": "olmo", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 2},
}


def write_config(tmp_path, name: str, model: dict, **train) -> str:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["model"] = model
    cfg["train"].update({"max_steps": 8, "save_every": 4, "plots": False, **train})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train(config: str, out, *overrides, check=True):
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", config, "--debug", f"train.output_dir={out}",
                           *overrides], cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    if check:
        check_returncode(proc)
    return proc


def final_weights(out):
    return load_file(str(out / "checkpoints" / "step_00000008" / "model" / "model.safetensors"))


@pytest.mark.parametrize("arch", ["gpt2", "olmo"])
def test_a_transformers_architecture_trains_from_its_config(tmp_path, arch):
    out = tmp_path / arch
    proc = train(write_config(tmp_path, arch, ARCHS[arch]), out)
    l = losses(out)
    assert sorted(l) == list(range(1, 9)) and l[8] < l[1] - 0.5, l
    assert summary(out)["val_perplexity"] > 1 and f"model: {arch} (transformers)" in proc.stderr
    from transformers import AutoModelForCausalLM                  # plain transformers loads the checkpoint
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_00000008" / "model")
    assert model.config.model_type == arch and model.config.vocab_size == 512
    ev = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "eval.py"), str(out)], cwd=REPO_ROOT,
                        env=launch_env(), capture_output=True, text=True, check=True)
    assert json.loads(ev.stdout)["val_loss"] == pytest.approx(summary(out)["val_loss"], rel=1e-5)


def test_llama_resumes_exactly(tmp_path):
    cfg = write_config(tmp_path, "llama", ARCHS["llama"])
    full, split = tmp_path / "full", tmp_path / "split"
    train(cfg, full)
    train(cfg, split, "train.steps_per_run=4")
    train(cfg, split)
    a, b = losses(full), losses(split)
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]


@pytest.fixture
def pretrained_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    folder = tmp_path / "pretrained"
    model.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def test_ffn_only_fine_tuning_of_a_pretrained_folder(tmp_path, pretrained_llama):
    folder, before = pretrained_llama
    out = tmp_path / "ft"
    proc = train(write_config(tmp_path, "ft", {"pretrained": str(folder)}, trainable="ffn"), out)
    assert "train.trainable=ffn" in proc.stderr
    after = final_weights(out)
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert changed and all(".mlp." in k for k in changed), sorted(changed)
    assert {k for k in before if ".mlp." in k} == changed            # every FFN weight trained


def test_zero3_fine_tunes_a_pretrained_olmo_on_two_processes(tmp_path):
    from transformers import OlmoConfig, OlmoForCausalLM
    torch.manual_seed(0)
    OlmoForCausalLM(OlmoConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
                    ).save_pretrained(tmp_path / "olmo")
    cfg = write_config(tmp_path, "z3", {"pretrained": str(tmp_path / "olmo")}, max_steps=4)
    out = tmp_path / "z3run"
    proc = run_deepspeed(TRAIN, ["--config", cfg, f"train.output_dir={out}", "deepspeed=ds_configs/zero3.json"],
                         num_procs=2, timeout=400)
    check_returncode(proc)
    l = losses(out)
    assert sorted(l) == [1, 2, 3, 4] and l[4] < l[1]
    w = load_file(str(out / "checkpoints" / "step_00000004" / "model" / "model.safetensors"))
    ref = OlmoForCausalLM.from_pretrained(tmp_path / "olmo").state_dict()
    assert w.keys() >= {k for k in ref if k != "lm_head.weight"}
    assert all(w[k].shape == ref[k].shape for k in w)                # gathered from ZeRO-3 shards, full shapes
    assert any(not torch.equal(w[k], ref[k]) for k in w)


@pytest.mark.parametrize("model, needle", [
    ({"architecture": "gtp2"}, "model.architecture=gtp2: not a transformers model type; did you mean 'gpt2'?"),
    ({"architecture": "gpt2", "n_embed": 32}, "model.n_embed: not a gpt2 config key; did you mean 'n_embd'?"),
    ({"pretrained": "/nonexistent/folder"}, "model.pretrained=/nonexistent/folder: no config.json there"),
    ({"hidden_sise": 32}, "model.hidden_sise: unknown key"),
])
def test_bad_model_sections_exit_2_with_one_line(tmp_path, model, needle):
    proc = train(write_config(tmp_path, "bad", model), tmp_path / "bad_run", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("dsmoe: error:")]
    assert len(line) == 1 and needle in line[0], proc.stderr[-2000:]
    assert not (tmp_path / "bad_run" / "checkpoints").exists()


def test_trainable_ffn_needs_ffn_modules_and_unknown_policies_are_refused(tmp_path):
    proc = train(write_config(tmp_path, "bad", ARCHS["gpt2"], trainable="embeddings"), tmp_path / "r", check=False)
    assert proc.returncode == 2 and "train.trainable='embeddings': must be one of" in proc.stderr
    proc = train(write_config(tmp_path, "bad2", ARCHS["gpt2"], trainable="none-but-new"), tmp_path / "r2",
                 check=False)
    assert proc.returncode == 2 and "none-but-new: trains the embeddings of tokens added to a pretrained" in proc.stderr


PERIODS = "data.prompt_periods=[1790-1899,1900-2026]"


def test_period_tokens_resize_a_pretrained_model_and_none_but_new_trains_only_their_rows(tmp_path, pretrained_llama):
    """Prompt variant C on a pretrained folder: the two period tokens grow the vocabulary (512 -> 514, the
    embeddings resized), and train.trainable=none-but-new changes their embedding rows only: every other row and
    every other weight is bit-identical to the pretrained model's."""
    folder, before = pretrained_llama
    out = tmp_path / "nbn"
    proc = train(write_config(tmp_path, "nbn", {"pretrained": str(folder)}, trainable="none-but-new"), out,
                 "data.prompt=period_token", PERIODS, "data.max_chars_per_doc=400")   # short documents: many
    assert "train.trainable=none-but-new" in proc.stderr                              # period tokens per batch
    after = final_weights(out)
    emb = after["model.embed_tokens.weight"]
    assert emb.shape == (514, 32) and after["lm_head.weight"].shape == (514, 32)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after[key][:512], before[key])                       # old rows untouched
    start = load_file(str(out / "checkpoints" / "step_00000004" / "model" / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(start[key][512:], after[key][512:])                # the new rows do train
    assert all(torch.equal(after[k], v) for k, v in before.items() if k not in ("model.embed_tokens.weight",
                                                                                "lm_head.weight"))
    for bad, needle in ((["data.prompt=year_prefix"], "data.prompt=year_prefix adds no token to train"),
                        (["data.prompt=period_token", PERIODS, "deepspeed=ds_configs/zero3.json"],
                         "not supported under ZeRO stage 3")):
        proc = train(write_config(tmp_path, "nbn2", {"pretrained": str(folder)}, trainable="none-but-new"),
                     tmp_path / "r3", *bad, check=False)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-800:]


def test_year_prefix_tokens_are_not_in_the_training_or_validation_loss(tmp_path):
    """Variant E: the year sentence before every document is context, not a target: the run's held-out loss is
    the model's loss on the validation blocks with the prefix labels at -100, which differs from scoring them."""
    out = tmp_path / "e"
    short = "data.max_chars_per_doc=400"                         # short documents: prefixes are ~10% of tokens
    train(write_config(tmp_path, "e", ARCHS["gpt2"], max_steps=8), out, "data.prompt=year_prefix", short)
    from transformers import AutoModelForCausalLM
    from dsmoe.data import build_data
    from dsmoe.training.config import load_config
    cfg = load_config(tmp_path / "e.yaml", [f"train.output_dir={out}", "data.prompt=year_prefix", short])
    data = build_data(cfg.data, output_dir=out)
    assert data.val_scored is not None and not data.val_scored.all()
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_00000008" / "model").eval()
    total = {True: [0.0, 0], False: [0.0, 0]}
    with torch.no_grad():
        for i, batch in enumerate(data.val_batches(4)):
            if i == cfg.train.eval_batches:
                break
            for masked in (True, False):
                labels = batch["labels"] if masked else batch["input_ids"]
                n = int((labels[:, 1:] != -100).sum())
                total[masked][0] += model(input_ids=batch["input_ids"], labels=labels).loss.item() * n
                total[masked][1] += n
    masked_loss, full_loss = (total[m][0] / total[m][1] for m in (True, False))
    assert summary(out)["val_loss"] == pytest.approx(masked_loss, rel=1e-5)
    assert abs(masked_loss - full_loss) > 0.01


def test_a_btx_merge_fine_tunes_as_a_routed_lm(tmp_path, pretrained_llama):
    """A Branch-Train-MiX folder (a RoutedLM) given as model.pretrained trains with the MoE machinery on:
    expert load is logged and the expert bias moves (bias balancing)."""
    from transformers import LlamaForCausalLM
    from dsmoe.mixtures import btx_merge

    folder, _ = pretrained_llama
    a = LlamaForCausalLM.from_pretrained(folder)
    b = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for p in b.model.layers[0].mlp.parameters():
            p.add_(0.01 * torch.randn_like(p))
    merged = tmp_path / "btx"
    btx_merge([a, b], top_k=1, topk_method="noaux_tc", bias_update_rate=0.01).save_pretrained(merged)
    out = tmp_path / "btx_run"
    proc = train(write_config(tmp_path, "btx", {"pretrained": str(merged), "aux_loss_coef": 0.01}), out)
    assert f"model: RoutedLM from {merged}" in proc.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows[0]["expert_load"]) == 2 and len(rows[0]["expert_load"][0]) == 2
    w = final_weights(out)
    bias = [k for k in w if k.endswith("expert_bias")]
    assert bias and any(float(w[k].abs().sum()) > 0 for k in bias)
